import json

import pytest
import timm
import torch

from ats import video
from ats.paper import VIDEO_GFLOPS
from ats.video import flops as video_flops
from ats.video.flops import VideoGeometry, clip_gmacs
from vitbench.flops import flop_counter_gmacs

TINY = dict(img_size=32, patch_size=8, num_frames=4, embed_dim=16, num_heads=2, num_classes=5)
NAMES = {"timesformer": "timesformer_digits_patch8_64", "xvit": "xvit_digits_patch8_64"}


def tiny(arch: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = timm.create_model(NAMES[arch], **{**TINY, **kw}).eval()
    with torch.no_grad():  # the released inits leave zeros (temporal_fc, biases); give every parameter some spread
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture
def clips():
    torch.manual_seed(1)
    return torch.randn(3, 3, 4, 32, 32)


@pytest.mark.parametrize("arch", ["timesformer", "xvit"])
def test_analytic_count_equals_flop_counter(arch, clips):
    model = tiny(arch)
    geometry = VideoGeometry.from_model(model)
    analytic = float(clip_gmacs(geometry, layernorm=False)[0])
    assert analytic == pytest.approx(flop_counter_gmacs(model, clips), rel=1e-9)


def test_paper_dense_gflops_within_two_percent():
    rows = {r["model"]: r for r in video_flops.rows(list(VIDEO_GFLOPS))}
    for name, (_, paper) in VIDEO_GFLOPS.items():
        assert abs(rows[name]["gflops_1x3"] - paper) / paper < 0.02, name
    assert rows["xvit_base_patch16_224_16f"]["gflops_1x3"] == pytest.approx(
        2 * rows["xvit_base_patch16_224_8f"]["gflops_1x3"], rel=0.01)  # Table 2's 425 is the 8-frame count


def test_flops_command_prints_and_writes_json(tmp_path, capsys):
    out = tmp_path / "flops.json"
    assert video_flops.main(["--model", "timesformer_l_patch16_224", "--json", str(out)]) == 0
    assert "timesformer_l_patch16_224" in capsys.readouterr().out
    row = json.loads(out.read_text())["rows"][0]
    assert row["tokens_per_view"] == 1 + 96 * 196 and abs(row["diff_pct"]) < 2


def test_flops_command_refuses_a_directory_as_json(tmp_path, capsys):
    assert video_flops.main(["--json", str(tmp_path)]) == 2
    assert "ats-video-flops: error:" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["timesformer", "xvit"])
def test_clip_alone_equals_clip_in_batch(arch, clips):
    model = tiny(arch)
    with torch.inference_mode():
        batch = model(clips)
        for i in range(clips.shape[0]):
            torch.testing.assert_close(model(clips[i : i + 1]), batch[i : i + 1], atol=1e-5, rtol=1e-5)


def test_xvit_mixes_only_neighbouring_frames_within_a_segment(clips):
    model = tiny("xvit", num_frames=4, segment=2)
    changed = clips.clone()
    changed[:, :, 0] += 1.0  # frame 0 belongs to segment {0, 1}
    with torch.inference_mode():
        a, b = model.forward_features(clips[:1]), model.forward_features(changed[:1])
    assert not torch.allclose(a[:, 1], b[:, 1])  # frame 1 sees frame 0's shifted channels
    torch.testing.assert_close(a[:, 2:], b[:, 2:])  # frames 2, 3 are another segment


def test_timesformer_frames_interact_through_time():
    model = tiny("timesformer")
    torch.manual_seed(2)
    x = torch.randn(1, 3, 4, 32, 32)
    y = x.clone()
    y[:, :, 3] = x[:, :, 2]
    with torch.inference_mode():
        assert not torch.allclose(model(x), model(y))


@pytest.mark.parametrize("arch", ["timesformer", "xvit"])
def test_released_checkpoint_keys_load(arch, tmp_path):
    model = tiny(arch)
    prefix = video.checkpoint.RELEASED_PREFIXES[arch]
    released = {}
    for key, value in model.state_dict().items():
        released[key if key.startswith("consensus.") else prefix + key] = value.clone()
    if arch == "xvit":
        released["new_fc.weight"] = torch.zeros(5, 16)  # built but unused by the released XVIT
    path = tmp_path / "released.pyth"
    torch.save({"model_state": released, "epoch": 30}, path)
    fresh = video.load_released(tiny(arch, seed=3), str(path))
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)


def test_released_checkpoint_with_foreign_keys_is_refused():
    with pytest.raises(ValueError, match="unexpected key"):
        video.convert_released({"backbone.head.weight": torch.zeros(1)}, "timesformer")


def test_wrong_clip_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"clips \[B, C, T, H, W\]"):
        tiny("timesformer")(torch.zeros(1, 3, 5, 32, 32))


def test_registered_kinetics_configurations():
    names = set(timm.list_models("timesformer_*")) | set(timm.list_models("xvit_*"))
    assert set(video.VIDEO_MODELS) <= names
    g = VideoGeometry.of("timesformer_hr_patch16_448")
    assert (g.frames, g.grid, g.num_classes) == (16, (28, 28), 600)
    with pytest.raises(FileNotFoundError, match="load_released"):
        timm.create_model("timesformer_base_patch16_224", pretrained=True)
