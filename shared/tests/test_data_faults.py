"""Odd data met by the evaluation and training data path: 16-bit PNGs, unreadable files with --skip-corrupt and
--limit, nested class folders, an unreadable file met during an evaluation, and no download chatter for local
folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitbench.data import DataError, build_dataset


def _folder(root, classes=("a", "b"), per_class=3):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_a_16_bit_png_is_scaled_to_8_bits_not_clipped_to_white(tmp_path):
    root = _folder(tmp_path / "d")
    ramp = (np.arange(16 * 16).reshape(16, 16) * 256).astype(np.uint16)  # 0 .. 65280
    Image.fromarray(ramp).save(root / "val" / "a" / "0.png")
    assert Image.open(root / "val" / "a" / "0.png").mode.startswith("I")
    ds = build_dataset(f"imagefolder:{root}", "val")
    decoded = np.asarray(ds.image(ds.paths.index(str(root / "val" / "a" / "0.png"))))
    assert decoded.shape == (16, 16, 3) and decoded.dtype == np.uint8
    np.testing.assert_allclose(decoded[..., 0], np.rint(ramp / 257.0), atol=1)
    assert 120 < decoded.mean() < 135  # Pillow's own convert("RGB") gives 254.x (everything above 255 white)


def test_skip_corrupt_with_limit_counts_readable_images_only(tmp_path):
    root = _folder(tmp_path / "d")
    bad = root / "val" / "a" / "0.png"
    bad.write_bytes(b"not a png")
    ds = build_dataset(f"imagefolder:{root}", "val", skip_corrupt=True, limit=4)
    assert len(ds) == 4 and ds.skipped == [str(bad)] and str(bad) not in ds.paths
    assert len(build_dataset(f"imagefolder:{root}", "val", limit=4)) == 4  # without skipping: the first 4 files
    assert len(build_dataset(f"imagefolder:{root}", "val", skip_corrupt=True)) == 5


def test_nested_class_folders_and_loose_images_are_named(tmp_path):
    root = _folder(tmp_path / "d")
    (root / "val" / "a" / "sub").mkdir()
    for p in sorted((root / "val" / "a").glob("*.png")):
        p.rename(root / "val" / "a" / "sub" / p.name)
    for p in sorted((root / "val" / "b").glob("*.png")):
        (root / "val" / "b" / "deeper").mkdir(exist_ok=True)
        p.rename(root / "val" / "b" / "deeper" / p.name)
    with pytest.raises(DataError) as info:
        build_dataset(f"imagefolder:{root}", "val")
    assert str(info.value) == (
        f"{root}/val has a folder inside a class folder ({root}/val/a/sub); one level of class folders holding the "
        f"images directly, expected ImageNet layout: {root}/train/<class>/*.JPEG and {root}/val/<class>/*.JPEG")
    flat = _folder(tmp_path / "flat", classes=("only",))
    for p in sorted((flat / "val" / "only").glob("*.png")):
        p.rename(flat / "val" / p.name)
    (flat / "val" / "only").rmdir()
    with pytest.raises(DataError, match=r"val holds images outside class folders \(e\.g\. .*0\.png\)"):
        build_dataset(f"imagefolder:{flat}", "val")


def test_a_local_folder_prints_no_download_progress(tmp_path, capfd):
    import datasets

    root = _folder(tmp_path / "d")
    capfd.readouterr()
    build_dataset(f"imagefolder:{root}", "val")
    err = capfd.readouterr().err
    assert "Downloading" not in err and "Generating" not in err and "Resolving" not in err
    assert not datasets.are_progress_bars_disabled()  # restored for the caller


def test_damaged_json_files_are_named(tmp_path):
    from vitbench.report import read_json_file, read_jsonl_file

    root = _folder(tmp_path / "d")
    (root / "boxes.json").write_text('{"val/a/0.png": [1, 2, 3, 4],}')
    with pytest.raises(ValueError) as info:
        build_dataset(f"imagefolder:{root}", "val")
    assert str(info.value) == (f"{root}/boxes.json is not valid JSON (Expecting property name enclosed in double "
                               "quotes at line 1, column 30); it is damaged")
    log = tmp_path / "log.jsonl"
    log.write_bytes(b'{"epoch": 0}\n\xff\xfe{"epoch": 1}\n')
    with pytest.raises(ValueError, match=f"^{log} is not UTF-8 text \\(byte 13: invalid start byte\\); it is damaged$"):
        read_jsonl_file(log)
    log.write_text('{"epoch": 0}\n{"epoch": \n')
    with pytest.raises(ValueError, match=f"^{log} line 2 is not valid JSON"):
        read_jsonl_file(log)
    log.write_text('{"epoch": 0}\n\n{"epoch": 1}\n')
    assert read_jsonl_file(log) == [{"epoch": 0}, {"epoch": 1}]
    (tmp_path / "ok.json").write_text('{"a": [1]}')
    assert read_json_file(tmp_path / "ok.json") == {"a": [1]}


def test_a_damaged_config_json_of_a_run_is_named(tmp_path, monkeypatch, capsys):
    from vitbench.train import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "R").mkdir()
    (tmp_path / "R" / "config.json").write_text('{"lr": 0.1,')
    (tmp_path / "R" / "log.jsonl").write_bytes(b'{"event": "start"}\n\xff\xfe\n')
    rc = main(["--cpu", "--resume", "auto", "--output-dir", "R", "--limit-train", "8", "--limit-val", "8",
               "--num-workers", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().splitlines()[-1] == (
        "vitbench-train: error: R/config.json is not valid JSON (Expecting property name enclosed in double quotes "
        "at line 1, column 12); it is damaged"), err


def test_skip_corrupt_with_limit_counts_readable_clips_only(tmp_path, monkeypatch):
    from vitbench import video

    monkeypatch.setenv("VITBENCH_CACHE", str(tmp_path / "cache"))
    cfg = video.MovingDigitsConfig(train_size=6, val_size=4, frames=6, canvas=40)
    sampling = video.ClipSampling(frames=3, stride=2, crop=32, jitter=(32, 40))
    root = video.export(tmp_path / "vf", cfg)
    full = video.build_video_dataset(f"videofolder:{root}", "val", sampling)
    bad = full.paths[0]
    Path(bad).write_bytes(b"not a video at all")
    kept = video.build_video_dataset(f"videofolder:{root}", "val", sampling, skip_corrupt=True, limit=3)
    assert len(kept) == 3 and kept.skipped == [bad] and kept.paths == full.paths[1:4]
