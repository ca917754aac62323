"""EViT (ats.backbones.evit): the reorganisation as pure functions, outputs pinned on seeded weights (the released
``EViT`` class gives the same logits within 1e-5 and the same kept tokens on them), the checkpoint layout, FLOPs
(3.0 G, FlopCounterMode) and ATS inside it (Table A.5: K rules, upper bounds, batch invariance, per-image FLOPs)."""

import copy

import pytest
import timm
import torch
from ats.backbones import evit
from ats.flops import per_image_gmacs, upper_bound_gmacs
from ats.tokens import TokenSets
from vitbench.flops import flop_counter_gmacs

DIGITS = dict(img_size=112, patch_size=8, embed_dim=64, depth=12, num_heads=2, num_classes=10)


def seeded_state(model, seed=0):
    """Weights from a generator in key order (independent of timm's initialisation): N(0, 0.2), norm scales + 1."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sorted(model.state_dict().items()):
        w = torch.randn(v.shape, generator=g) * 0.2
        out[k] = w + 1 if k.endswith(("norm1.weight", "norm2.weight")) or k == "norm.weight" else w
    return out


@pytest.fixture(scope="module")
def seeded():
    model = evit.EViT(**DIGITS).eval()
    model.load_state_dict(evit.convert_state_dict(seeded_state(model)))
    return model


def images(n, seed=1, size=112):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ pure functions
def test_keep_counts_are_the_released_ceil():
    assert [evit.keep_count(n, 0.7) for n in (197, 140, 100)] == [138, 98, 70]
    assert [evit.tokens_after(n, 0.7) for n in (197, 140, 100)] == [140, 100, 72]
    assert evit.tokens_after(4, 0.7) == 4  # ceil(0.7 * 3) = 3: nothing dropped, nothing fused
    n = torch.tensor([197, 140, 100, 4, 11])
    assert evit.tokens_after(n, 0.7).tolist() == [evit.tokens_after(int(v), 0.7) for v in n]
    assert evit.tokens_after(11, 0.7) == 9  # 0.7 * 10 = 7.000000000000001 in float64: ceil gives 8, as released


def test_attentiveness_top_tokens_and_fusion_by_hand():
    attn = torch.zeros(1, 2, 4, 4)
    attn[0, 0, 0] = torch.tensor([0.1, 0.5, 0.1, 0.3])
    attn[0, 1, 0] = torch.tensor([0.1, 0.1, 0.5, 0.3])
    score = evit.attentiveness(attn)  # head mean of the CLS row without the CLS column
    assert torch.allclose(score, torch.tensor([[0.3, 0.3, 0.3]]))
    score = torch.tensor([[0.2, 0.5, 0.1, 0.15, 9.0]])  # the last candidate is padding (n_cand 4)
    kept = evit.top_tokens(score, torch.tensor([4]), torch.tensor([2]), 3)
    assert kept.tolist() == [[1, 0, -1]]  # most attentive first, -1 beyond keep
    x = torch.arange(15.0).view(1, 5, 3)
    fused = evit.fuse_inattentive(x, score, kept, torch.tensor([4]))
    assert torch.allclose(fused, 0.1 * x[0, 2] + 0.15 * x[0, 3])  # dropped, weighted as they are, no padding


def test_reorganize_per_image_equals_alone():
    torch.manual_seed(0)
    lengths = [9, 5, 4]
    x = [torch.randn(n, 6) for n in lengths]
    scores = [torch.rand(n - 1) for n in lengths]
    width = max(lengths)
    origin = torch.full((3, width), -1)
    for b, n in enumerate(lengths):
        origin[b, :n] = torch.arange(n) * 10
    tokens = TokenSets(torch.cat(x), torch.tensor(lengths), origin, lengths)
    score = torch.zeros(3, width - 1)
    for b, s in enumerate(scores):
        score[b, : len(s)] = s
    out = evit.reorganize(tokens, tokens.x, score, 0.7)
    assert out.sizes == (8, 5, 4)  # 1 + ceil(0.7 * 8) + 1; 1 + 3 + 1; ceil(0.7 * 3) = 3: unchanged
    rows = out.padded()
    for b, n in enumerate(lengths):
        alone = evit.reorganize(TokenSets.full(x[b][None]), x[b][None], scores[b][None], 0.7)
        assert torch.allclose(rows[b, : out.sizes[b]], alone.x[0], atol=1e-6)
        expected = torch.where(alone.origin[0] >= 0, alone.origin[0] * 10, alone.origin[0])  # fused: FUSED
        assert torch.equal(out.origin[b, : out.sizes[b]], expected if b < 2 else origin[b, :n])
    assert out.origin[0, 7] == evit.FUSED and out.origin[2].tolist()[:4] == [0, 10, 20, 30]


# ---------------------------------------------------------------------------------------- outputs pinned (released)
PINNED_LOGITS = torch.tensor([
    [0.515692, -0.443622, -4.000326, -1.350534, 0.679870, -0.812121, 1.522449, -1.225246, -1.479749, 1.281970],
    [2.065068, -1.624068, -2.565236, -1.306514, 0.313145, 1.581244, -0.721777, -3.261099, -1.983031, -0.710845],
    [-0.615848, -0.963741, -2.642031, -1.241431, 0.357163, 0.895946, -0.580474, -2.791298, -2.453308, 0.569608]])
# Original indices of the first tokens each reorganising block outputs (CLS, the most attentive ...), the sum of
# all it outputs (the fused tokens as -2) and how many fused tokens it outputs.
PINNED_KEPT = {
    3: ([[0, 147, 140, 23, 51, 118], [0, 22, 153, 121, 184, 162], [0, 129, 104, 179, 106, 162]],
        [13554, 13618, 13689], [1, 1, 1]),
    6: ([[0, 149, 184, 18, 173, 24], [0, 42, 128, 102, 97, 155], [0, 151, 114, 6, 158, 25]],
        [9557, 9682, 9452], [2, 2, 2]),
    9: ([[0, 118, 122, 99, 146, 78], [0, 177, 77, -2, 26, 145], [0, 43, 126, 17, 104, 32]],
        [6943, 7152, 6722], [1, 3, 2]),
}


def test_outputs_pinned_on_seeded_weights(seeded):
    x = images(3)
    with torch.no_grad():
        logits = seeded(x)
        recorded = evit.apply(copy.deepcopy(seeded), stages=())  # ATS nowhere: the same model, recording
        assert torch.equal(recorded(x), logits)
    assert torch.allclose(logits, PINNED_LOGITS, atol=1e-5)
    for block, (first, total, fused) in PINNED_KEPT.items():
        kept = recorded.record.kept[block]
        assert kept.shape == (3, {3: 140, 6: 100, 9: 72}[block])
        assert kept[:, :6].tolist() == first
        assert kept.sum(1).tolist() == total and (kept == evit.FUSED).sum(1).tolist() == fused


def test_forward_is_timms_and_batch_invariant(seeded):
    x = images(4, seed=3)
    with torch.no_grad():
        features = seeded.forward_features(x)
        assert features.shape == (4, 72, 64)
        assert torch.allclose(seeded.forward_head(features), seeded(x))
        alone = torch.cat([seeded(x[i:i + 1]) for i in range(4)])
    assert torch.allclose(alone, seeded(x), atol=1e-5)


# ------------------------------------------------------------------------------------------------ checkpoint layout
def test_convert_state_dict_refuses_unknown_and_missing_keys_by_name(seeded):
    state = {f"module.{k}": v for k, v in seeded.state_dict().items()}
    assert list(evit.convert_state_dict(state)) == evit.expected_keys(12)
    with pytest.raises(ValueError, match=r"unknown keys \['dist_token', 'head_dist.weight'\]"):
        evit.convert_state_dict({**state, "dist_token": torch.zeros(1), "head_dist.weight": torch.zeros(1)})
    del state["module.blocks.3.attn.qkv.bias"]
    with pytest.raises(ValueError, match=r"missing keys \['blocks.3.attn.qkv.bias'\]"):
        evit.convert_state_dict(state)
    headless = {k: v for k, v in seeded.state_dict().items() if not k.startswith("head.")}
    assert "head.weight" not in evit.convert_state_dict(headless)


def test_registered_with_timm_and_pretrained_points_to_the_loader():
    model = timm.create_model("evit_deit_small_patch16_224", keep_rate=0.5)
    assert isinstance(model, evit.EViT) and model.keep_rate == 0.5 and model.drop_loc == (3, 6, 9)
    assert [type(b).__name__ for b in model.blocks].count("EViTBlock") == 3
    with pytest.raises(FileNotFoundError, match="released EViT"):
        timm.create_model("evit_digits_patch8_112", pretrained=True)
    with pytest.raises(ValueError, match="keep_rate"):
        evit.EViT(**DIGITS, keep_rate=0.0)


# ------------------------------------------------------------------------------------------------------------- FLOPs
def test_gmacs_three_g_and_flop_counter():
    model = timm.create_model("evit_deit_small_patch16_224").eval()
    geom = evit.EViTGeometry.from_model(model)
    assert geom.dense_counts() == [197] * 4 + [140] * 3 + [100] * 3 + [72] * 2
    assert abs(model.gmacs() / 3.0 - 1) < 0.02
    assert flop_counter_gmacs(model, torch.randn(1, 3, 224, 224)) == pytest.approx(model.gmacs(layernorm=False),
                                                                                   rel=1e-9)
    assert model.gmacs(layernorm=False) == pytest.approx(3.029, abs=5e-4)


@pytest.mark.parametrize("rule, ks, bound", [("evit", (98, 98, 70, 70, 50, 50), 2.583),
                                              ("compound", (0.7,) * 6, 2.154)])
def test_table_a5_k_rules_and_upper_bounds(rule, ks, bound):
    model = evit.apply(timm.create_model("evit_deit_small_patch16_224"), k_rule=rule)
    assert model.record.config.stages == evit.STAGES and model.record.config.k == ks
    assert upper_bound_gmacs(evit.EViTGeometry.from_model(model), model.record.config) == pytest.approx(bound,
                                                                                                       abs=5e-4)


def test_ats_in_evit_refuses_its_reorganising_blocks_and_unknown_rules():
    with pytest.raises(ValueError, match=r"reorganising blocks \[6\]"):
        evit.apply(evit.EViT(**DIGITS), stages=(4, 6))
    with pytest.raises(ValueError, match="k_rule"):
        evit.apply(evit.EViT(**DIGITS), k_rule="other")
    with pytest.raises(TypeError, match="expected an EViT"):
        evit.check_structure(timm.create_model("vit_digits_patch8_112"))


# ------------------------------------------------------------------------------------------------------------- ATS
@pytest.mark.parametrize("rule", evit.K_RULES)
def test_evit_ats_is_batch_invariant_with_per_image_flops(seeded, rule):
    model = evit.apply(copy.deepcopy(seeded), k_rule=rule, mode="official")
    geom = evit.EViTGeometry.from_model(model)
    x = images(4, seed=5)
    with torch.no_grad():
        batch = model(x)
        counts = model.record.token_counts()[1]
        kept = {b: model.record.kept_indices(b) for b in (*evit.STAGES, *evit.DROP_LOC)}
        gmacs = per_image_gmacs(geom, model.record, layernorm=False)
        assert len(set(counts[:, -1].tolist())) > 1  # the images keep different numbers of tokens
        for i in range(4):
            one = model(x[i:i + 1])
            assert torch.allclose(one, batch[i:i + 1], atol=1e-5)
            assert torch.equal(model.record.token_counts()[1][0], counts[i])
            assert all(torch.equal(model.record.kept_indices(b)[0], kept[b][i]) for b in kept)
            measured = flop_counter_gmacs(model, x[i:i + 1])
            assert gmacs[i].item() == pytest.approx(measured, rel=1e-9)
    assert (gmacs <= upper_bound_gmacs(geom, model.record.config, layernorm=False) + 1e-12).all()


def test_evit_ats_trains(seeded):
    model = evit.apply(copy.deepcopy(seeded), rho=1.0).train()
    loss = model(images(2)).logsumexp(-1).sum()
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("blocks."))
