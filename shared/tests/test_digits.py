import filecmp
import json

import numpy as np
import pytest
from torchvision.datasets import ImageFolder

from vitbench import digits
from vitbench.data import build_dataset


def test_generation_is_deterministic_and_index_addressable(small_digits):
    a = digits.generate(small_digits, "train")
    b = digits.generate(small_digits, "train")
    assert np.array_equal(a.images, b.images) and np.array_equal(a.boxes, b.boxes)
    glyphs, labels = digits.source_digits(small_digits, "train")
    image, label, box = digits.render(small_digits, "train", 17, glyphs, labels)
    assert np.array_equal(image, a.images[17]) and label == a.labels[17] and np.array_equal(box, a.boxes[17])


def test_train_and_val_use_disjoint_source_digits(small_digits):
    from sklearn.datasets import load_digits

    train, _ = digits.source_digits(small_digits, "train")
    val, _ = digits.source_digits(small_digits, "val")
    everything = sorted(g.astype("float32").tobytes() for g in load_digits().images / 16.0)
    # together the two splits are exactly the 1797 source digits, each used once: a partition
    assert sorted(g.tobytes() for g in [*train, *val]) == everything
    assert len(val) == round(small_digits.val_fraction * 1797)


def test_boxes_lie_inside_the_canvas_and_cover_the_digit(small_digits):
    for split in digits.SPLITS:
        data = digits.load_split(split, small_digits)
        c = small_digits.canvas
        assert data.images.shape == (small_digits.size(split), c, c, 3)
        x0, y0, x1, y1 = data.boxes.T
        assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= c).all() and (y1 <= c).all()
        assert (x1 > x0).all() and (y1 > y0).all()
        assert set(np.unique(data.labels)) <= set(range(10))


def test_cache_returns_the_same_data(small_digits):
    first = digits.load_split("val", small_digits)
    second = digits.load_split("val", small_digits)  # now from the cache file
    assert np.array_equal(first.images, second.images)


def test_export_twice_is_byte_identical_and_loads_as_image_folder(tmp_path, small_digits):
    a, b = tmp_path / "a", tmp_path / "b"
    digits.export(a, small_digits)
    digits.export(b, small_digits)
    cmp = filecmp.dircmp(a, b)
    assert not cmp.left_only and not cmp.right_only
    for split in ("train", "val"):
        for cls in digits.CLASSES:
            names = sorted(p.name for p in (a / split / cls).iterdir())
            _, mismatch, errors = filecmp.cmpfiles(a / split / cls, b / split / cls, names, shallow=False)
            assert not mismatch and not errors
    assert (a / "boxes.json").read_bytes() == (b / "boxes.json").read_bytes()

    ds = build_dataset(f"imagefolder:{a}", "val")
    tv = ImageFolder(str(a / "val"), allow_empty=True)
    assert ds.classes == tv.classes and len(ds.classes) == 10
    expected = {p.split("/")[-2] + "/" + p.split("/")[-1]: tv.class_to_idx[p.split("/")[-2]] for p, _ in tv.samples}
    for path, label in zip(ds.paths, ds.labels):
        assert expected["/".join(path.split("/")[-2:])] == label
    boxes = json.loads((a / "boxes.json").read_text())
    original = digits.load_split("val", small_digits)
    assert ds.boxes is not None and ds.boxes.shape == (30, 4) and len(boxes) == 90
    idx = [int(p.split("/")[-1][:-4]) for p in ds.paths]
    assert np.array_equal(ds.boxes, original.boxes[idx])


def test_cli_rejects_impossible_sizes(tmp_path):
    with pytest.raises(SystemExit):
        digits.main(["export", str(tmp_path / "x"), "--train-size", "0"])
    with pytest.raises(SystemExit):
        digits.main(["export", str(tmp_path / "x"), "--canvas", "20"])
