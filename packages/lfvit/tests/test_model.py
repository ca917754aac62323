import math

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from lfvit import check_eta
from lfvit.checkpoint import from_official, init_from_backbone, load_lfvit_checkpoint, main as convert, to_official
from lfvit.flops import dense_gflops, stage_flops
from vitbench.flops import flop_counter_gmacs


def block_token_counts(model, x, fn):
    seen = []
    handle = model.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    try:
        with torch.no_grad():
            fn(x)
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("m,expected", [(4, 95), (5, 116), (6, 146)])
def test_focus_sequence_length_in_model(digits_model, m, expected):
    digits_model.set_lf_options(region_size=m)
    try:
        assert block_token_counts(digits_model, torch.randn(2, 3, 112, 112), digits_model) == [50, expected]
    finally:
        digits_model.set_lf_options(region_size=5)


def test_early_exit_sub_batch_equals_two_stage(digits_model):
    x = torch.randn(8, 3, 112, 112)
    with torch.no_grad():
        z = digits_model(x)
        full = digits_model.record
        conf = z.location.softmax(-1).amax(-1)
        eta = conf.median().item()
        out = digits_model.forward_early_exit(x, eta)
    rec = digits_model.record
    go = conf < eta
    assert 0 < int(go.sum()) < 8 and torch.equal(rec.exit_stage, go.long())
    torch.testing.assert_close(out[~go], z.location[~go], rtol=0, atol=0)
    torch.testing.assert_close(out[go], z.focus[go], rtol=1e-5, atol=1e-5)
    for name in ("window", "cells", "fine_index"):
        assert torch.equal(getattr(rec, name)[go], getattr(full, name)[go])
        assert (getattr(rec, name)[~go] == -1).all()
    torch.testing.assert_close(rec.gca, full.gca)
    # the focus stage really ran on the sub-batch only
    counts = block_token_counts(digits_model, x, lambda t: digits_model.forward_early_exit(t, eta))
    assert counts == [50, 116]


def test_early_exit_extremes(digits_model):
    x = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        z = digits_model(x)
        torch.testing.assert_close(digits_model.forward_early_exit(x, 0.0), z.location, rtol=0, atol=0)
        assert block_token_counts(digits_model, x, lambda t: digits_model.forward_early_exit(t, 0.0)) == [50]
        torch.testing.assert_close(digits_model.forward_early_exit(x, 1.0), z.focus, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eta", [0, 0.0, 0.01, 0.47, 0.99, 1, 1.0])
def test_eta_in_unit_interval_accepted(eta):
    assert check_eta(eta) == float(eta)


@pytest.mark.parametrize("eta", [-0.01, 1.01, float("nan"), float("inf"), "0.5", None])
def test_eta_outside_rejected(digits_model, eta):
    with pytest.raises(ValueError):
        digits_model.forward_early_exit(torch.randn(1, 3, 112, 112), eta)


def test_bad_options_rejected():
    with pytest.raises(ValueError):
        timm.create_model("lfvit_vit_digits_patch8_112", region_size=8)
    with pytest.raises(ValueError):
        timm.create_model("lfvit_vit_digits_patch8_112", alpha=0.0)
    with pytest.raises(ValueError):
        timm.create_model("lfvit_vit_digits_patch8_112", region_mode="best")


def test_fused_and_explicit_attention_agree(digits_model):
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        z = digits_model(x)
        rec = digits_model.record
        for blk in digits_model.blocks:
            blk.attn.fused_attn = False
        try:
            z2 = digits_model(x)
        finally:
            for blk in digits_model.blocks:
                blk.attn.fused_attn = True
    torch.testing.assert_close(digits_model.record.gca, rec.gca, rtol=1e-5, atol=1e-6)
    assert torch.equal(digits_model.record.cells, rec.cells)
    torch.testing.assert_close(z2.focus, z.focus, rtol=1e-4, atol=1e-5)


def test_whole_image_focus_equals_dense_backbone():
    """With region selection off and a zero fusion MLP, the focus stage is exactly the dense ViT."""
    dense = VisionTransformer(img_size=112, patch_size=8, embed_dim=64, depth=12, num_heads=2, num_classes=10).eval()
    model = timm.create_model("lfvit_vit_digits_patch8_112", region_selection=False).eval()
    left = init_from_backbone(model, dense.state_dict())
    assert left == sorted(k for k in model.state_dict() if k.startswith("reuse_block"))
    torch.nn.init.zeros_(model.reuse_block[1].fc2.weight)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(model(x).focus, dense(x), rtol=1e-5, atol=1e-5)
        model.whole_image_pos_embed = False  # released whole-image phase: no positional embedding
        assert not torch.allclose(model(x).focus, dense(x))
    assert block_token_counts(model, x, model) == [50, 197]


def test_official_layout_round_trip(tmp_path, digits_model):
    state = digits_model.state_dict()
    official = to_official(state)
    assert "pos_embed_list.0" in official and "pos_embed_list.1" in official and "pos_embed" not in official
    assert official["pos_embed_list.0"].shape == (1, 50, 64) and official["pos_embed_list.1"].shape == (1, 197, 64)
    assert {k for k in official if k.startswith("reuse_block")} == {
        "reuse_block.0.weight", "reuse_block.0.bias", "reuse_block.1.fc1.weight", "reuse_block.1.fc1.bias",
        "reuse_block.1.fc2.weight", "reuse_block.1.fc2.bias"}
    torch.save({"model": {"module." + k: v for k, v in official.items()}, "epoch": 3}, tmp_path / "official.pth")
    fresh = timm.create_model("lfvit_vit_digits_patch8_112").eval()
    load_lfvit_checkpoint(fresh, tmp_path / "official.pth")
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).focus, digits_model(x).focus)
    assert convert([str(tmp_path / "official.pth"), str(tmp_path / "ours.safetensors"), "--to", "lfvit"]) == 0
    assert convert([str(tmp_path / "ours.safetensors"), str(tmp_path / "back.pth"), "--to", "official"]) == 0
    back = torch.load(tmp_path / "back.pth", weights_only=True)["model"]
    assert set(back) == set(official) and all(torch.equal(back[k], official[k]) for k in back)
    assert from_official(back).keys() == state.keys()


