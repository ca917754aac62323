"""The embedded clips ``moving-digits``: one handwritten digit moving (bouncing) over a textured background with
moving distractor fragments, ground-truth box per frame.

The digits, fragments, backgrounds, configuration checks and cache are those of :mod:`vitbench.digits`; every clip
is a pure function of ``(seed, split, index)``. Read as data through :mod:`vitbench.video`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import digits as digits_lib

GENERATOR_VERSION = 1


@dataclass(frozen=True)
class MovingDigitsConfig:
    """Size and geometry of the embedded clips."""

    train_size: int = 800
    val_size: int = 200
    frames: int = 16
    canvas: int = 64
    seed: int = 0
    val_fraction: float = 0.25
    min_scale: float = 3.0
    max_scale: float = 4.5
    fragments: tuple[int, int] = (1, 3)
    max_speed: float = 3.0

    def __post_init__(self):
        if self.train_size < 1 or self.val_size < 1 or self.frames < 1:
            raise ValueError(f"sizes must be positive, got {self.train_size}/{self.val_size}/{self.frames} frames")
        digits_lib.check_geometry(self)

    def size(self, split: str) -> int:
        return digits_lib.split_size(self, split)

    def key(self) -> str:
        return digits_lib.config_key(self, GENERATOR_VERSION)


@dataclass(frozen=True)
class ClipSplit:
    """``clips`` uint8 ``[N, T, H, W, 3]``, ``labels`` ``[N]``, ``boxes`` ``[N, T, 4]`` (x0, y0, x1, y1), exclusive."""

    clips: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray


def _bounce(pos: float, vel: float, lo: float, hi: float) -> tuple[float, float]:
    pos += vel
    if pos < lo:
        pos, vel = 2 * lo - pos, -vel
    if pos > hi:
        pos, vel = 2 * hi - pos, -vel
    return pos, vel


def _track(rng: np.random.Generator, frames: int, side_h: int, side_w: int, canvas: int, max_speed: float):
    """Top-left corners of an object bouncing inside the canvas, one per frame."""
    y, x = rng.uniform(0, canvas - side_h), rng.uniform(0, canvas - side_w)
    angle, speed = rng.uniform(0, 2 * np.pi), rng.uniform(0.5, max_speed)
    vy, vx = speed * np.sin(angle), speed * np.cos(angle)
    out = []
    for _ in range(frames):
        out.append((int(round(y)), int(round(x))))
        y, vy = _bounce(y, vy, 0, canvas - side_h)
        x, vx = _bounce(x, vx, 0, canvas - side_w)
    return out


def render_clip(cfg: MovingDigitsConfig, split: str, index: int, glyphs: np.ndarray, labels: np.ndarray):
    """Clip ``index`` of ``split``: (uint8 ``[T, H, W, 3]``, label, boxes ``[T, 4]``); a pure function of its key."""
    rng = np.random.default_rng([cfg.seed, digits_lib.SPLITS.index(split), index, 15])
    size = cfg.canvas
    background = digits_lib.background(rng, size)
    digit = digits_lib.draw_digit(rng, glyphs, cfg)
    colour = rng.uniform(0.6, 1.0, size=3).astype(np.float32)
    path = _track(rng, cfg.frames, *digit.alpha.shape, size, cfg.max_speed)
    pieces = [(piece, rng.uniform(0.55, 1.0, size=3).astype(np.float32),
               _track(rng, cfg.frames, *piece.shape, size, cfg.max_speed))
              for piece in digits_lib.fragments(rng, glyphs, cfg)]
    clip = np.empty((cfg.frames, size, size, 3), dtype=np.uint8)
    boxes = np.empty((cfg.frames, 4), dtype=np.int64)
    for t in range(cfg.frames):
        canvas = background.copy()
        for piece, c, track in pieces:
            digits_lib.paste(canvas, piece, *track[t], c)
        top, left = path[t]
        digits_lib.paste(canvas, digit.alpha, top, left, colour)
        clip[t] = np.round(canvas * 255.0).astype(np.uint8)
        boxes[t] = digit.box(top, left)
    return clip, int(labels[digit.source]), boxes


def generate(cfg: MovingDigitsConfig, split: str) -> ClipSplit:
    glyphs, labels = digits_lib.source_digits(cfg, split)
    n = cfg.size(split)
    clips = np.empty((n, cfg.frames, cfg.canvas, cfg.canvas, 3), dtype=np.uint8)
    out_labels = np.empty(n, dtype=np.int64)
    boxes = np.empty((n, cfg.frames, 4), dtype=np.int64)
    for i in range(n):
        clips[i], out_labels[i], boxes[i] = render_clip(cfg, split, i, glyphs, labels)
    return ClipSplit(clips, out_labels, boxes)


def load_split(split: str, cfg: MovingDigitsConfig | None = None) -> ClipSplit:
    """A split from the cache when present; generated (seconds) and cached atomically otherwise."""
    cfg = cfg or MovingDigitsConfig()
    return digits_lib.cached_split(digits_lib.cache_dir() / "moving_digits" / f"{split}-{cfg.key()}.npz", ClipSplit,
                                   lambda: generate(cfg, split))
