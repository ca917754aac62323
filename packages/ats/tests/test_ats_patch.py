import copy

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import ats
from ats import patch, sampling
from vitbench.testing import tiny_vit

CONFIGS = [
    dict(mode="official"),  # released configuration: blocks 3..11, every K = N
    dict(mode="official", rho=0.72),
    dict(mode="paper", rho=0.87),
    dict(mode="official", stages=[3], k=20),
    dict(mode="official", variant="topk", rho=0.8),
    dict(mode="official", variant="self_attention", rho=0.9),
    dict(mode="paper", variant=("no_vnorm", "random_row"), rho=0.9),
    dict(mode="official", variant=("self_attention", "cls_not_enforced"), stages=[3], k=30),
]


def run(model, x):
    with torch.inference_mode():
        return model(x)


@pytest.mark.parametrize("fused", [True, False])
def test_no_stage_equals_timm(images, fused):
    model = tiny_vit()
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    ref = run(model, images)
    keys = list(model.state_dict())
    ats.apply(model, stages=[])
    torch.testing.assert_close(run(model, images), ref)
    assert list(model.state_dict()) == keys  # pretrained weights load unchanged
    assert model.record.token_counts()[1].eq(50).all()


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_batch_invariance(images, cfg):
    """Each image's kept tokens and logits equal running that image alone."""
    assert_each_alone_equals_batch(ats.apply(tiny_vit(), **cfg), images)


def assert_each_alone_equals_batch(model, inputs):
    """Every input run alone gives the logits (to 1e-5), kept tokens and token counts it gets in the batch."""
    logits = run(model, inputs)
    info = model.record
    kept = {b: info.kept_indices(b) for b in info.config.stages}
    counts = info.token_counts()[1]
    for i in range(inputs.shape[0]):
        torch.testing.assert_close(run(model, inputs[i : i + 1]), logits[i : i + 1], atol=1e-5, rtol=1e-5)
        for b in info.config.stages:
            assert torch.equal(info.kept_indices(b)[0], kept[b][i])
        assert torch.equal(info.token_counts()[1][0], counts[i])


@pytest.mark.parametrize("cfg", CONFIGS[:5], ids=str)
def test_cls_kept_counts_bounded_and_adaptive(images, cfg):
    model = ats.apply(tiny_vit(), **cfg)
    run(model, images)
    info = model.record
    n_in, n_out = info.token_counts()
    for j, b in enumerate(info.config.stages):
        for i, kept in enumerate(info.kept_indices(b)):
            assert kept[0] == 0  # CLS kept and first
            assert kept.unique().numel() == kept.numel() and kept.max() < 50
            assert kept.numel() == n_out[i, b]
            assert n_out[i, b] <= sampling.stage_k(int(n_in[i, b]), info.config.k[j])  # K'+1 <= K
    if "stages" not in cfg and "variant" not in cfg:
        assert n_out[:, -1].min() < n_out[:, -1].max()  # K' adapts to the image


def test_kept_tokens_are_a_chain_of_subsets(images):
    model = ats.apply(tiny_vit(), rho=0.9)
    run(model, images)
    info = model.record
    for i in range(images.shape[0]):
        prev = set(range(50))
        for b in range(3, 12):
            cur = set(info.kept_indices(b)[i].tolist())
            assert cur <= prev
            prev = cur


def test_topk_variant_keeps_plain_topk_of_cls_scores(images):
    """Single stage: the top-K variant keeps the K-1 tokens with the highest CLS-attention x ||V|| score."""
    model = ats.apply(tiny_vit(), stages=[3], k=12, variant="topk")
    run(model, images)
    kept = model.record.kept_indices(3)
    dense = tiny_vit()
    feats = {}
    dense.blocks[3].register_forward_pre_hook(lambda m, a: feats.setdefault("x", a[0]))
    run(dense, images)
    attn = dense.blocks[3].attn
    with torch.inference_mode():
        B, N, C = feats["x"].shape
        qkv = attn.qkv(dense.blocks[3].norm1(feats["x"])).reshape(B, N, 3, 2, C // 2).permute(2, 0, 3, 1, 4)
        a = ((qkv[0][:, :, :1] @ qkv[1].transpose(-2, -1)) * attn.scale).softmax(-1).squeeze(2).sum(1)
        s = (a * qkv[2].transpose(1, 2).reshape(B, N, C).norm(dim=-1))[:, 1:]
    for i in range(B):
        assert torch.equal(kept[i][1:], s[i].topk(11).indices + 1)


def test_determinism(images):
    model = ats.apply(tiny_vit(), mode="paper", rho=0.8)
    a = run(model, images)
    ka = model.record.kept_indices(7)
    b = run(model, images)
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ka, model.record.kept_indices(7)))


