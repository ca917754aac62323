import os

import pytest
import timm
import torch

from vitbench.models import EMBEDDED_WEIGHTS, create_model, load_checkpoint, save_weights


def _tiny():
    return timm.create_model("vit_digits_patch8_112", pretrained=False, depth=2)


def test_embedded_backbone_geometry():
    model = timm.create_model("vit_digits_patch8_112", pretrained=False)
    assert model.patch_embed.grid_size == (14, 14) and len(model.blocks) == 12 and model.num_classes == 10
    assert model(torch.randn(1, 3, 112, 112)).shape == (1, 10)
    half = timm.create_model("vit_digits_patch8_112", pretrained=False, img_size=56)
    assert half.patch_embed.grid_size == (7, 7)


def test_pretrained_embedded_weights_load_or_explain():
    if EMBEDDED_WEIGHTS.is_file():
        model = create_model("vit_digits_patch8_112", pretrained=True)
        assert model.num_classes == 10
    else:
        with pytest.raises(FileNotFoundError, match="vitbench-train"):
            create_model("vit_digits_patch8_112", pretrained=True)


@pytest.mark.parametrize("layout", ["safetensors", "deit", "module", "plain"])
def test_checkpoint_layouts_round_trip(tmp_path, layout):
    src, dst = _tiny(), _tiny()
    state = src.state_dict()
    if layout == "safetensors":
        path = save_weights(src, tmp_path / "w.safetensors")
    else:
        path = tmp_path / "w.pth"
        obj = {"deit": {"model": state, "epoch": 3}, "module": {f"module.{k}": v for k, v in state.items()},
               "plain": state}[layout]
        torch.save(obj, path)
    load_checkpoint(dst, path)
    for k, v in dst.state_dict().items():
        assert torch.equal(v, state[k])


def test_saved_weights_get_the_usual_file_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = save_weights(_tiny(), tmp_path / "w.safetensors")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_wrong_checkpoint_names_the_keys(tmp_path):
    other = timm.create_model("vit_digits_patch8_112", pretrained=False, depth=3)
    save_weights(other, tmp_path / "deeper.safetensors")
    with pytest.raises(ValueError, match="unexpected keys: blocks.2"):
        load_checkpoint(_tiny(), tmp_path / "deeper.safetensors")
    wide = timm.create_model("vit_digits_patch8_112", pretrained=False, depth=2, embed_dim=32)
    save_weights(wide, tmp_path / "narrow.safetensors")
    with pytest.raises(ValueError, match="shape mismatch"):
        load_checkpoint(_tiny(), tmp_path / "narrow.safetensors")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not readable"):
        load_checkpoint(_tiny(), tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(_tiny(), tmp_path / "missing.safetensors")


def test_fp16_weights_load_into_fp32_model(tmp_path):
    src = _tiny()
    path = save_weights(src, tmp_path / "half.safetensors", dtype=torch.float16)
    dst = load_checkpoint(_tiny(), path)
    assert dst.cls_token.dtype == torch.float32
    torch.testing.assert_close(dst.cls_token, src.cls_token, atol=1e-3, rtol=1e-3)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model"):
        create_model("no_such_model_xyz")


def test_checkpoint_at_another_resolution_resamples_the_positional_table(tmp_path):
    torch.manual_seed(0)
    small = timm.create_model("vit_digits_patch8_112", pretrained=False, depth=2, img_size=32)
    path = save_weights(small, tmp_path / "w32.safetensors")
    big = load_checkpoint(timm.create_model("vit_digits_patch8_112", pretrained=False, depth=2), path)
    assert big.pos_embed.shape == (1, 197, 64)
    assert torch.equal(big.pos_embed[:, 0], small.pos_embed[:, 0])  # the CLS entry is kept as is
    assert torch.equal(big.blocks[0].attn.qkv.weight, small.blocks[0].attn.qkv.weight)
    grid = big.pos_embed[0, 1:].reshape(14, 14, 64)
    assert grid.std(dim=(0, 1)).mean() > 0  # interpolated, not zero-filled


def test_shipped_backbone_classifies_the_embedded_digits():
    import vitbench

    model = create_model("vit_digits_patch8_112", pretrained=True).eval()
    assert next(model.parameters()).dtype == torch.float32  # fp16 file, fp32 model
    loader = vitbench.build_eval_loader("digits", 112, (0.5,) * 3, (0.5,) * 3, batch_size=128, crop_pct=1.0,
                                        num_workers=0, limit=128)
    images, labels, _ = next(iter(loader))
    with torch.inference_mode():
        top1 = (model(images).argmax(-1) == labels).float().mean().item()
    assert top1 > 0.85  # 93.8 % on the whole validation set
