"""Video ATS on compacted tokens (ats.video.compact, ats.video.layout) against the masked reference blocks."""

import copy

import pytest
import torch
from vitbench.syncs import count_syncs

from ats import video
from ats.video.flops import recorded_gmacs
from ats.video.layout import FrameLayout, compact_index
from test_ats_patch import assert_each_alone_equals_batch, run
from test_video import tiny
from test_video_ats import patched
from vitbench.testing import compile_backends

CONFIGS = [
    dict(arch="timesformer", mode="official"),
    dict(arch="timesformer", mode="official", rho=0.5),
    dict(arch="timesformer", mode="paper", rho=0.7),
    dict(arch="timesformer", mode="paper", rho=0.4),
    dict(arch="xvit", mode="official"),
    dict(arch="xvit", mode="official", rho=0.6),
    dict(arch="xvit", mode="paper", rho=0.8),
    dict(arch="xvit", mode="paper", rho=0.3),
    dict(arch="xvit", mode="official", stages=[3], k=20),
    dict(arch="timesformer", mode="official", stages=[1, 6, 10], rho=0.5),
]


@pytest.fixture
def clips():
    torch.manual_seed(2)
    return torch.randn(5, 3, 4, 32, 32)


def masked_copy(model):
    ref = copy.deepcopy(model)
    ref.record.masked = True
    return ref


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_compacted_equals_masked_reference(cfg, clips):
    model = patched(cfg)
    ref = masked_copy(model)
    logits, expected = run(model, clips), run(ref, clips)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    got, want = model.record, ref.record
    assert len(got.alive) == len(want.alive) == 13
    assert all(torch.equal(a, b) for a, b in zip(got.alive, want.alive))
    for b in got.config.stages:
        assert all(torch.equal(x, y) for x, y in zip(got.kept_indices(b), want.kept_indices(b)))
    assert torch.equal(recorded_gmacs(model), recorded_gmacs(ref))
    cls_tokens = 1 if cfg["arch"] == "timesformer" else 4
    assert got.token_counts()[1][:, -1].lt(cls_tokens + 4 * 16).any()  # tokens were dropped


@pytest.mark.parametrize("arch", ["timesformer", "xvit"])
def test_training_gradients_equal_the_masked_reference(arch, clips):
    model = patched(dict(arch=arch, rho=0.6)).train()
    ref = masked_copy(model).train()
    for m in (model, ref):
        m(clips[:3]).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("cfg", [CONFIGS[3], CONFIGS[7], CONFIGS[9]], ids=str)
def test_compacted_clip_alone_equals_clip_in_batch(cfg, clips):
    assert_each_alone_equals_batch(patched(cfg), clips)


@pytest.mark.parametrize("cfg", [CONFIGS[1], CONFIGS[6], CONFIGS[8]], ids=str)
def test_at_most_one_host_sync_per_ats_stage(cfg, clips):
    model = patched(cfg)
    syncs = count_syncs(model, clips)
    assert 0 < syncs["total"] <= len(model.record.config.stages), syncs
    assert count_syncs(masked_copy(model), clips)["total"] <= len(model.record.config.stages)


def test_dense_run_has_no_host_sync(clips):
    assert count_syncs(patched(dict(arch="xvit", stages=[])), clips)["total"] == 0


def test_compact_index_is_nonzero_with_a_known_size():
    torch.manual_seed(0)
    keep = torch.rand(97) < 0.3
    assert torch.equal(compact_index(keep, int(keep.sum())), keep.nonzero().flatten())


@pytest.mark.parametrize("cls_rows", [True, False])
def test_layout_pads_and_packs_back(cls_rows):
    torch.manual_seed(0)
    alive = torch.rand(2, 4, 6) < 0.5
    alive[1, 2] = False  # a frame with no patch left
    layout = FrameLayout.of(alive, cls_rows, temporal=not cls_rows)
    assert layout.width == 1 + int(alive.sum(-1).max())
    assert layout.rows == int(alive.sum()) + (8 if cls_rows else 0)
    rows = torch.randn(layout.rows, 3)
    first = None if cls_rows else torch.randn(8, 3)
    padded = layout.pad(rows, first)
    assert torch.equal(layout.pack(padded), rows)
    grid = layout.grid(rows, first)
    ext = torch.cat([torch.ones(2, 4, 1, dtype=torch.bool), alive], -1)
    if cls_rows:
        assert torch.equal(grid[ext], rows) and grid[~ext].eq(0).all()
    else:
        assert torch.equal(grid[:, :, 1:][alive], rows) and torch.equal(grid[:, :, 0].reshape(8, 3), first)
        assert torch.equal(layout.pack_time(layout.pad_time(rows)), rows)
        assert layout.positions == int(alive.any(1).sum())


@pytest.mark.parametrize("backend", compile_backends())
@pytest.mark.parametrize("arch", ["timesformer", "xvit"])
def test_compiled_equals_eager(arch, backend, clips):
    """The blocks before the first stage and every stage's sampling compiled: same kept tokens, same logits."""
    model = video.apply(tiny(arch, depth=4), stages=[1, 2], rho=0.6)
    eager = run(model, clips)
    kept = [model.record.kept[b].clone() for b in (1, 2)]
    video.compile_ats(model, backend=backend)
    torch.testing.assert_close(run(model, clips), eager, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(model.record.kept[b], k) for b, k in zip((1, 2), kept))
    assert model.record.token_counts()[1][:, -1].lt(model.record.token_counts()[0][:, 0]).all()


def test_compile_refuses_an_unpatched_model():
    with pytest.raises(TypeError, match="ats.video.apply"):
        video.compile_ats(tiny("xvit"))