def test_modes_differ_and_smaller_k_prunes_more(images):
    model = ats.apply(tiny_vit(), rho=0.9)
    run(model, images)
    off = model.record.token_counts()[1].float().mean()
    ats.apply(model, rho=0.5)
    run(model, images)
    assert model.record.token_counts()[1].float().mean() < off
    ats.apply(model, rho=0.9, mode="paper")
    run(model, images)
    assert model.record.token_counts()[1].float().mean() != off


def test_released_geometry_grid_of_196_points():
    """14x14 grid: with K = N every stage samples 196 grid points, so an image keeps <= N-1 tokens."""
    model = ats.apply(tiny_vit(img_size=112))
    torch.manual_seed(0)
    run(model, torch.randn(2, 3, 112, 112))
    n_in, n_out = model.record.token_counts()
    assert n_in[0, 3] == 197 and (n_out[:, 3:] < n_in[:, 3:]).all()


def test_training_backward_flows_through_kept_rows(images):
    model = ats.apply(tiny_vit(drop_path_rate=0.1), rho=1.0).train()
    out = model(images)
    out.logsumexp(-1).sum().backward()
    assert model.blocks[11].mlp.fc1.weight.grad.abs().sum() > 0
    assert model.blocks[3].attn.qkv.weight.grad.abs().sum() > 0
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_works_with_layerscale_and_no_embed_class(images):
    model = tiny_vit(init_values=0.1, no_embed_class=True)
    ats.apply(model, rho=0.8)
    logits = run(model, images)
    torch.testing.assert_close(run(model, images[:1]), logits[:1], atol=1e-5, rtol=1e-5)


def test_rejects_unsupported_models_and_settings():
    with pytest.raises(ValueError, match="prefix"):
        ats.apply(timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, depth=2))
    with pytest.raises(ValueError, match="prefix"):
        ats.apply(VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2,
                                    class_token=False, global_pool="avg"))
    model = tiny_vit()
    with pytest.raises(ValueError, match="rho or k"):
        ats.apply(model, rho=0.5, k=10)
    with pytest.raises(ValueError, match="rho must be"):
        ats.apply(model, rho=1.5)
    with pytest.raises(ValueError, match="outside"):
        ats.apply(model, stages=[12])
    with pytest.raises(ValueError, match="variant"):
        ats.apply(model, variant="nope")
    with pytest.raises(ValueError, match="mode"):
        ats.apply(model, mode="nope")


@pytest.mark.parametrize("mode", ["official", "paper"])
def test_extreme_pruning_down_to_the_cls(images, mode):
    """Very peaked attention: official mode's three-token quirk leaves only the CLS; later stages cope."""
    model = ats.apply(tiny_vit(peak=30), stages=range(1, 12), mode=mode)
    logits = run(model, images)
    n_out = model.record.token_counts()[1]
    assert torch.isfinite(logits).all()
    assert n_out[:, -1].min() == (1 if mode == "official" else 2)
    assert all(k[0] == 0 for k in model.record.kept_indices(11))


@pytest.mark.parametrize("start", [0, 2, 3])
def test_resuming_from_dense_hidden_states_equals_the_full_forward(images, start):
    """Skipping the dense blocks before the first ATS stage with their hidden states (possibly computed on the
    unpatched model) gives the same logits, kept tokens and token counts."""
    dense = tiny_vit()
    model = ats.apply(copy.deepcopy(dense), rho=0.8)
    ref = run(model, images)
    ref_info = (model.record.token_counts(), {b: model.record.kept[b].clone() for b in range(3, 12)})
    with torch.inference_mode():
        hidden = patch.dense_hidden(dense, images, start)
        out = model.forward_head(model.forward_features(images, hidden=hidden, start=start))
    assert torch.equal(out, ref)
    counts, kept = ref_info
    assert all(torch.equal(a, b) for a, b in zip(model.record.token_counts(), counts))
    assert all(torch.equal(model.record.kept[b], kept[b]) for b in kept)
    with pytest.raises(ValueError, match="before the first ATS stage"):
        model.forward_features(images, hidden=patch.dense_hidden(dense, images, 4), start=4)
