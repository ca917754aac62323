"""PS-ViT on timm layers (ats.backbones.psvit): the sampling op against a loop over the released CUDA kernel's
formulas (forward and backward), outputs pinned to the released model's on seeded weights, the checkpoint layout,
and the analytic FLOPs against FlopCounterMode and the paper."""

import json
import math

import pytest
import timm
import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block
from vitbench.flops import flop_counter_gmacs
from vitbench.testing import spread_weights

import ats  # noqa: F401  (registers the PS-ViT models with timm)
from ats.backbones.psvit import (PSViT, PSViTGeometry, bilinear_sample, convert_state_dict, initial_points,
                                 load_psvit_state, progressive_sample, psvit_gmacs)

# A small PS-ViT (64 px: a 16 x 16 map, 4 x 4 points, 4 sampling iterations and 3 transformer layers, width 32).
TINY = dict(img_size=64, num_points=4, num_classes=5, depth=7, embed_dim=32, num_heads=2, stem_widths=(8, 16),
            stem_inner=8)
# Logits of the released model (yuexy/PS-ViT a63a397, models/ps_vit.py run on CPU, its CUDA op replaced by a
# plain-indexing port of the kernel's formulas) on the weights of randomize(seed 0) and the inputs of inputs():
# the tiny model with the width scale (qk_scale = dim ** -0.5) and with the head-width scale, and the first six
# logits of ps_vit_b_14(qk_scale=384 ** -0.5).
RELEASED = {
    "tiny_width": [[-1.3722678422927856, -1.0150635242462158, -0.5795159339904785, 0.9302303791046143,
                    -0.47297990322113037],
                   [-1.3014017343521118, -1.0347830057144165, -0.5747225284576416, 0.8481030464172363,
                    -0.5266937017440796]],
    "tiny_head": [[-1.3824496269226074, -1.039099931716919, -0.5641318559646606, 0.9482811689376831,
                   -0.4662165641784668],
                  [-1.3012834787368774, -1.0530675649642944, -0.5612524747848511, 0.8478584289550781,
                   -0.5247367024421692]],
    "psvit_b14_224": [[-0.4777790307998657, -0.8601694703102112, 0.46383175253868103, -0.3422088921070099,
                       -0.05196279287338257, -0.36483728885650635],
                      [-0.4850813150405884, -0.8780286908149719, 0.46628621220588684, -0.3500634729862213,
                       -0.06722897291183472, -0.3373940587043762]],
}
RELEASED_B14_SUM = -57.53257369995117  # the sum of all 2 x 1000 logits


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Seeded weights with spread (BatchNorm statistics and norm affines away from identity, offset layers on, so
    that a quarter of the later points leave the map and others sit within a pixel of its border)."""
    return spread_weights(model, seed, keep=("point_coord",))  # the fixed initial sampling grid


def inputs(size: int, seed: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def released_layout(state: dict) -> dict:
    """Our state dict as the released model saves it: ``module.`` (DDP) and the tied ``position_layer`` copies."""
    out = {f"module.{k}": v for k, v in state.items()}
    iters = {int(k.split(".")[1]) for k in state if k.startswith("ps_layers.")}
    for i in iters:
        out.update({f"module.ps_layers.{i}.position_layer.{p}": state[f"pos_layer.{p}"] for p in ("weight", "bias")})
    return out


# ------------------------------------------------------------------------------------------------- the sampling op
def kernel_forward_loop(feat, coords):
    """``bilinear_interpolate`` of the released ``cuda_helper.hpp``, one value at a time."""
    B, C, H, W = feat.shape
    out = torch.zeros(B, coords.shape[1], C, dtype=feat.dtype)
    for b in range(B):
        for p in range(coords.shape[1]):
            h, w = float(coords[b, p, 0]), float(coords[b, p, 1])
            if h <= -1 or h >= H or w <= -1 or w >= W:
                continue
            hl, wl = math.floor(h), math.floor(w)
            lh, lw = h - hl, w - wl
            for yy, xx, wt in ((hl, wl, (1 - lh) * (1 - lw)), (hl, wl + 1, (1 - lh) * lw),
                               (hl + 1, wl, lh * (1 - lw)), (hl + 1, wl + 1, lh * lw)):
                if 0 <= yy <= H - 1 and 0 <= xx <= W - 1:
                    out[b, p] += wt * feat[b, :, yy, xx]
    return out


def kernel_backward_loop(grad, feat, coords, gamma):
    """``progressive_sampling_backward_cuda_kernel`` with ``bilinear_interpolate_gradient``, one point at a time."""
    B, C, H, W = feat.shape
    d_feat, d_off = torch.zeros_like(feat), torch.zeros(coords.shape, dtype=feat.dtype)
    for b in range(B):
        for p in range(coords.shape[1]):
            y, x = float(coords[b, p, 0]), float(coords[b, p, 1])
            if y <= -1 or y >= H or x <= -1 or x >= W:
                continue
            y, x = max(y, 0.0), max(x, 0.0)
            yl, xl = int(y), int(x)
            yl, yh, y = (H - 1, H - 1, float(H - 1)) if yl >= H - 1 else (yl, yl + 1, y)
            xl, xh, x = (W - 1, W - 1, float(W - 1)) if xl >= W - 1 else (xl, xl + 1, x)
            ly, lx = y - yl, x - xl
            g = grad[b, p]
            for yy, xx, wt in ((yl, xl, (1 - ly) * (1 - lx)), (yl, xh, (1 - ly) * lx), (yh, xl, ly * (1 - lx)),
                               (yh, xh, ly * lx)):
                d_feat[b, :, yy, xx] += g * wt
            i00, i10, i01, i11 = (feat[b, :, yy, xx] for yy, xx in ((yl, xl), (yl, xh), (yh, xl), (yh, xh)))
            d_off[b, p, 1] = gamma * (g * (i11 * (y - yl) + i10 * (yh - y) + i01 * (yl - y) + i00 * (y - yh))).sum()
            d_off[b, p, 0] = gamma * (g * (i11 * (x - xl) + i01 * (xh - x) + i10 * (xl - x) + i00 * (x - xh))).sum()
    return d_feat, d_off


def sample_points(H: int, W: int) -> torch.Tensor:
    """Corners, borders, integer pixels, the open border strips (-1, 0) and (size - 1, size), points outside (on
    -1 and size exactly, and beyond) and random ones; ``[2, N, 2]`` (y, x)."""
    edges = [-1.5, -1.0, -0.999, -0.5, 0.0, 0.25, 1.0, H - 1.5, H - 1.0, H - 0.75, H - 0.001, H, H + 0.5]
    fixed = torch.tensor([(y, x) for y in edges for x in (-0.5, 0.0, 2.5, W - 1.0, W - 0.25, W)], dtype=torch.float64)
    rand = torch.rand(40, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    rand = rand * torch.tensor([H + 3.0, W + 3.0], dtype=torch.float64) - 1.5
    return torch.stack([torch.cat([fixed, rand]), torch.cat([rand, fixed])])


def test_forward_is_the_kernel_formula_at_corners_borders_and_outside():
    H, W = 5, 7
    feat = torch.randn(2, 3, H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    coords = sample_points(H, W)
    expected = kernel_forward_loop(feat, coords)
    torch.testing.assert_close(bilinear_sample(feat, coords), expected, atol=1e-12, rtol=0)
    assert (expected == 0).all(-1).sum() > 20 and (expected != 0).all(-1).sum() > 50  # both kinds of points
    got32 = bilinear_sample(feat.float(), coords.float())
    torch.testing.assert_close(got32.double(), expected, atol=2e-6, rtol=0)


@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_backward_is_the_kernel_formula_and_autograd_differs_only_at_the_border(gamma):
    H, W = 5, 7
    g = torch.Generator().manual_seed(1)
    feat = torch.randn(2, 3, H, W, dtype=torch.float64, generator=g, requires_grad=True)
    coords = sample_points(H, W)
    offset = (torch.rand(coords.shape, generator=g, dtype=torch.float64) - 0.5)
    point = coords - gamma * offset  # sampling at point + gamma * offset == coords
    grad = torch.randn(2, coords.shape[1], 3, dtype=torch.float64, generator=g)
    grads = {}
    for mode in ("kernel", "autograd"):
        off = offset.clone().requires_grad_(True)
        feat.grad = None
        progressive_sample(feat, point, off, gamma, backward=mode).backward(grad)
        grads[mode] = feat.grad.clone(), off.grad.clone()
    d_feat, d_off = kernel_backward_loop(grad, feat.detach(), point + gamma * offset, gamma)
    torch.testing.assert_close(grads["kernel"][0], d_feat, atol=1e-10, rtol=0)
    torch.testing.assert_close(grads["kernel"][1], d_off, atol=1e-10, rtol=0)
    c = point + gamma * offset
    inner = ((c[..., 0] >= 0) & (c[..., 0] < H - 1) & (c[..., 1] >= 0) & (c[..., 1] < W - 1))
    inner &= ((c - c.round()).abs() > 1e-6).all(-1)  # off the kinks (whole pixels), where the slope jumps and
    # grid_sample's normalisation round trip may land on either side
    torch.testing.assert_close(grads["autograd"][1][inner], d_off[inner], atol=1e-10, rtol=0)
    assert (grads["autograd"][1][~inner] - d_off[~inner]).abs().max() > 1e-2  # the kernel clamps at the border


def test_initial_points_are_cell_centres_x_major():
    p = initial_points(56, 14)
    assert p.shape == (1, 196, 2)
    assert p[0, 0].tolist() == [2.0, 2.0] and p[0, 1].tolist() == [6.0, 2.0] and p[0, 14].tolist() == [2.0, 6.0]


# ----------------------------------------------------------------------------------------- the released model's outputs
@pytest.mark.parametrize("scale", ["width", "head"])
def test_tiny_outputs_are_the_released_models(scale):
    model = randomize(PSViT(**TINY, attn_scale=scale))
    with torch.no_grad():
        out = model(inputs(64, 1))
    torch.testing.assert_close(out, torch.tensor(RELEASED[f"tiny_{scale}"]), atol=1e-5, rtol=0)
    other = torch.tensor(RELEASED[f"tiny_{'head' if scale == 'width' else 'width'}"])
    assert (out - other).abs().max() > 1e-3  # the pin sees the attention scale


def test_psvit_b14_outputs_are_the_released_models():
    model = randomize(timm.create_model("psvit_b14_224"))
    x = inputs(224, 2)
    with torch.no_grad():
        out = model(x)
        assert float(out.sum()) == pytest.approx(RELEASED_B14_SUM, abs=2e-3)
        torch.testing.assert_close(out[:, :6], torch.tensor(RELEASED["psvit_b14_224"]), atol=1e-5, rtol=0)


def test_offsets_move_the_points_and_gradients_reach_the_offset_layers():
    model = randomize(PSViT(**TINY)).train()
    out = model(inputs(64, 1))
    out.square().sum().backward()
    for layer in model.ps_layers[:-1]:
        assert layer.offset_layer.weight.grad.abs().sum() > 0
    assert model.ps_layers[-1].offset_layer is None


# ------------------------------------------------------------------------------------------------ checkpoint layout
def test_the_released_layout_loads_and_round_trips():
    src = randomize(PSViT(**TINY))
    state = released_layout(src.state_dict())
    assert "module.ps_layers.2.position_layer.weight" in state and "module.point_coord" in state
    converted = convert_state_dict(state)
    assert set(converted) == set(src.state_dict())
    dst = load_psvit_state(PSViT(**TINY).eval(), state)
    x = inputs(64, 1)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), atol=0, rtol=0)
    state.pop("module.stem.1.num_batches_tracked")  # unused in evaluation: filled with 0
    assert convert_state_dict(state)["stem.1.num_batches_tracked"] == 0


def test_unknown_missing_and_foreign_keys_are_refused_by_name():
    state = released_layout(PSViT(**TINY).state_dict())
    with pytest.raises(ValueError, match=r"unknown keys \['trans_layers\.0\.attn\.qkv\.bias'\]"):
        convert_state_dict({**state, "trans_layers.0.attn.qkv.bias": torch.zeros(96)})
    with pytest.raises(ValueError, match=r"unknown keys \['blocks\.0\.attn\.qkv\.weight'\]"):
        convert_state_dict({**state, "blocks.0.attn.qkv.weight": torch.zeros(1)})
    tied = dict(state)
    tied["module.ps_layers.1.position_layer.bias"] = tied["module.ps_layers.1.position_layer.bias"] + 1
    with pytest.raises(ValueError, match=r"ps_layers\.1\.position_layer\.bias differs from pos_layer\.bias"):
        convert_state_dict(tied)
    with pytest.raises(ValueError, match=r"missing keys \['norm\.bias'\]"):
        load_psvit_state(PSViT(**TINY), {k: v for k, v in state.items() if k != "module.norm.bias"})
    with pytest.raises(ValueError, match=r"point_coord: checkpoint \(1, 25, 2\) vs model \(1, 16, 2\)"):
        load_psvit_state(PSViT(**TINY), released_layout(PSViT(**{**TINY, "num_points": 5}).state_dict()))
    with pytest.raises(ValueError, match="are not this 96 px model's"):
        load_psvit_state(PSViT(**{**TINY, "img_size": 96}), state)


# ------------------------------------------------------------------------------------------------------ the models
def test_registered_models_and_options():
    b18 = timm.create_model("psvit_b18_224", num_classes=7)
    assert b18.num_points == 18 and b18.pretrained_cfg["input_size"] == (3, 224, 224)
    assert sum(p.numel() for p in b18.parameters()) == 21_344_302 - 993 * 384 - 993  # 1000 -> 7 classes
    assert b18.point_coord.shape == (1, 324, 2) and len(b18.blocks) == 10
    model = timm.create_model("psvit_b14_224")
    assert model.point_coord.shape == (1, 196, 2) and model.num_classes == 1000
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(21.3, abs=0.05)  # Table 1's 21.3 M
    for blk in [*model.blocks, *(layer.transformer_layer for layer in model.ps_layers)]:
        assert type(blk) is Block and type(blk.attn) is Attention and blk.attn.qkv.bias is None
        assert blk.attn.scale == 384**-0.5 and not blk.attn.fused_attn and blk.norm1.eps == 1e-5
        assert blk.mlp.fc1.out_features == 1152
    assert PSViT(**TINY, attn_scale="head").blocks[0].attn.scale == 16**-0.5  # 32 wide, 2 heads
    with pytest.raises(FileNotFoundError, match="no weights are shipped"):
        timm.create_model("psvit_b14_224", pretrained=True)
    with pytest.raises(ValueError, match="attn_scale"):
        PSViT(attn_scale="dim")
    with pytest.raises(ValueError, match="takes 64 x 64 px images"):
        PSViT(**TINY)(torch.zeros(1, 3, 32, 32))
    assert model.forward_head(torch.zeros(1, 197, 384), pre_logits=True).shape == (1, 384)


# ----------------------------------------------------------------------------------------------------------- FLOPs
@pytest.mark.parametrize("name,paper", [("psvit_b14_224", 5.4), ("psvit_b18_224", 8.8)])
def test_flops_match_flop_counter_and_the_paper(name, paper):
    model = timm.create_model(name).eval()
    geom = PSViTGeometry.from_model(model)
    measured = flop_counter_gmacs(model, torch.randn(1, 3, 224, 224))
    assert psvit_gmacs(geom, layernorm=False) == pytest.approx(measured, rel=1e-9)
    assert abs(model.gmacs() / paper - 1) < 0.02  # LayerNorm and BatchNorm counted as fvcore
    assert model.gmacs() > psvit_gmacs(geom, batchnorm=False) > measured


def test_tiny_flops_match_flop_counter():
    model = PSViT(**TINY).eval()
    measured = flop_counter_gmacs(model, torch.randn(1, 3, 64, 64))
    assert model.gmacs(layernorm=False) == pytest.approx(measured, rel=1e-9)
    with pytest.raises(ValueError, match="only its own 64 px"):
        model.gmacs(96)


def test_vitbench_flops_counts_psvit(tmp_path, capsys):
    from vitbench.flops import main  # the console script's entry point

    out = tmp_path / "f.json"
    assert main(["--model", "psvit_b14_224", "--no-cross-check", "--json", str(out)]) == 0  # cross-check: above
    result = json.loads(out.read_text())
    assert result["counted_by"] == "PSViT.gmacs" and result["img_size"] == 224
    assert result["gmacs"] == pytest.approx(5.402, abs=1e-3) and abs(result["gmacs"] / 5.4 - 1) < 0.02
    assert main(["--model", "psvit_b14_224", "--img-size", "256", "--no-cross-check"]) == 2
    assert "PS-ViT takes only its own 224 px" in capsys.readouterr().err