def test_wrong_checkpoint_rejected(tmp_path):
    g9 = timm.create_model("lfvit_deit_small_patch16_288", depth=4, embed_dim=48, num_heads=2)
    torch.save(g9.state_dict(), tmp_path / "g9.pth")
    g7 = timm.create_model("lfvit_deit_small_patch16_224", depth=4, embed_dim=48, num_heads=2)
    with pytest.raises(ValueError, match="pos_embed"):
        load_lfvit_checkpoint(g7, tmp_path / "g9.pth")
    with pytest.raises(FileNotFoundError):
        load_lfvit_checkpoint(g7, tmp_path / "missing.pth")


def test_released_flops_figures():
    m5 = timm.create_model("lfvit_deit_small_patch16_224")
    s = stage_flops(m5)
    assert math.isclose(s.location, 1.101957888, abs_tol=1e-9)
    assert abs(s.cumulative - 3.810416256) < 0.01 and s.focus_tokens == 116
    assert abs(dense_gflops(m5) - 4.6) < 0.05
    assert abs(stage_flops(timm.create_model("lfvit_deit_small_patch16_224", region_size=6)).cumulative
               - 4.521303936) < 0.01
    assert math.isclose(stage_flops(timm.create_model("lfvit_deit_small_patch16_288", region_size=6)).location,
                        1.831336704, abs_tol=1e-9)
    assert abs(s.expected(0.22) - 1.70) < 0.01  # Table 2, m 5 / eta 0.47 operating point


def test_flops_match_flop_counter(digits_model):
    s = stage_flops(digits_model, layernorm=False)
    x = torch.randn(1, 3, 112, 112)
    loc = flop_counter_gmacs(lambda t: digits_model.localize(digits_model.downsample(t)), x)
    both = flop_counter_gmacs(digits_model, x)
    # FlopCounterMode also sees the CLS-row attention and the nearest/gather ops; the CLS rows cost 9 x N x D
    extra = 9 * 50 * 64 / 1e9
    assert abs(loc - s.location - extra) < 2e-4 * s.location
    assert abs(both - s.cumulative - extra) < 2e-4 * s.cumulative
