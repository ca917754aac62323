"""Datasets, DeiT transforms and loaders behind every ``--data`` flag.

Dataset specs:

* ``digits`` -- the embedded cluttered-digits set (:mod:`vitbench.digits`), offline, with ground-truth boxes;
  options as ``digits:train_size=2000,val_size=500,canvas=112,seed=0``;
* ``imagefolder:PATH`` -- ImageNet layout (``PATH/train/<class>/*``, ``PATH/val/<class>/*``) read through
  ``datasets``' ``imagefolder`` builder; class order = sorted directory names, as torchvision's ``ImageFolder``;
  a ``PATH/boxes.json`` (as written by ``vitbench-digits export``) is picked up;
* ``hf:NAME[:CONFIG]`` -- a Hub dataset such as ``hf:imagenet-1k`` (needs the Hub);
* ``arrow:PATH`` -- a dataset saved with ``save_to_disk``.

Specs are parsed by :mod:`vitbench.dataspec`; clips are read by :mod:`vitbench.video`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import random
from dataclasses import dataclass, replace
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from timm.data.transforms_factory import transforms_imagenet_eval
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from . import digits as digits_lib
from .dataspec import DataError, DataSpec, parse_data_spec  # also importable from here, as before
from .report import read_json_file

log = logging.getLogger(__name__)
SPLIT_ALIASES = {"train": ("train",), "val": ("validation", "val", "valid", "test")}


class CorruptImageError(DataError):
    """An image file that cannot be decoded; the message names the file."""


def decode_message(e: Exception) -> str:
    """The 'cannot decode image/video ...' line of an error, also when a DataLoader worker wrapped it in its
    traceback ("Caught CorruptImageError in DataLoader worker process 0 ...")."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for line in reversed(lines):
        if "cannot decode " in line:
            return line[line.index("cannot decode "):]
    return lines[0] if lines else type(e).__name__


@dataclass(frozen=True)
class DataDefaults:
    """Per-dataset defaults: evaluation geometry and the training-recipe values that differ from DeiT's."""

    num_classes: int
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 0.875
    hflip: float = 0.5
    scale: tuple[float, float] = (0.08, 1.0)
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.3
    reprob: float = 0.25
    mixup: float = 0.8
    cutmix: float = 1.0
    repeated_aug: bool = True


