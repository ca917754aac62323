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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

GENERATOR_VERSION = 1
CLASSES = tuple(str(d) for d in range(10))
SPLITS = ("train", "val")


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
        if self.canvas < 8 * self.max_scale + 2:
            raise ValueError(f"canvas {self.canvas} px is too small for digits up to {8 * self.max_scale:.0f} px")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 1.0 <= self.min_scale <= self.max_scale:
            raise ValueError(f"need 1 <= min_scale <= max_scale, got {self.min_scale}, {self.max_scale}")

    def size(self, split: str) -> int:
        return {"train": self.train_size, "val": self.val_size}[_check_split(split)]

    def key(self) -> str:
        blob = json.dumps({"version": GENERATOR_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class DigitsSplit:
    """One generated split: ``images`` uint8 [N, H, W, 3], ``labels`` int64 [N], ``boxes`` int64 [N, 4] as
    ``(x0, y0, x1, y1)`` canvas pixels with exclusive ends."""

    images: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown digits split {split!r}; expected one of {SPLITS}")
    return split


def source_digits(cfg: DigitsConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The source 8 x 8 digits (intensity in [0, 1]) and labels of a split; train and val are disjoint."""
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


def _upscale(glyph: np.ndarray, height: int, width: int) -> np.ndarray:
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


def _background(rng: np.random.Generator, canvas: int) -> np.ndarray:
    coarse = rng.uniform(0.0, 1.0, size=(6, 6, 3)).astype(np.float32)
    smooth = _upscale(coarse, canvas, canvas)
    base = rng.uniform(0.05, 0.35, size=3).astype(np.float32)
    grain = rng.normal(0.0, 0.04, size=(canvas, canvas, 1)).astype(np.float32)
    return np.clip(base + 0.25 * smooth + grain, 0.0, 1.0)


def _paste(canvas: np.ndarray, alpha: np.ndarray, top: int, left: int, colour: np.ndarray) -> None:
    h, w = alpha.shape
    region = canvas[top : top + h, left : left + w]
    a = np.clip(alpha, 0.0, 1.0)[..., None]
    region[...] = region * (1 - a) + colour * a


def _overlaps(box: tuple[int, int, int, int], other: tuple[int, int, int, int]) -> bool:
    return not (box[2] <= other[0] or other[2] <= box[0] or box[3] <= other[1] or other[3] <= box[1])


def render(cfg: DigitsConfig, split: str, index: int, glyphs: np.ndarray, labels: np.ndarray):
    """Render image ``index`` of ``split``: returns (uint8 [H, W, 3], label, box)."""
    rng = np.random.default_rng([cfg.seed, SPLITS.index(_check_split(split)), index])
    size = cfg.canvas
    canvas = _background(rng, size)

    src = int(rng.integers(len(glyphs)))
    scale = rng.uniform(cfg.min_scale, cfg.max_scale)
    side = int(round(8 * scale))
    alpha = _upscale(glyphs[src], side, side)
    ys, xs = np.nonzero(alpha > 0.15)
    top = int(rng.integers(0, size - side + 1))
    left = int(rng.integers(0, size - side + 1))
    box = (left + int(xs.min()), top + int(ys.min()), left + int(xs.max()) + 1, top + int(ys.max()) + 1)

    n_fragments = int(rng.integers(cfg.fragments[0], cfg.fragments[1] + 1))
    for _ in range(n_fragments):
        glyph = glyphs[int(rng.integers(len(glyphs)))]
        fh, fw = int(rng.integers(2, 5)), int(rng.integers(2, 5))
        fy, fx = int(rng.integers(0, 9 - fh)), int(rng.integers(0, 9 - fw))
        fscale = rng.uniform(cfg.min_scale, cfg.max_scale)
        piece = _upscale(glyph[fy : fy + fh, fx : fx + fw], int(round(fh * fscale)), int(round(fw * fscale)))
        ph, pw = piece.shape
        for _attempt in range(20):
            py, px = int(rng.integers(0, size - ph + 1)), int(rng.integers(0, size - pw + 1))
            if not _overlaps((px, py, px + pw, py + ph), box):
                _paste(canvas, piece, py, px, rng.uniform(0.55, 1.0, size=3).astype(np.float32))
                break

    _paste(canvas, alpha, top, left, rng.uniform(0.6, 1.0, size=3).astype(np.float32))
    image = np.round(canvas * 255.0).astype(np.uint8)
    return image, int(labels[src]), np.asarray(box, dtype=np.int64)


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


def load_split(split: str, cfg: DigitsConfig | None = None) -> DigitsSplit:
    """A split, from the cache when present; generated (seconds) and cached atomically otherwise."""
    cfg = cfg or DigitsConfig()
    path = cache_dir() / "digits" / f"{split}-{cfg.key()}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                return DigitsSplit(z["images"], z["labels"], z["boxes"])
        except (OSError, ValueError, KeyError):
            path.unlink(missing_ok=True)  # a damaged cache entry is regenerated
    data = generate(cfg, split)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
            np.savez(f, images=data.images, labels=data.labels, boxes=data.boxes)
        os.replace(f.name, path)
    except OSError:
        pass  # a read-only home still works, just without the cache
    return data


def export(root: str | os.PathLike, cfg: DigitsConfig | None = None) -> Path:
    """Write ``root/{train,val}/<digit>/<index>.png`` and ``root/boxes.json`` (relative path -> box)."""
    from PIL import Image

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
    p.add_argument("--train-size", type=int, default=DigitsConfig.train_size)
    p.add_argument("--val-size", type=int, default=DigitsConfig.val_size)
    p.add_argument("--canvas", type=int, default=DigitsConfig.canvas, help="canvas side in pixels")
    p.add_argument("--seed", type=int, default=DigitsConfig.seed)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = DigitsConfig(train_size=args.train_size, val_size=args.val_size, canvas=args.canvas, seed=args.seed)
    except ValueError as e:
        parser.error(str(e))
    if args.command == "export":
        if not args.directory:
            parser.error("export needs a target DIRECTORY")
        target = Path(args.directory)
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
