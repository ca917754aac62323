"""The embedded offline dataset: cluttered handwritten digits.

Each image is a textured canvas holding one handwritten digit (scikit-learn's bundled UCI optdigits, 8 x 8 px) at a
random position and scale, plus distractor fragments cut from other digits. The class-discriminative region is small
and its ground-truth box is known, so localisation can be measured. Train and validation draw on disjoint source
digits. Every image is a pure function of ``(seed, split, index)``, so the data are identical on every machine and
cheap to regenerate; generated splits are cached as ``.npz`` under ``$VITBENCH_CACHE`` (default
``~/.cache/vitbench``).

``vitbench-digits export DIR`` writes the data as an ImageNet-style image folder plus ``boxes.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from .cli import parse

GENERATOR_VERSION = 1
CLASSES = tuple(str(d) for d in range(10))
SPLITS = ("train", "val")
S = TypeVar("S")


@dataclass(frozen=True)
class DigitsConfig:
    """Size and geometry of the embedded dataset."""

    train_size: int = 10_000
    val_size: int = 2_000
    canvas: int = 112
    seed: int = 0
    val_fraction: float = 0.25
    min_scale: float = 5.0
    max_scale: float = 8.0
    fragments: tuple[int, int] = (1, 3)

    def __post_init__(self):
        if self.train_size < 1 or self.val_size < 1:
            raise ValueError(f"split sizes must be positive, got {self.train_size}/{self.val_size}")
        check_geometry(self)

    def size(self, split: str) -> int:
        return split_size(self, split)

    def key(self) -> str:
        return config_key(self, GENERATOR_VERSION)


@dataclass(frozen=True)
class DigitsSplit:
    """One generated split: ``images`` uint8 [N, H, W, 3], ``labels`` int64 [N], ``boxes`` int64 [N, 4] as
    ``(x0, y0, x1, y1)`` canvas pixels with exclusive ends."""

    images: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray


# Shared by the generated data sets (these images, the clips of vitbench.moving_digits): their configurations have
# the fields train_size, val_size, canvas, seed, val_fraction, min_scale, max_scale and fragments.
def check_geometry(cfg) -> None:
    """The checks every generated data set's configuration makes (``ValueError`` naming the bad value)."""
    if cfg.canvas < 8 * cfg.max_scale + 2:
        raise ValueError(f"canvas {cfg.canvas} px is too small for digits up to {8 * cfg.max_scale:.0f} px")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {cfg.val_fraction}")
    if not 1.0 <= cfg.min_scale <= cfg.max_scale:
        raise ValueError(f"need 1 <= min_scale <= max_scale, got {cfg.min_scale}, {cfg.max_scale}")


def split_size(cfg, split: str) -> int:
    return {"train": cfg.train_size, "val": cfg.val_size}[_check_split(split)]


