import pytest
import torch

import liferegress
from liferegress.checkpoint import convert_state_dict


def _model(make_vit, seed=0):
    torch.manual_seed(seed)
    model = liferegress.apply(make_vit(), keep_rate=0.7, temperature=2.0)
    torch.nn.init.normal_(model.life_predictor.W)
    return model


def test_own_layout_round_trip(make_vit, images, tmp_path):
    src = _model(make_vit)
    path = liferegress.save_checkpoint(src, tmp_path / "lr.safetensors", extra={"note": "x"})
    dst = _model(make_vit, seed=1)
    liferegress.load_checkpoint(dst, path)
    with torch.no_grad():
        torch.testing.assert_close(dst(images), src(images))
    meta = liferegress.read_config(path)
    assert meta["temperature"] == 2.0 and meta["keep_counts"] == [140, 100, 72] and meta["note"] == "x"


def _released(model):
    """The released TimmVitAdapter layout inside a Lightning checkpoint (module attribute ``model``)."""
    state = {}
    for k, v in model.state_dict().items():
        if k == "life_predictor.W":
            state["model.blocks.patch_life_predictor.W"] = v[None]
        else:
            state[f"model.model.{k}"] = v
            if k.startswith("blocks."):
                i, rest = k.split(".", 2)[1:]
                part = f"head_blocks.{i}" if int(i) < 4 else f"tail_blocks.{int(i) - 4}"
                state[f"model.blocks.{part}.{rest}"] = v
    dim = model.embed_dim
    state["model.blocks.plugin_norm_layer.weight"] = torch.ones(dim)
    state["model.blocks.plugin_norm_layer.bias"] = torch.zeros(dim)
    return {"state_dict": state, "epoch": 0, "global_step": 10}


def test_released_layout_loads(make_vit, images, tmp_path):
    src = _model(make_vit)
    path = tmp_path / "last.ckpt"
    torch.save(_released(src), path)
    dst = _model(make_vit, seed=1)
    liferegress.load_checkpoint(dst, path)
    assert torch.equal(dst.life_predictor.W, src.life_predictor.W)
    with torch.no_grad():
        torch.testing.assert_close(dst(images), src(images))


def test_released_layout_with_trained_plugin_norm_is_rejected(make_vit):
    ckpt = _released(_model(make_vit))
    ckpt["state_dict"]["model.blocks.plugin_norm_layer.weight"] += 0.1
    with pytest.raises(ValueError, match="plugin LayerNorm"):
        convert_state_dict(ckpt["state_dict"])


def test_wrong_checkpoints_are_rejected(make_vit, tmp_path):
    other = liferegress.apply(make_vit(embed_dim=64), keep_rate=0.7)
    path = liferegress.save_checkpoint(other, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="does not fit"):
        liferegress.load_checkpoint(_model(make_vit), path)
    with pytest.raises(FileNotFoundError):
        liferegress.load_checkpoint(_model(make_vit), tmp_path / "missing.safetensors")
    with pytest.raises(TypeError, match="apply"):
        liferegress.load_checkpoint(make_vit(), path)


def test_backbone_only_checkpoint_needs_non_strict(make_vit, tmp_path):
    from vitbench.models import save_weights

    path = save_weights(make_vit(), tmp_path / "backbone.safetensors")
    with pytest.raises(ValueError, match="life_predictor.W"):
        liferegress.load_checkpoint(_model(make_vit), path)
    assert liferegress.load_checkpoint(_model(make_vit), path, strict=False) == ["life_predictor.W"]