IMAGENET_DEFAULTS = DataDefaults(1000, 224, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
# Digits: no flips (they change the class), no random crops or erasing (they cut the digit away), no mixing.
DIGITS_DEFAULTS = DataDefaults(
    num_classes=10, img_size=112, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0, hflip=0.0,
    scale=(1.0, 1.0), auto_augment="rand-m6-mstd0.5-inc1", reprob=0.0, mixup=0.0, cutmix=0.0, repeated_aug=False,
)

# Clips: augmented by their sampling only (vitbench.video: random start, scale jitter, crop, flip), as the video
# transformers' recipes; no RandAugment, colour jitter, erasing, mixing or repeated augmentation.
VIDEO_DEFAULTS = replace(IMAGENET_DEFAULTS, num_classes=400, crop_pct=1.0, auto_augment=None, color_jitter=0.0,
                         reprob=0.0, mixup=0.0, cutmix=0.0, repeated_aug=False)
MOVING_DIGITS_DEFAULTS = replace(VIDEO_DEFAULTS, num_classes=10, img_size=64, mean=(0.5, 0.5, 0.5),
                                 std=(0.5, 0.5, 0.5), hflip=0.0)


def data_defaults(spec: str | DataSpec, num_classes: int | None = None) -> DataDefaults:
    spec = parse_data_spec(spec)
    base = {"digits": DIGITS_DEFAULTS, "moving-digits": MOVING_DIGITS_DEFAULTS,
            "videofolder": VIDEO_DEFAULTS}.get(spec.kind, IMAGENET_DEFAULTS)
    return replace(base, num_classes=num_classes) if num_classes else base


def train_transform(img_size: int, mean, std, defaults: DataDefaults = IMAGENET_DEFAULTS,
                    interpolation: str = "bicubic"):
    """DeiT training transform (timm): random-resized crop, flip, RandAugment, colour jitter, random erasing."""
    return create_transform(
        input_size=img_size, is_training=True, scale=defaults.scale, hflip=defaults.hflip,
        color_jitter=defaults.color_jitter, auto_augment=defaults.auto_augment, interpolation=interpolation,
        re_prob=defaults.reprob, re_mode="pixel", re_count=1, mean=tuple(mean), std=tuple(std),
    )


def eval_transform(img_size: int, mean, std, crop_pct: float = 0.875, interpolation: str = "bicubic"):
    """DeiT evaluation transform: resize the short side to ``int(img_size / crop_pct)``, centre crop, normalise."""
    return transforms_imagenet_eval(img_size=img_size, crop_pct=crop_pct, interpolation=interpolation,
                                    mean=tuple(mean), std=tuple(std))


@contextlib.contextmanager
def preserved_rng():
    """Run a block without disturbing the caller's python/numpy/torch (CPU) random states."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


@contextlib.contextmanager
def _seeded(seed: int):
    """Run a block with python/numpy/torch RNGs seeded, restoring the caller's states afterwards."""
    with preserved_rng():
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        yield


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB. 16-bit greyscale (PNG ``I;16``, read by Pillow as ``I;16`` or ``I``) is scaled to 8 bits
    (value / 257), where Pillow's own conversion clips every value above 255 to white."""
    if img.mode.startswith("I;16") or img.mode == "I":
        values = np.asarray(img).astype(np.float64)
        if img.mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / 257.0
        img = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def _decode(item: Any, where: str) -> Image.Image:
    try:
        if isinstance(item, Image.Image):
            return to_rgb(item)
        if item.get("bytes"):
            return to_rgb(Image.open(io.BytesIO(item["bytes"])))
        return to_rgb(Image.open(item["path"]))
    except Exception as e:
        raise CorruptImageError(f"cannot decode image {where}: {e}") from e


class ImageDataset(Dataset):
    """Images + labels from any source, yielding ``(image, label, index)``.

    With ``seed`` set, the random augmentation of sample ``i`` in epoch ``e`` is a pure function of
    ``(seed, e, i)``: results do not depend on worker count, batch position or resumption.
    """

    def __init__(self, source, labels: np.ndarray, classes: list[str], transform=None,
                 boxes: np.ndarray | None = None, canvas: int | None = None, paths: list[str] | None = None,
                 name: str = ""):
        self.source = source
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = list(classes)
        self.transform = transform
        self.boxes = boxes
        self.canvas = canvas
        self.paths = paths
        self.name = name
        self.seed: int | None = None
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def image(self, index: int) -> Image.Image:
        """The decoded, untransformed image."""
        if isinstance(self.source, np.ndarray):
            return Image.fromarray(self.source[index])
        where = self.paths[index] if self.paths else f"#{index} of {self.name}"
        return _decode(self.source[index]["image"], where)

    def __getitem__(self, index: int):
        img = self.image(index)
        if self.transform is not None:
            if self.seed is None:
                img = self.transform(img)
            else:
                with _seeded(hash((self.seed, self.epoch, index)) & 0x7FFF_FFFF_FFFF):
                    img = self.transform(img)
        return img, int(self.labels[index]), index

    def boxes_for(self, indices, img_size: int) -> torch.Tensor | None:
        """Ground-truth boxes ``(x0, y0, x1, y1)`` in pixels of the ``img_size`` model input (square resize of the
        canvas, i.e. crop_pct 1.0), or ``None`` when the dataset has no boxes."""
        if self.boxes is None:
            return None
        idx = torch.as_tensor(indices, dtype=torch.long)
        return torch.as_tensor(self.boxes, dtype=torch.float32)[idx] * (img_size / self.canvas)

    def select(self, indices) -> ImageDataset:
        """A subset view (e.g. the first N validation images)."""
        indices = np.asarray(indices, dtype=np.int64)
        if isinstance(self.source, np.ndarray):
            source = self.source[indices]
        else:
            source = self.source.select(indices.tolist())
        return ImageDataset(
            source, self.labels[indices], self.classes, self.transform,
            None if self.boxes is None else self.boxes[indices], self.canvas,
            None if self.paths is None else [self.paths[i] for i in indices], self.name,
        )


def _hf_split(dd, split: str, where: str):
    for name in SPLIT_ALIASES[split]:
        if name in dd:
            return dd[name]
    raise DataError(f"{where} has no {split!r} split (found {sorted(dd)})")


def _from_hf(ds, where: str, boxes_file: Path | None = None) -> ImageDataset:
    import datasets  # deferred: importing it takes seconds, and the embedded digits never need it

    image_col = "image" if "image" in ds.column_names else "img" if "img" in ds.column_names else None
    label_col = "label" if "label" in ds.column_names else "labels" if "labels" in ds.column_names else None
    if image_col is None or label_col is None:
        raise DataError(f"{where}: need an image and a label column, found {ds.column_names}")
    if image_col != "image":
        ds = ds.rename_column(image_col, "image")
    ds = ds.cast_column("image", datasets.Image(decode=False))
    feature = ds.features[label_col]
    classes = list(feature.names) if hasattr(feature, "names") else [str(i) for i in range(max(ds[label_col]) + 1)]
    labels = np.asarray(ds[label_col], dtype=np.int64)
    paths = [item["path"] or f"#{i} of {where}" for i, item in enumerate(ds["image"])]
    boxes = canvas = None
    if boxes_file is not None and boxes_file.is_file():
        table = read_json_file(boxes_file)
        root = boxes_file.parent
        rel = [str(Path(p).resolve().relative_to(root.resolve())) for p in paths]
        if all(r in table for r in rel):
            boxes = np.asarray([table[r] for r in rel], dtype=np.int64)
            canvas = Image.open(paths[0]).size[0]
    return ImageDataset(ds.select_columns(["image"]), labels, classes, boxes=boxes, canvas=canvas, paths=paths,
                        name=where)


@contextlib.contextmanager
def quiet_datasets(datasets):
    """``datasets``' progress bars off while a local folder is read (its "Downloading data" / "Generating split"
    bars are no download), restored afterwards."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def layout_problem(root: Path, splits: list[str]) -> str:
    """Why an image folder yields no class labels: images in a folder inside a class folder, or images beside the
    class folders (the ImageNet layout wants ``split/<class>/<image>``)."""
    expected = f"expected ImageNet layout: {root}/train/<class>/*.JPEG and {root}/val/<class>/*.JPEG"
    for split_dir in (root / s for s in splits if (root / s).is_dir()):
        entries = sorted(split_dir.iterdir())
        loose = [p for p in entries if p.is_file() and not p.name.startswith(".")]
        if loose:
            return f"{split_dir} holds images outside class folders (e.g. {loose[0]}); {expected}"
        nested = [q for p in entries if p.is_dir() for q in sorted(p.iterdir()) if q.is_dir()]
        if nested:
            return f"{split_dir} has a folder inside a class folder ({nested[0]}); one level of class folders " \
                   f"holding the images directly, {expected}"
    return f"{root}: no class labels found; {expected}"


def _load_source(spec: DataSpec, split: str) -> ImageDataset:
    if spec.kind in ("moving-digits", "videofolder"):
        raise DataError(f"{spec} is video data: it needs a video model (vitbench.video.build_video_dataset)")
    if spec.kind == "digits":
        data = digits_lib.load_split(split, digits_lib.DigitsConfig(**dict(spec.options)))
        return ImageDataset(data.images, data.labels, list(digits_lib.CLASSES), boxes=data.boxes,
                            canvas=data.images.shape[1], name="digits")
    import datasets  # deferred: importing it takes seconds, and the embedded digits never need it

    if spec.kind == "imagefolder":
        root = Path(spec.path).expanduser()
        if not root.is_dir():
            raise DataError(f"image folder not found: {root}")
        sub = {"train": ["train"], "val": ["val", "validation"]}[split]
        if not any((root / s).is_dir() for s in sub):
            raise DataError(f"{root} has no {'/'.join(sub)} directory (expected ImageNet layout: "
                            f"{root}/train/<class>/*.JPEG and {root}/val/<class>/*.JPEG)")
        try:
            with quiet_datasets(datasets):
                dd = datasets.load_dataset("imagefolder", data_dir=str(root))
        except Exception as e:
            raise DataError(f"could not read image folder {root}: {e}") from e
        ds = _hf_split(dd, split, str(root))
        if "label" not in ds.column_names:
            raise DataError(layout_problem(root, sub))
        return _from_hf(ds, str(root), root / "boxes.json")
    if spec.kind == "arrow":
        root = Path(spec.path).expanduser()
        if not root.exists():
            raise DataError(f"saved dataset not found: {root}")
        try:
            with quiet_datasets(datasets):
                dd = datasets.load_from_disk(str(root))
        except Exception as e:
            raise DataError(f"{root} is not a dataset saved with save_to_disk: {e}") from e
        ds = _hf_split(dd, split, str(root)) if isinstance(dd, datasets.DatasetDict) else dd
        return _from_hf(ds, str(root))
    try:
        hf_split = "train" if split == "train" else "validation"
        ds = datasets.load_dataset(spec.name, spec.config, split=hf_split)
    except Exception as e:
        raise DataError(
            f"could not load Hub dataset {spec.name!r} ({type(e).__name__}: {e}). The Hub must be reachable "
            "(and the dataset's terms accepted, `huggingface-cli login`); offline, use imagefolder:PATH or "
            "arrow:PATH instead."
        ) from e
    return _from_hf(ds, str(spec))


def drop_unreadable(dataset, decode: Callable[[int], object], error: type[Exception], kind: str,
                    limit: int | None = None, progress: bool = True):
    """``(dataset, skipped paths)``: ``dataset`` without the items ``decode(i)`` fails on with ``error`` (each logged,
    then their count), reading in order until ``limit`` good ones are found (all without a limit): with
    ``--skip-corrupt --limit N`` an unreadable file does not count toward the N. For image and video datasets with
    ``paths`` and ``select``."""
    good: list[int] = []
    bad: list[int] = []
    for i in tqdm(range(len(dataset)), desc=f"checking {kind}s", disable=not progress):
        if limit is not None and len(good) >= limit:
            break
        try:
            decode(i)
        except error as e:
            log.warning("%s", e)
            bad.append(i)
        else:
            good.append(i)
    if bad:
        log.warning("skipping %d unreadable %s(s) of %d", len(bad), kind, len(good) + len(bad))
    skipped = [dataset.paths[i] for i in bad]
    return (dataset.select(good) if len(good) < len(dataset) else dataset), skipped


def check_headers(dataset: ImageDataset) -> None:
    """Open the header of every image file of ``dataset`` (no decoding, so cheap even for ImageNet's validation
    split); raises :class:`CorruptImageError` naming the first file that is not an image. Images held as bytes in
    Arrow files are not checked here (reading them is a full pass)."""
    for path in [p for p in dataset.paths or [] if not p.startswith("#")]:
        try:
            with Image.open(path):
                pass
        except FileNotFoundError:  # a saved dataset keeps the original (possibly gone) paths next to the bytes
            continue
        except OSError as e:
            raise CorruptImageError(f"cannot decode image {path}: {e}; drop unreadable images with --skip-corrupt"
                                    ) from None


def build_dataset(spec: str | DataSpec, split: str, transform=None, skip_corrupt: bool = False,
                  limit: int | None = None) -> ImageDataset:
    """Load a split (``train`` or ``val``) of a dataset spec.

    An unreadable image raises :class:`CorruptImageError` naming the file when it is read; with
    ``skip_corrupt=True`` the images are checked first and the unreadable ones are dropped, logged and counted
    (``dataset.skipped``); ``limit`` then counts readable images only.
    """
    if split not in SPLIT_ALIASES:
        raise DataError(f"unknown split {split!r}; use 'train' or 'val'")
    dataset = _load_source(parse_data_spec(spec), split)
    skipped: list[str] = []
    if skip_corrupt and dataset.paths is not None:  # files: decode each (the embedded digits cannot be corrupt)
        dataset, skipped = drop_unreadable(dataset, lambda i: dataset.image(i).load(), CorruptImageError, "image",
                                           limit)
    elif limit is not None and limit < len(dataset):
        dataset = dataset.select(np.arange(limit))
    dataset.transform = transform
    dataset.skipped = skipped
    return dataset


def build_eval_loader(spec: str | DataSpec, img_size: int, mean, std, batch_size: int = 128,
                      crop_pct: float | None = None, num_workers: int = 2, limit: int | None = None,
                      skip_corrupt: bool = False) -> DataLoader:
    """Validation loader with the DeiT eval transform; yields ``(images, labels, indices)``."""
    crop = crop_pct if crop_pct is not None else data_defaults(spec).crop_pct
    dataset = build_dataset(spec, "val", eval_transform(img_size, mean, std, crop), skip_corrupt=skip_corrupt,
                            limit=limit)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())


def train_sampler_indices(num_samples: int, epoch: int, seed: int, rank: int, world: int,
                          repeated_aug: int = 0) -> list[int]:
    """This rank's sample order for an epoch: torch's seeded ``DistributedSampler`` shuffle, or timm's
    ``RepeatAugSampler`` (DeiT's repeated augmentation) when ``repeated_aug > 1``. Materialised as a list so a
    resumed run can skip the samples it already consumed."""
    if repeated_aug > 1:
        sampler = RepeatAugSampler(range(num_samples), num_replicas=world, rank=rank, num_repeats=repeated_aug)
    else:
        sampler = DistributedSampler(range(num_samples), num_replicas=world, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)
