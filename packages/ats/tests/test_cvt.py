"""CvT on timm layers (ats.backbones.cvt): equal to HuggingFace's CvtForImageClassification, both checkpoint layouts,
the ``linear`` stage 3 as plain timm blocks, and the analytic FLOPs against FlopCounterMode and the paper."""

import pytest
import timm
import torch
from timm.layers import Attention, QuickGELU
from timm.models.vision_transformer import Block
from torch import nn
from vitbench.flops import flop_counter_gmacs
from vitbench.testing import spread_weights

import ats  # noqa: F401  (registers the CvT models with timm)
from ats.backbones.cvt import (CvT, CvTGeometry, ConvBlock, convert_state_dict, cvt_gmacs, fold_projections,
                               load_cvt_state, official_to_hf)

NAMES = ("cvt_13_224", "cvt_21_224", "cvt_13_384", "cvt_21_384")
DEPTHS = {13: [1, 2, 10], 21: [1, 4, 16]}
# Measured with FlopCounterMode on HF's CvtForImageClassification (no norms), and with LayerNorm (5 per element,
# final norm on the CLS token); the paper's Table 1: 4.5 / 7.1 / 16.3 / 24.9.
REFERENCE = {"cvt_13_224": (4.566, 4.581, 5.227), "cvt_21_224": (7.178, 7.200, 8.233),
             "cvt_13_384": (16.269, 16.313, 19.471), "cvt_21_384": (24.849, 24.914, 29.968)}


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers", reason="the HuggingFace CvT is the reference implementation")


def hf_model(transformers, depth: int, num_classes: int = 10) -> nn.Module:
    config = transformers.CvtConfig(depth=DEPTHS[depth], num_labels=num_classes, drop_path_rate=[0.0, 0.0, 0.0])
    return spread_weights(transformers.CvtForImageClassification(config))