def config_key(cfg, version: int) -> str:
    """The cache key of a configuration: a hash of its fields and the generator version."""
    blob = json.dumps({"version": version, **asdict(cfg)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown digits split {split!r}; expected one of {SPLITS}")
    return split


def source_digits(cfg, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The source 8 x 8 digits (intensity in [0, 1]) and labels of a split; train and val are disjoint. ``cfg`` is
    any generated data set's configuration (its ``seed`` and ``val_fraction`` are used)."""
    images, targets = optdigits()
    order = np.random.default_rng(cfg.seed).permutation(len(images))
    n_val = int(round(cfg.val_fraction * len(images)))
    chosen = order[:n_val] if _check_split(split) == "val" else order[n_val:]
    return images[chosen], targets[chosen]


def optdigits() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 UCI handwritten digits bundled with scikit-learn (``load_digits``), read from the package's data
    file without importing scikit-learn itself (which takes seconds): float32 [1797, 8, 8] in [0, 1], labels."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the embedded dataset needs scikit-learn's bundled digits: pip install scikit-learn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    return table[:, :-1].reshape(-1, 8, 8) / 16.0, table[:, -1].astype(np.int64)


def upscale(glyph: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear upscaling of a small map ``[h, w, ...]`` to ``height x width`` (pure numpy, platform independent)."""
    h, w = glyph.shape[:2]
    extra = (None,) * (glyph.ndim - 2)
    ys = (np.arange(height) + 0.5) * h / height - 0.5
    xs = (np.arange(width) + 0.5) * w / width - 0.5
    y0 = np.clip(np.floor(ys).astype(int), 0, h - 1)
    x0 = np.clip(np.floor(xs).astype(int), 0, w - 1)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    wy = np.clip(ys - y0, 0.0, 1.0)[(slice(None), None, *extra)]
    wx = np.clip(xs - x0, 0.0, 1.0)[(None, slice(None), *extra)]
    top = glyph[y0][:, x0] * (1 - wx) + glyph[y0][:, x1] * wx
    bottom = glyph[y1][:, x0] * (1 - wx) + glyph[y1][:, x1] * wx
    return (top * (1 - wy) + bottom * wy).astype(np.float32)


def background(rng: np.random.Generator, canvas: int) -> np.ndarray:
    """A textured ``canvas`` x ``canvas`` RGB background in [0, 1]: smooth colour blobs plus grain."""
    coarse = rng.uniform(0.0, 1.0, size=(6, 6, 3)).astype(np.float32)
    smooth = upscale(coarse, canvas, canvas)
    base = rng.uniform(0.05, 0.35, size=3).astype(np.float32)
    grain = rng.normal(0.0, 0.04, size=(canvas, canvas, 1)).astype(np.float32)
    return np.clip(base + 0.25 * smooth + grain, 0.0, 1.0)


def paste(canvas: np.ndarray, alpha: np.ndarray, top: int, left: int, colour: np.ndarray) -> None:
    """Blend ``colour`` into ``canvas`` in place through the mask ``alpha`` placed at ``(top, left)``."""
    h, w = alpha.shape
    region = canvas[top : top + h, left : left + w]
    a = np.clip(alpha, 0.0, 1.0)[..., None]
    region[...] = region * (1 - a) + colour * a


@dataclass(frozen=True)
class Digit:
    """The digit of one sample: index of its source glyph, its upscaled mask and the extent of the ink in the mask
    ``(x0, y0, x1, y1)``, exclusive ends."""

    source: int
    alpha: np.ndarray
    extent: tuple[int, int, int, int]

    def box(self, top: int, left: int) -> tuple[int, int, int, int]:
        """The ground-truth box of the ink with the mask's top-left corner at ``(top, left)``."""
        x0, y0, x1, y1 = self.extent
        return left + x0, top + y0, left + x1, top + y1


def draw_digit(rng: np.random.Generator, glyphs: np.ndarray, cfg) -> Digit:
    """Draw a source glyph and a scale in ``[cfg.min_scale, cfg.max_scale]`` (in this order) and upscale it."""
    src = int(rng.integers(len(glyphs)))
    side = int(round(8 * rng.uniform(cfg.min_scale, cfg.max_scale)))
    alpha = upscale(glyphs[src], side, side)
    ys, xs = np.nonzero(alpha > 0.15)
    return Digit(src, alpha, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))


def fragments(rng: np.random.Generator, glyphs: np.ndarray, cfg) -> Iterator[np.ndarray]:
    """The distractor fragments of one sample: their number in ``cfg.fragments`` (inclusive), then for each a
    rectangle cut from a random glyph, upscaled by a scale in ``[cfg.min_scale, cfg.max_scale]``. Drawn lazily, so
    the caller may draw from ``rng`` between fragments (their placement)."""
    for _ in range(int(rng.integers(cfg.fragments[0], cfg.fragments[1] + 1))):
        glyph = glyphs[int(rng.integers(len(glyphs)))]
        fh, fw = int(rng.integers(2, 5)), int(rng.integers(2, 5))
        fy, fx = int(rng.integers(0, 9 - fh)), int(rng.integers(0, 9 - fw))
        fscale = rng.uniform(cfg.min_scale, cfg.max_scale)
        yield upscale(glyph[fy : fy + fh, fx : fx + fw], int(round(fh * fscale)), int(round(fw * fscale)))


def _overlaps(box: tuple[int, int, int, int], other: tuple[int, int, int, int]) -> bool:
    return not (box[2] <= other[0] or other[2] <= box[0] or box[3] <= other[1] or other[3] <= box[1])


def render(cfg: DigitsConfig, split: str, index: int, glyphs: np.ndarray, labels: np.ndarray):
    """Render image ``index`` of ``split``: returns (uint8 [H, W, 3], label, box)."""
    rng = np.random.default_rng([cfg.seed, SPLITS.index(_check_split(split)), index])
    size = cfg.canvas
    canvas = background(rng, size)

    digit = draw_digit(rng, glyphs, cfg)
    side = digit.alpha.shape[0]
    top = int(rng.integers(0, size - side + 1))
    left = int(rng.integers(0, size - side + 1))
    box = digit.box(top, left)

    for piece in fragments(rng, glyphs, cfg):
        ph, pw = piece.shape
        for _attempt in range(20):
            py, px = int(rng.integers(0, size - ph + 1)), int(rng.integers(0, size - pw + 1))
            if not _overlaps((px, py, px + pw, py + ph), box):
                paste(canvas, piece, py, px, rng.uniform(0.55, 1.0, size=3).astype(np.float32))
                break

    paste(canvas, digit.alpha, top, left, rng.uniform(0.6, 1.0, size=3).astype(np.float32))
    image = np.round(canvas * 255.0).astype(np.uint8)
    return image, int(labels[digit.source]), np.asarray(box, dtype=np.int64)


def generate(cfg: DigitsConfig, split: str) -> DigitsSplit:
    """Generate a whole split (no cache)."""
    glyphs, labels = source_digits(cfg, split)
    n = cfg.size(split)
    images = np.empty((n, cfg.canvas, cfg.canvas, 3), dtype=np.uint8)
    out_labels = np.empty(n, dtype=np.int64)
    boxes = np.empty((n, 4), dtype=np.int64)
    for i in range(n):
        images[i], out_labels[i], boxes[i] = render(cfg, split, i, glyphs, labels)
    return DigitsSplit(images, out_labels, boxes)


def cache_dir() -> Path:
    return Path(os.environ.get("VITBENCH_CACHE", Path.home() / ".cache" / "vitbench"))


def cached_split(path: Path, cls: type[S], generate_split: Callable[[], S]) -> S:
    """A generated split (``cls``, a dataclass of arrays) from the ``.npz`` cache file ``path`` when present;
    generated (seconds) and cached atomically otherwise. A damaged cache entry is regenerated; a read-only home
    still works, just without the cache."""
    if path.is_file():
        try:
            with np.load(path) as z:
                return cls(*(z[f.name] for f in fields(cls)))
        except (OSError, ValueError, KeyError):
            path.unlink(missing_ok=True)
    data = generate_split()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
            np.savez(f, **{field.name: getattr(data, field.name) for field in fields(data)})
        os.replace(f.name, path)
    except OSError:
        pass
    return data


def load_split(split: str, cfg: DigitsConfig | None = None) -> DigitsSplit:
    """A split, from the cache when present; generated (seconds) and cached atomically otherwise."""
    cfg = cfg or DigitsConfig()
    return cached_split(cache_dir() / "digits" / f"{split}-{cfg.key()}.npz", DigitsSplit, lambda: generate(cfg, split))


def export(root: str | os.PathLike, cfg: DigitsConfig | None = None) -> Path:
    """Write ``root/{train,val}/<digit>/<index>.png`` and ``root/boxes.json`` (relative path -> box)."""
    cfg = cfg or DigitsConfig()
    root = Path(root)
    boxes = {}
    for split in SPLITS:
        data = load_split(split, cfg)
        for name in CLASSES:
            (root / split / name).mkdir(parents=True, exist_ok=True)
        for i, (image, label, box) in enumerate(zip(data.images, data.labels, data.boxes)):
            rel = f"{split}/{CLASSES[label]}/{i:05d}.png"
            Image.fromarray(image).save(root / rel, format="PNG", optimize=False, compress_level=6)
            boxes[rel] = [int(v) for v in box]
    (root / "boxes.json").write_text(json.dumps(boxes, indent=0, sort_keys=True) + "\n")
    return root


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vitbench-digits",
        description="The embedded cluttered-digits dataset. 'export DIR' writes it as an image folder "
        "(DIR/train/<digit>/*.png, DIR/val/<digit>/*.png, DIR/boxes.json) usable as --data imagefolder:DIR.",
    )
    p.add_argument("command", choices=["export", "info"], help="export: write an image folder; info: print stats")
    p.add_argument("directory", nargs="?", help="target directory for export")
    p.add_argument("--train-size", type=int, default=DigitsConfig.train_size, help="training images")
    p.add_argument("--val-size", type=int, default=DigitsConfig.val_size, help="validation images")
    p.add_argument("--canvas", type=int, default=DigitsConfig.canvas, help="canvas side in pixels")
    p.add_argument("--seed", type=int, default=DigitsConfig.seed, help="seed of the generated images")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse(parser, argv)
    try:
        cfg = DigitsConfig(train_size=args.train_size, val_size=args.val_size, canvas=args.canvas, seed=args.seed)
    except ValueError as e:
        parser.error(str(e))
    if args.command == "export":
        if not args.directory:
            parser.error("export needs a target DIRECTORY")
        target = Path(args.directory)
        if target.exists() and not target.is_dir():
            parser.error(f"{target} is a file, not a directory; choose a new directory")
        if target.exists() and any(target.iterdir()):
            parser.error(f"{target} exists and is not empty; choose a new directory")
        export(target, cfg)
        print(f"wrote {cfg.train_size} train and {cfg.val_size} val images to {target} "
              f"(use --data imagefolder:{target})")
        return 0
    for split in SPLITS:
        data = load_split(split, cfg)
        side = data.boxes[:, 2:] - data.boxes[:, :2]
        counts = np.bincount(data.labels, minlength=10).tolist()
        print(f"{split}: {len(data.labels)} images {cfg.canvas}px, per class {counts}, "
              f"digit side {side.min()}-{side.max()} px")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
