import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from vitbench.data import (
    CorruptImageError, DataError, DataSpec, build_dataset, data_defaults, eval_transform, parse_data_spec,
    train_sampler_indices, train_transform,
)

CLASS_DIRS = ["n01443537", "10", "9", "B_upper", "a_lower"]


def _folder(root, per_class=2, size=(40, 30)):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in CLASS_DIRS:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def test_parse_data_spec():
    assert parse_data_spec("digits") == DataSpec("digits")
    assert parse_data_spec("imagefolder:/data/in1k") == DataSpec("imagefolder", path="/data/in1k")
    assert parse_data_spec("hf:imagenet-1k") == DataSpec("hf", name="imagenet-1k")
    assert parse_data_spec("hf:user/set:cfg") == DataSpec("hf", name="user/set", config="cfg")
    assert parse_data_spec("arrow:/x") == DataSpec("arrow", path="/x")
    assert parse_data_spec("digits:train_size=20,val_size=10").options == (("train_size", 20), ("val_size", 10))
    for bad in ("imagenet", "imagefolder:", "hf:", "digits:x", "digits:train_size=0", "digits:depth=3"):
        with pytest.raises(DataError):
            parse_data_spec(bad)


def test_image_folder_offline_with_torchvision_label_order(tmp_path):
    root = _folder(tmp_path)
    ds = build_dataset(f"imagefolder:{root}", "train")
    tv = ImageFolder(str(root / "train"))
    assert ds.classes == tv.classes == sorted(CLASS_DIRS)
    by_name = {p.split("/")[-2] + "/" + p.split("/")[-1]: y for p, y in tv.samples}
    assert len(ds) == len(tv)
    for path, label in zip(ds.paths, ds.labels):
        assert by_name["/".join(path.split("/")[-2:])] == label
    image, label, index = ds[3]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and index == 3
    assert len(build_dataset(f"imagefolder:{root}", "val")) == 2 * len(CLASS_DIRS)


def test_missing_paths_give_clear_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        build_dataset(f"imagefolder:{tmp_path / 'nope'}", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="ImageNet layout"):
        build_dataset(f"imagefolder:{tmp_path / 'empty'}", "val")
    with pytest.raises(DataError, match="not found"):
        build_dataset(f"arrow:{tmp_path / 'nope'}", "val")
    with pytest.raises(DataError, match="split"):
        build_dataset("digits:train_size=10,val_size=10", "test")


def test_hub_dataset_offline_fails_fast_with_a_clear_message():
    with pytest.raises(DataError, match="Hub"):
        build_dataset("hf:no-such-user/no-such-dataset", "val")


def test_corrupt_image_is_named_or_skipped_and_counted(tmp_path):
    root = _folder(tmp_path)
    bad = root / "train" / "9" / "1.png"
    bad.write_bytes(b"this is not a png")
    ds = build_dataset(f"imagefolder:{root}", "train")
    index = ds.paths.index(str(bad))
    with pytest.raises(CorruptImageError, match="9/1.png"):
        ds[index]
    skipping = build_dataset(f"imagefolder:{root}", "train", skip_corrupt=True)
    assert len(skipping) == len(ds) - 1 and skipping.skipped == [str(bad)]
    assert all(skipping[i][0] is not None for i in range(len(skipping)))


def test_arrow_dataset(tmp_path):
    import datasets

    images = [Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)) for i in range(4)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y"])})
    dd = datasets.DatasetDict({"validation": datasets.Dataset.from_dict(
        {"image": images, "label": [0, 1, 0, 1]}, features=features)})
    dd.save_to_disk(str(tmp_path / "saved"))
    ds = build_dataset(f"arrow:{tmp_path / 'saved'}", "val")
    assert ds.classes == ["x", "y"] and list(ds.labels) == [0, 1, 0, 1]
    assert np.asarray(ds[2][0])[0, 0, 0] == 80


def test_eval_transform_is_deit_resize_and_center_crop():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ours = eval_transform(224, mean, std, crop_pct=0.875)(img)
    deit = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                      T.Normalize(mean, std)])(img)
    assert ours.shape == (3, 224, 224)
    torch.testing.assert_close(ours, deit)


def test_seeded_augmentation_is_a_function_of_seed_epoch_and_index():
    dd = data_defaults("digits")
    ds = build_dataset("digits:train_size=10,val_size=10", "val", train_transform(112, dd.mean, dd.std, dd))
    ds.seed = 5
    a, b = ds[1][0], ds[1][0]
    torch.testing.assert_close(a, b)
    ds.set_epoch(1)
    assert not torch.equal(a, ds[1][0])
    state = torch.get_rng_state()
    ds[2]
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is left alone


@pytest.mark.parametrize("repeats", [0, 3])
def test_train_sampler_shards_without_overlap(repeats):
    n, world = 1024, 2
    ranks = [train_sampler_indices(n, epoch=3, seed=0, rank=r, world=world, repeated_aug=repeats) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])
    assert ranks[0] == train_sampler_indices(n, 3, 0, 0, world, repeats)  # deterministic
    assert ranks[0] != train_sampler_indices(n, 4, 0, 0, world, repeats)  # reshuffled per epoch
    if repeats:
        # each sample's repeats land on different ranks (DeiT's repeated augmentation)
        assert len(ranks[0]) == n // 256 * 256 // world
    else:
        assert sorted(ranks[0] + ranks[1]) == list(range(n))