@pytest.mark.parametrize("depth,size", [(13, 224), (21, 224), (13, 384), (21, 384)])
def test_logits_equal_huggingface(transformers, depth, size):
    hf = hf_model(transformers, depth)
    ours = timm.create_model(f"cvt_{depth}_{size}", num_classes=10, activation="gelu").eval()
    ours.load_state_dict(convert_state_dict(hf.state_dict()))
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = hf(x).logits, ours(x)
    assert expected.std() > 0.1  # logits that carry the weights, not a constant
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_the_equivalence_sees_the_attention_scale_and_the_activation(transformers):
    hf = hf_model(transformers, 13)
    x = torch.randn(1, 3, 224, 224)
    quick = CvT(num_classes=10).eval()  # QuickGELU, as the official code; HF's port runs GELU
    quick.load_state_dict(convert_state_dict(hf.state_dict()))
    ours = CvT(num_classes=10, activation="gelu").eval()
    ours.load_state_dict(convert_state_dict(hf.state_dict()))
    for blk in ours.stage2.blocks:
        blk.attn.scale = (384 // 6) ** -0.5  # the head-width scale, which CvT does not use
    with torch.no_grad():
        expected = hf(x).logits
        assert (ours(x) - expected).abs().max() > 1e-3
        assert (quick(x) - expected).abs().max() > 1e-3


def test_official_and_huggingface_layouts_round_trip(transformers):
    hf = hf_model(transformers, 21)
    hf_state = hf.state_dict()
    official = convert_state_dict(hf_state)  # the official names (= ours for dw_bn)
    assert set(official) == set(CvT(depths=(1, 4, 16), num_classes=10).state_dict())
    assert "stage2.blocks.15.attn.conv_proj_q.conv.weight" in official and "stage2.cls_token" in official
    again = convert_state_dict({f"module.{k}": v for k, v in official.items()})  # an official DDP checkpoint
    assert again.keys() == official.keys() and all(torch.equal(again[k], official[k]) for k in official)
    exported = {official_to_hf(k): v for k, v in official.items()}
    assert exported.keys() == hf_state.keys() and all(torch.equal(exported[k], hf_state[k]) for k in hf_state)
    hf.load_state_dict(exported)  # strict


def test_unknown_and_missing_keys_are_refused_by_name():
    state = CvT(num_classes=10).state_dict()
    with pytest.raises(ValueError, match=r"stage2\.blocks\.0\.attn\.extra\.weight"):
        convert_state_dict({**state, "stage2.blocks.0.attn.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"stage1\.blocks\.1\.norm2\.bias"):
        convert_state_dict({k: v for k, v in state.items() if k != "stage1.blocks.1.norm2.bias"})
    hf_like = {"cvt.encoder.stages.0.embedding.convolution_embeddings.projection.weight": torch.zeros(1),
               "cvt.encoder.stages.0.layers.0.attention.attention.unknown.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"cvt\.encoder\.stages\.0\.layers\.0\.attention\.attention\.unknown"):
        convert_state_dict(hf_like)
    with pytest.raises(ValueError, match="not a CvT state dict"):
        convert_state_dict({"blocks.0.attn.qkv.weight": torch.zeros(1)})
    state.pop("stage0.blocks.0.attn.conv_proj_q.bn.num_batches_tracked")  # unused in evaluation: filled with 0
    assert convert_state_dict(state)["stage0.blocks.0.attn.conv_proj_q.bn.num_batches_tracked"] == 0


def test_registered_models():
    for name in NAMES:
        model = timm.create_model(name, num_classes=7)
        size = int(name[-3:])
        assert model.num_classes == 7 and model.img_size == size and model.pretrained_cfg["input_size"] == (3, size,
                                                                                                             size)
        assert len(model.stage2.blocks) == (10 if "13" in name else 16)
    params = [sum(p.numel() for p in timm.create_model(n).parameters()) / 1e6 for n in ("cvt_13_224", "cvt_21_224")]
    assert params == pytest.approx([20.0, 31.6], abs=0.05)  # the paper's 20 M and 32 M
    with pytest.raises(FileNotFoundError, match="no weights are shipped"):
        timm.create_model("cvt_13_224", pretrained=True)
    with pytest.raises(ValueError, match="projection"):
        CvT(projection="avg")


def test_stage3_linear_is_plain_timm_blocks_with_the_whole_width_scale():
    model = CvT(num_classes=10, projection="linear", activation="gelu").eval()
    assert all(type(b) is ConvBlock for s in (model.stage0, model.stage1) for b in s.blocks)
    for blk in model.stage2.blocks:
        assert type(blk) is Block and type(blk.attn) is Attention and isinstance(blk.mlp.act, nn.GELU)
        assert blk.attn.scale == 384**-0.5
    attn = spread_weights(model.stage2.blocks[0].attn)
    x = torch.randn(2, 197, 384)
    q, k, v = attn.qkv(x).view(2, 197, 3, 6, 64).permute(2, 0, 3, 1, 4)
    o = ((q @ k.transpose(-2, -1)) * 384**-0.5).softmax(-1) @ v
    with torch.no_grad():
        torch.testing.assert_close(attn(x), attn.proj(o.transpose(1, 2).reshape(2, 197, 384)))
    assert set(model.state_dict()) - set(CvT(num_classes=10).state_dict()) == {
        f"stage2.blocks.{j}.attn.qkv.{p}" for j in range(10) for p in ("weight", "bias")}


def test_quick_gelu_is_the_default():
    model = CvT(num_classes=10)
    assert all(isinstance(b.mlp.act, QuickGELU) for s in model.stages for b in s.blocks)
    assert all(isinstance(b.mlp.act, nn.GELU) for s in CvT(activation="gelu").stages for b in s.blocks)


def test_any_input_size_trains():
    model = timm.create_model("cvt_13_224", num_classes=3, drop_path_rate=0.1).train()
    out = model(torch.randn(2, 3, 64, 80))
    assert out.shape == (2, 3)
    out.sum().backward()
    assert model.stage0.patch_embed.proj.weight.grad is not None
    assert model.forward_head(model.forward_features(torch.randn(1, 3, 64, 64)), pre_logits=True).shape == (1, 384)


@pytest.mark.parametrize("name", NAMES)
def test_flops_match_flop_counter_and_reference(name):
    dense, with_ln, linear_with_ln = REFERENCE[name]
    for projection in ("dw_bn", "linear"):
        model = timm.create_model(name, projection=projection).eval()
        geom = CvTGeometry.from_model(model)
        analytic = cvt_gmacs(geom, layernorm=False)
        measured = flop_counter_gmacs(model, torch.randn(1, 3, model.img_size, model.img_size))
        assert measured == pytest.approx(analytic, rel=1e-6)
        if projection == "dw_bn":
            assert analytic == pytest.approx(dense, abs=6e-4)
            assert cvt_gmacs(geom, batchnorm=False) == pytest.approx(with_ln, abs=6e-4)
            assert cvt_gmacs(geom) > cvt_gmacs(geom, batchnorm=False)  # BatchNorm at fvcore's 2 per element
        else:
            assert cvt_gmacs(geom, batchnorm=False) == pytest.approx(linear_with_ln, abs=6e-4)


def test_fold_projections_keeps_the_centre_tap_and_batchnorm():
    dw = spread_weights(CvT(num_classes=10))
    state = dw.state_dict()
    for key in state:
        if key.endswith(".conv.weight"):  # centre taps only: at stride 1 (the queries) the fold is exact
            centre = state[key][:, :, 1, 1].clone()
            state[key].zero_()
            state[key][:, :, 1, 1] = centre
    dw.load_state_dict(state)
    linear = CvT(num_classes=10, projection="linear").eval()
    linear.load_state_dict(fold_projections(state))
    x = torch.randn(2, 197, 384)
    src, dst = dw.stage2.blocks[3].attn, linear.stage2.blocks[3].attn
    with torch.no_grad():
        q_dw = src.proj_q(src.conv_proj_q(x[:, 1:].transpose(1, 2).reshape(2, 384, 14, 14)))
        q_linear = dst.qkv(x[:, 1:])[..., :384]
    torch.testing.assert_close(q_linear, q_dw, atol=1e-5, rtol=1e-5)
    loaded = load_cvt_state(CvT(num_classes=10, projection="linear").eval(), state)  # converts and folds
    with torch.no_grad():
        assert torch.isfinite(loaded(torch.randn(1, 3, 224, 224))).all()
