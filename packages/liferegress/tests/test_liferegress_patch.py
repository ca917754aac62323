import pytest
import timm
import torch
from timm.layers import set_fused_attn
from timm.models.vision_transformer import VisionTransformer

import liferegress
from liferegress.life import keep_schedule


def _patched(make_vit, **kwargs):
    model = make_vit()
    liferegress.apply(model, **kwargs)
    torch.nn.init.normal_(model.life_predictor.W)
    return model


@pytest.mark.parametrize("rho", [0.9, 0.8, 0.7])
def test_hard_mode_counts_exact(make_vit, images, rho):
    model = _patched(make_vit, keep_rate=rho)
    with torch.no_grad():
        logits = model(images)
    info = model.record
    assert logits.shape == (3, 10) and info.mode == "hard"
    assert info.lives.shape == (3, 197) and torch.all(info.lives[:, 0] == 12)
    assert tuple(k.shape[1] for k in info.kept_indices) == keep_schedule(rho)
    assert info.tokens_per_block[:4] == (197,) * 4 and info.tokens_per_block[-1] == keep_schedule(rho)[-1]
    for k in info.kept_indices:
        assert torch.all(k[:, 0] == 0)
        assert all(len(set(row.tolist())) == len(row) for row in k)
    # kept tokens are those with the longest lives, nested across drop layers
    for b in range(3):
        n = info.kept_indices[-1].shape[1]
        top = set(torch.argsort(info.lives[b, 1:], descending=True)[: n - 1].add(1).tolist())
        assert set(info.kept_indices[-1][b, 1:].tolist()) == top
        assert set(info.kept_indices[2][b].tolist()) <= set(info.kept_indices[1][b].tolist())


def test_auto_mode_soft_in_training(make_vit, images):
    model = _patched(make_vit)
    model.train()
    model(images)
    assert model.record.mode == "soft" and model.record.kept_indices is None
    liferegress.set_mode(model, "hard")
    model(images)
    assert model.record.mode == "hard"
    with pytest.raises(ValueError, match="mode"):
        liferegress.set_mode(model, "sometimes")


@pytest.mark.parametrize("fused", [True, False])
def test_no_reduction_equals_vanilla(make_vit, images, fused):
    """keep rate 1: all lives equal T, so soft weights are uniform per block and nothing is pruned."""
    set_fused_attn(fused)
    try:
        vanilla = make_vit()
        for blk in vanilla.blocks:
            blk.attn.fused_attn = fused
        model = make_vit()
        model.load_state_dict(vanilla.state_dict())
        for blk in model.blocks:
            blk.attn.fused_attn = fused
        liferegress.apply(model, keep_rate=1.0)
        with torch.no_grad():
            ref = vanilla(images)
            for mode in ("hard", "soft", "mask"):
                liferegress.set_mode(model, mode)
                torch.testing.assert_close(model(images), ref, atol=1e-5, rtol=1e-5)
    finally:
        set_fused_attn(True)


def test_hard_pruning_equals_step_weights_when_kept_sets_coincide(make_vit, images, monkeypatch):
    """W and lives fixed so that exactly n(a) tokens have tau > a in each block: hard == 0/1 soft weights at CLS."""
    model = _patched(make_vit, keep_rate=0.7)
    g = torch.Generator().manual_seed(3)
    lives = torch.empty(3, 197)
    for b in range(3):
        perm = torch.randperm(196, generator=g) + 1
        lives[b, 0] = 12.0
        lives[b, perm[:71]] = 12.0 + torch.rand(71, generator=g)  # kept to the end (72 incl. CLS)
        lives[b, perm[71:99]] = 9.2 + 0.7 * torch.rand(28, generator=g)  # dropped at block 10
        lives[b, perm[99:139]] = 6.2 + 0.7 * torch.rand(40, generator=g)  # dropped at block 7
        lives[b, perm[139:]] = 3.9 * torch.rand(57, generator=g)  # dropped at block 4
    monkeypatch.setattr(model.life_predictor, "forward", lambda x, cfg: lives.clone())
    with torch.no_grad():
        hard = model(images)
        kept = model.record.kept_indices
        liferegress.set_mode(model, "mask")
        masked = model(images)
    torch.testing.assert_close(hard, masked, atol=1e-5, rtol=1e-5)
    for k, a in zip(kept, (4, 7, 10)):
        assert torch.equal(torch.sort(k, 1).values, torch.stack([torch.nonzero(row > a).squeeze(1) for row in lives]))


def test_per_image_results_do_not_depend_on_batch(make_vit, images):
    model = _patched(make_vit)
    with torch.no_grad():
        batch = model(images)
        kept = model.record.kept_indices[-1]
        for i in range(3):
            torch.testing.assert_close(model(images[i : i + 1]), batch[i : i + 1], atol=1e-5, rtol=1e-5)
            assert torch.equal(model.record.kept_indices[-1][0], kept[i])


def test_soft_mode_trains_only_predictor(make_vit, images):
    model = _patched(make_vit)
    model.train()
    for name, p in model.named_parameters():
        p.requires_grad_(name == "life_predictor.W")
    loss = torch.nn.functional.cross_entropy(model(images), torch.tensor([0, 1, 2]))
    loss.backward()
    assert model.life_predictor.W.grad.abs().sum() > 0
    assert model.life_predictor.norm.weight is None  # non-affine LayerNorm (Eq. 1)


def test_hard_mode_gradients_reach_tail_blocks_only(make_vit, images):
    model = _patched(make_vit, mode="hard")
    model.train()
    loss = torch.nn.functional.cross_entropy(model(images), torch.tensor([0, 1, 2]))
    loss.backward()
    assert model.blocks[11].attn.qkv.weight.grad.abs().sum() > 0
    assert model.life_predictor.W.grad is None  # the sort is not differentiable: stage 2 cannot move W


def test_reapply_keeps_predictor_and_changes_schedule(make_vit, images):
    model = _patched(make_vit, keep_rate=0.7)
    w = model.life_predictor.W.detach().clone()
    liferegress.apply(model, keep_rate=0.9)
    assert torch.equal(model.life_predictor.W, w)
    with torch.no_grad():
        model(images)
    assert tuple(k.shape[1] for k in model.record.kept_indices) == (179, 163, 148)


def test_apply_rejects_unsupported_models():
    with pytest.raises(TypeError, match="VisionTransformer"):
        liferegress.apply(torch.nn.Linear(2, 2))
    small = dict(img_size=32, patch_size=8, embed_dim=16, num_heads=2)
    with pytest.raises(ValueError, match="CLS"):
        liferegress.apply(VisionTransformer(depth=12, reg_tokens=1, **small))
    with pytest.raises(ValueError, match="drop layers"):
        liferegress.apply(VisionTransformer(depth=4, **small))
    with pytest.raises(ValueError, match="temperature"):
        liferegress.apply(VisionTransformer(depth=12, **small), temperature=0)


def test_embedded_backbone_geometry():
    model = timm.create_model("vit_digits_patch8_112", pretrained=False).eval()
    liferegress.apply(model, keep_rate=0.7)
    assert model.life_cfg.num_tokens == 197 and model.life_cfg.keep_counts == (140, 100, 72)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 112, 112)).shape == (2, 10)
    assert tuple(k.shape[1] for k in model.record.kept_indices) == (140, 100, 72)
