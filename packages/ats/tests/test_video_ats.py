import pytest
import torch

from ats import sampling, video
from ats.video.flops import VideoGeometry, clip_gmacs, recorded_gmacs
from test_ats_patch import assert_each_alone_equals_batch, run
from test_video import tiny

CONFIGS = [
    dict(arch="timesformer", mode="official"),  # the paper's stages (3..5), K = N
    dict(arch="timesformer", mode="official", rho=0.5),
    dict(arch="timesformer", mode="paper", rho=0.7),
    dict(arch="xvit", mode="official", rho=0.6),
    dict(arch="xvit", mode="paper", rho=0.8),
    dict(arch="xvit", mode="official", stages=[3], k=20),
]


def patched(cfg, peak=4.0):
    cfg = dict(cfg)
    model = tiny(cfg.pop("arch"))
    with torch.no_grad():  # peaked attention, so that the CLS rows are far from uniform
        for blk in model.blocks:
            blk.attn.qkv.weight[: 2 * blk.attn.attn_dim] *= peak
    return video.apply(model, **cfg)


@pytest.fixture
def clips():
    torch.manual_seed(1)
    return torch.randn(4, 3, 4, 32, 32)


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_clip_alone_equals_clip_in_batch(cfg, clips):
    assert_each_alone_equals_batch(patched(cfg), clips)


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_cls_kept_and_k_bounded(cfg, clips):
    model = patched(cfg)
    run(model, clips)
    info = model.record
    T, S = 4, 16
    cls_tokens = 1 if cfg["arch"] == "timesformer" else T
    for b in info.config.stages:
        n_in = info.alive[b].sum((1, 2)) + 1  # N counts the clip's patches and the CLS once
        kept = info.kept_indices(b)
        for i, row in enumerate(kept):
            assert row[0] == 0 and (row[1:] > 0).all() and len(set(row.tolist())) == len(row)
            assert len(row) <= sampling.stage_k(int(n_in[i]), info.config.k_of(b))  # K' <= K, CLS included
            alive = torch.zeros(T * S + 1, dtype=torch.bool)
            alive[row] = True
            assert torch.equal(alive[1:].view(T, S), info.alive[b + 1][i])
        assert torch.equal(info.tokens_out[b], cls_tokens + info.alive[b + 1].sum((1, 2)))
        assert (info.alive[b + 1] <= info.alive[b]).all()  # kept tokens are a subset of the alive ones
    assert info.token_counts()[1][:, -1].lt(cls_tokens + T * S).any()  # something was dropped


def test_no_stage_equals_dense_model(clips):
    model = tiny("timesformer")
    ref = run(model, clips)
    keys = list(model.state_dict())
    video.apply(model, stages=[])
    torch.testing.assert_close(run(model, clips), ref)
    assert list(model.state_dict()) == keys
    assert model.record.token_counts()[1].eq(1 + 4 * 16).all()
    g = VideoGeometry.from_model(model)
    torch.testing.assert_close(recorded_gmacs(model), clip_gmacs(g).expand(4))


def test_determinism_and_fewer_flops_with_smaller_rho(clips):
    model = patched(dict(arch="xvit", rho=0.9))
    a = run(model, clips)
    kept = model.record.kept_indices(5)
    flops_09 = recorded_gmacs(model)
    b = run(model, clips)
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(kept, model.record.kept_indices(5)))
    video.apply(model, rho=0.4)
    run(model, clips)
    flops_04 = recorded_gmacs(model)
    dense = float(clip_gmacs(VideoGeometry.from_model(model))[0])
    assert (flops_04 < flops_09).all() and (flops_09 < dense).all()


def test_kept_tokens_vary_across_frames_and_clips(clips):
    model = patched(dict(arch="timesformer", rho=0.5))
    run(model, clips)
    per_frame = model.record.kept_per_frame(5)
    assert per_frame.shape == (4, 4) and per_frame.unique().numel() > 1


def test_training_backward_reaches_the_backbone(clips):
    model = patched(dict(arch="timesformer", rho=0.6)).train()
    model(clips[:2]).sum().backward()
    assert model.blocks[11].mlp.fc1.weight.grad.abs().sum() > 0
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_rejects_bad_settings():
    with pytest.raises(TypeError, match="TimeSformer or XViT"):
        video.apply(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="outside"):
        video.apply(tiny("xvit"), stages=[12])
    with pytest.raises(ValueError, match="rho"):
        video.apply(tiny("xvit"), rho=1.5)
    with pytest.raises(ValueError, match="mode"):
        video.apply(tiny("xvit"), mode="fast")


def test_moving_digits_views_through_ats_and_per_clip_flops(tmp_path, monkeypatch):
    from torch.utils.data import DataLoader
    from vitbench.video import ClipSampling, build_video_dataset

    monkeypatch.setenv("VITBENCH_CACHE", str(tmp_path))
    sampling = ClipSampling(frames=4, stride=2, crop=32, jitter=(32, 32))
    val = build_video_dataset("moving-digits:train_size=2,val_size=3,frames=8,canvas=40", "val", sampling)
    views, labels, _ = next(iter(DataLoader(val, batch_size=3)))
    assert views.shape == (3, 3, 3, 4, 32, 32)  # [B, V, C, T, H, W]
    model = patched(dict(arch="timesformer", rho=0.5))
    logits = run(model, views.flatten(0, 1)).view(3, 3, -1).softmax(-1).mean(1)  # 1 x 3 views averaged
    gflops = recorded_gmacs(model).view(3, 3).sum(1)  # per clip, 1 x 3 views
    dense = 3 * float(clip_gmacs(VideoGeometry.from_model(model))[0])
    assert logits.shape == (3, 5) and labels.shape == (3,) and (gflops < dense).all()
