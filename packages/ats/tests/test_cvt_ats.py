"""ATS in stage 3 of a CvT with the ``linear`` projection (ats.backbones.cvt.apply): the image ViT's semantics on
CvT's token sets, per-image FLOPs against FlopCounterMode, one host sync per stage, compiled equals eager."""

import copy

import pytest
import torch
from test_ats_patch import assert_each_alone_equals_batch, run
from vitbench.flops import flop_counter_gmacs
from vitbench.syncs import count_syncs
from vitbench.testing import compile_backends

import ats
from ats import patch, sampling
from ats.backbones import cvt, geometry
from ats.flops import dense_gmacs, per_image_gmacs, upper_bound_gmacs

CONFIGS = [dict(), dict(rho=0.72), dict(mode="paper", rho=0.87), dict(stages=[1], k=12), dict(variant="topk", rho=0.8)]
STAGES = (0, 1, 2)  # of the tiny model's 4 stage-3 blocks


def tiny_cvt(projection: str = "linear", seed: int = 0) -> cvt.CvT:
    """A small CvT (96 px: stage 3 on a 6 x 6 grid + CLS, 4 blocks) with random weights whose attention is peaked
    enough for ATS to drop tokens."""
    torch.manual_seed(seed)
    model = cvt.CvT(img_size=96, depths=(1, 1, 4), dims=(16, 32, 64), heads=(1, 2, 4), num_classes=10,
                    projection=projection).eval()
    with torch.no_grad():
        for blk in model.blocks if projection == "linear" else ():
            blk.attn.qkv.weight.mul_(4.0)
    return model


def tiny_ats(**cfg) -> cvt.CvT:
    return ats.apply(tiny_cvt(), **{"stages": STAGES, **cfg})


@pytest.fixture
def clips():
    torch.manual_seed(2)
    return torch.randn(5, 3, 96, 96)


def test_no_stage_equals_the_dense_cvt(clips):
    model = tiny_cvt()
    ref = run(model, clips)
    keys = list(model.state_dict())
    ats.apply(model, stages=[])
    torch.testing.assert_close(run(model, clips), ref)
    assert list(model.state_dict()) == keys
    assert model.record.token_counts()[1].eq(37).all() and model.record.grid == (6, 6)


def test_topk_at_k_equal_n_keeps_every_token_and_the_logits(clips):
    """K = N with top-K selection keeps every patch: the same model up to the token order (float error)."""
    model = tiny_cvt()
    ref = run(model, clips)
    ats.apply(model, stages=range(4), rho=1.0, variant="topk")
    torch.testing.assert_close(run(model, clips), ref, atol=1e-5, rtol=1e-5)
    assert model.record.token_counts()[1].eq(37).all()


def test_default_stages_are_the_papers_and_cvt_is_dispatched():
    model = cvt.CvT(img_size=96, depths=(1, 1, 10), dims=(16, 32, 64), heads=(1, 2, 4), num_classes=10,
                    projection="linear")
    ats.apply(model, rho=0.9)
    assert model.record.config.stages == tuple(range(9)) == cvt.STAGES
    assert isinstance(model, cvt.ATSCvT) and isinstance(model, cvt.CvT)


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_batch_invariance(clips, cfg):
    assert_each_alone_equals_batch(tiny_ats(**cfg), clips)


@pytest.mark.parametrize("cfg", CONFIGS[:3], ids=str)
def test_cls_first_kept_counts_bounded_and_adaptive(clips, cfg):
    model = tiny_ats(**cfg)
    run(model, clips)
    info = model.record
    n_in, n_out = info.token_counts()
    for j, b in enumerate(info.config.stages):
        for i, kept in enumerate(info.kept_indices(b)):
            assert kept[0] == 0 and kept.unique().numel() == kept.numel() and kept.max() < 37
            assert n_out[i, b] <= sampling.stage_k(int(n_in[i, b]), info.config.k[j])
    assert n_out[:, -1].min() < 37


@pytest.mark.parametrize("cfg", [dict(rho=0.8), dict(stages=[1], k=12)], ids=str)
def test_per_image_gmacs_equal_flop_counter(clips, cfg):
    model = tiny_ats(**cfg)
    geom = geometry(model)
    for i in range(2):
        measured = flop_counter_gmacs(model, clips[i : i + 1])
        analytic = float(per_image_gmacs(geom, model.record, layernorm=False)[0])
        assert analytic == pytest.approx(measured, rel=1e-9)
    run(model, clips)
    g = per_image_gmacs(geom, model.record)
    assert (g < dense_gmacs(geom)).all() and (g <= upper_bound_gmacs(geom, model.record.config) + 1e-12).all()


def test_dense_count_of_the_linear_cvt_is_flop_counters():
    model = tiny_cvt()
    assert dense_gmacs(geometry(model), layernorm=False) == pytest.approx(
        flop_counter_gmacs(model, torch.randn(1, 3, 96, 96)), rel=1e-9)


def test_one_host_sync_per_ats_stage(clips):
    assert count_syncs(tiny_ats(rho=0.8), clips) == {"total": 3, "tolist": 3}


@pytest.mark.parametrize("backend", compile_backends())
def test_compiled_equals_eager(clips, backend):
    model = ats.apply(tiny_cvt(), stages=[1, 2], rho=0.72)
    with torch.no_grad():
        ref = model(clips)
        ref_kept = [model.record.kept[b].clone() for b in (1, 2)]
        patch.compile_ats(model, backend=backend)
        out = model(clips)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert all(torch.equal(model.record.kept[b], k) for b, k in zip((1, 2), ref_kept))


def test_resuming_from_dense_hidden_states_equals_the_full_forward(clips):
    dense = tiny_cvt()
    model = ats.apply(copy.deepcopy(dense), stages=[2, 3], rho=0.8)
    full = run(model, clips)
    with torch.inference_mode():
        out = model.forward_head(model.forward_features(clips, hidden=patch.dense_hidden(dense, clips, 2), start=2))
    torch.testing.assert_close(out, full)


def test_a_cvt_with_convolutional_projections_is_refused_in_one_sentence():
    with pytest.raises(ValueError, match="projection='linear'"):
        ats.apply(tiny_cvt("dw_bn"))
    with pytest.raises(ValueError, match="stages"):
        ats.apply(tiny_cvt(), stages=[4])
