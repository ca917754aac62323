import re

import numpy as np
import pytest
import torch

from vitbench import video
from vitbench.data import DataError, build_dataset, parse_data_spec

SMALL = "moving-digits:train_size=6,val_size=4,frames=6,canvas=40"
SAMPLING = video.ClipSampling(frames=3, stride=2, crop=32, jitter=(32, 40))


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VITBENCH_CACHE", str(tmp_path / "cache"))


def small_cfg():
    return video.MovingDigitsConfig(**dict(parse_data_spec(SMALL).options))


def test_moving_digits_are_deterministic_cached_and_move():
    cfg = small_cfg()
    a = video.load_split("train", cfg)
    b = video.load_split("train", cfg)  # from the cache
    fresh = video.generate(cfg, "train")
    assert a.clips.shape == (6, 6, 40, 40, 3) and a.boxes.shape == (6, 6, 4)
    assert np.array_equal(a.clips, fresh.clips) and np.array_equal(b.labels, fresh.labels)
    assert (np.abs(np.diff(a.boxes[:, :, :2], axis=1)).sum((1, 2)) > 0).all()  # every digit moves
    assert (a.boxes[..., :2] >= 0).all() and (a.boxes[..., 2:] <= 40).all()
    assert not np.array_equal(a.clips[:, 0], a.clips[:, -1])


def test_specs_parse_through_vitbench_data():
    assert str(parse_data_spec(SMALL)) == SMALL
    assert parse_data_spec("videofolder:/data/k400").path == "/data/k400"
    assert video.is_video(SMALL) and video.is_video(parse_data_spec("videofolder:/x")) and not video.is_video("digits")
    with pytest.raises(DataError, match="moving-digits option"):
        parse_data_spec("moving-digits:speed=3")
    with pytest.raises(DataError, match="is video data"):
        build_dataset("moving-digits", "val")  # the image loader refuses clips with a clear message


def test_train_and_eval_clip_shapes():
    train = video.build_video_dataset(SMALL, "train", SAMPLING)
    clip, label, index = train[2]
    assert clip.shape == (3, 3, 32, 32) and 0 <= label < 10 and index == 2
    assert torch.equal(train[2][0], clip)  # a function of (seed, epoch, index)
    train.set_epoch(1)
    assert not torch.equal(train[2][0], clip)
    val = video.build_video_dataset(SMALL, "val", SAMPLING)
    views, _, _ = val[0]
    assert views.shape == (3, 3, 3, 32, 32)  # 1 x 3 views: [V, C, T, H, W]


def test_frame_indices_cover_frames_times_stride():
    assert video.frame_indices(20, 4, 3, start=2).tolist() == [2, 5, 8, 11]
    assert video.frame_indices(20, 4, 3).tolist() == [5, 8, 11, 14]  # centre clip
    assert video.frame_indices(5, 4, 3).tolist() == [0, 3, 4, 4]  # short videos repeat their last frame


def test_exported_video_folder_reads_back_with_labels_and_shape(tmp_path):
    cfg = small_cfg()
    root = video.export(tmp_path / "vf", cfg)
    data = video.load_split("val", cfg)
    val = video.build_video_dataset(f"videofolder:{root}", "val", SAMPLING)
    assert val.classes == [str(d) for d in range(10)] and len(val) == 4
    source = [int(p.rsplit("/", 1)[1][:-4]) for p in val.paths]  # <split>/<class>/<index>.mp4
    assert val.labels.tolist() == data.labels[source].tolist()
    views, label, _ = val[1]
    assert views.shape == (3, 3, 3, 32, 32) and label == val.labels[1]
    decoded = video.read_video(val.paths[1])
    assert decoded.shape == (6, 40, 40, 3)
    assert np.abs(decoded.astype(int) - data.clips[source[1]]).mean() < 6  # near-lossless H.264
    (root / "val").rename(root / "val_folders")  # the CSV form ('path label' lines) remains
    csv_val = video.build_video_dataset(f"videofolder:{root}", "val", SAMPLING)
    assert csv_val.labels.tolist() == data.labels.tolist() and len(csv_val.classes) == max(data.labels) + 1


def test_corrupt_video_is_named_or_skipped_and_counted(tmp_path):
    root = video.export(tmp_path / "vf", small_cfg())
    bad = sorted((root / "val").rglob("*.mp4"))[0]
    bad.write_bytes(b"not a video at all")
    ds = video.build_video_dataset(f"videofolder:{root}", "val", SAMPLING)
    index = ds.paths.index(str(bad))
    with pytest.raises(video.CorruptVideoError, match=bad.name):
        ds[index]
    kept = video.build_video_dataset(f"videofolder:{root}", "val", SAMPLING, skip_corrupt=True)
    assert len(kept) == len(ds) - 1 and kept.skipped == [str(bad)]


def test_missing_folder_and_bad_csv_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        video.build_video_dataset(f"videofolder:{tmp_path / 'nope'}", "val")
    (tmp_path / "val.csv").write_text("a.mp4 three\n")
    with pytest.raises(DataError, match="val.csv:1"):
        video.build_video_dataset(f"videofolder:{tmp_path}", "val")


def test_export_command_refuses_a_non_empty_directory(tmp_path, capsys):
    (tmp_path / "x").write_text("")
    assert video.main(["export", str(tmp_path)]) == 2
    assert "vitbench-video: error:" in capsys.readouterr().err


@pytest.mark.parametrize("kw, message", [
    ({"val_fraction": 1.0}, "val_fraction must be in (0, 1)"),
    ({"min_scale": 5.0, "max_scale": 4.0}, "need 1 <= min_scale <= max_scale"),
    ({"canvas": 20}, "is too small for digits"),
])
def test_moving_digits_config_makes_the_digits_checks(kw, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        video.MovingDigitsConfig(**kw)
