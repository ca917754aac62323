"""Video data: the embedded ``moving-digits`` clips and ``videofolder:PATH`` (Kinetics layout), with the video
transformers' clip sampling.

Specs (parsed through :func:`vitbench.dataspec.parse_data_spec`):

* ``moving-digits`` -- deterministic clips of one scikit-learn handwritten digit moving (bouncing) over a
  textured background with moving distractor fragments, ground-truth box per frame; options as
  ``moving-digits:train_size=800,val_size=200,frames=16,canvas=64,seed=0``. Generated in seconds, cached as
  ``.npz`` under ``$VITBENCH_CACHE`` like :mod:`vitbench.digits` (generator: :mod:`vitbench.moving_digits`);
  ``vitbench-video export DIR`` writes it as a video folder (``DIR/{train,val}/<digit>/*.mp4``,
  ``DIR/{train,val}.csv``, ``DIR/boxes.json``).
* ``videofolder:PATH`` -- ``PATH/{train,val}/<class>/<video>`` (classes = sorted folder names), or the released
  Kinetics code's CSV form ``PATH/{train,val}.csv`` with one ``path label`` per line (paths relative to PATH or
  absolute). Decoded with PyAV.

Clip sampling (TimeSformer / X-ViT / SlowFast protocol): training takes ``frames`` frames every ``stride`` frames
from a random start, a random short-side scale in ``jitter``, a random ``crop`` and an optional flip; evaluation
takes the centre clip (1 temporal view), resizes the short side to ``crop`` and returns 3 spatial crops along the
long side (the papers' 1 x 3 views) as ``[3, C, T, H, W]`` (or the centre crop alone with ``views=1``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import resolve_data_config
from torch.utils.data import DataLoader, Dataset

from . import digits as digits_lib
from .data import drop_unreadable
from .cli import check_writable, run
from .dataspec import MOVING_DIGITS_OPTIONS, VIDEO_KINDS, DataError, DataSpec, is_video, parse_video_spec
from .moving_digits import GENERATOR_VERSION, ClipSplit, MovingDigitsConfig, generate, load_split, render_clip

__all__ = [  # the moving-digits generator lives in vitbench.moving_digits, the specs in vitbench.dataspec
    "GENERATOR_VERSION", "KINDS", "VIDEO_SUFFIXES", "ClipSampling", "ClipSplit", "CorruptVideoError",
    "KINETICS_SAMPLING", "MOVING_DIGITS_SAMPLING", "MovingDigitsConfig", "VideoDataset", "build_parser",
    "build_video_dataset", "build_video_eval_loader", "default_sampling", "export", "frame_indices", "generate",
    "is_video", "load_split", "main", "model_sampling", "parse_video_spec", "read_video", "render_clip",
    "spatial_crops", "views_forward", "write_video",
]

log = logging.getLogger(__name__)
KINDS = VIDEO_KINDS
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v")


class CorruptVideoError(DataError):
    """A video file that cannot be decoded; the message names the file."""


# ----------------------------------------------------------------------------------------------- video files
def write_video(path: str | os.PathLike, clip: np.ndarray, fps: int = 8) -> None:
    """Write uint8 ``[T, H, W, 3]`` as H.264 (PyAV), near-lossless (crf 1)."""
    import av  # deferred: PyAV is needed only to write or decode video files

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": "1"})
        stream.width, stream.height, stream.pix_fmt = clip.shape[2], clip.shape[1], "yuv420p"
        for frame in clip:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode(None))


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Decode every frame of a video file as uint8 ``[T, H, W, 3]``; raises :class:`CorruptVideoError` naming it."""
    import av  # deferred: PyAV is needed only to write or decode video files

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.error.FFmpegError, ValueError, OSError, EOFError) as e:
        raise CorruptVideoError(f"cannot decode video {path}: {e}") from e
    if not frames:
        raise CorruptVideoError(f"cannot decode video {path}: no frames")
    return np.stack(frames)


def export(root: str | os.PathLike, cfg: MovingDigitsConfig | None = None) -> Path:
    """Write ``root/{split}/<digit>/<index>.mp4``, ``root/{split}.csv`` (``path label``) and ``root/boxes.json``."""
    cfg = cfg or MovingDigitsConfig()
    root = Path(root)
    boxes = {}
    for split in digits_lib.SPLITS:
        data = load_split(split, cfg)
        for name in digits_lib.CLASSES:  # every class folder, so class indices match the embedded labels
            (root / split / name).mkdir(parents=True, exist_ok=True)
        lines = []
        for i, (clip, label, box) in enumerate(zip(data.clips, data.labels, data.boxes)):
            rel = f"{split}/{digits_lib.CLASSES[label]}/{i:05d}.mp4"
            write_video(root / rel, clip)
            boxes[rel] = box.tolist()
            lines.append(f"{rel} {int(label)}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    (root / "boxes.json").write_text(json.dumps(boxes, sort_keys=True) + "\n")
    return root


def _folder_index(root: Path, split: str) -> tuple[list[str], np.ndarray, list[str]]:
    """(paths, labels, classes) of a split of a video folder: class folders, else the ``path label`` CSV."""
    folder = root / split
    if folder.is_dir():
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        paths, labels = [], []
        for c, name in enumerate(classes):
            for f in sorted((folder / name).iterdir()):
                if f.suffix.lower() in VIDEO_SUFFIXES:
                    paths.append(str(f))
                    labels.append(c)
        if not paths:
            raise DataError(f"{folder} holds no video files ({', '.join(VIDEO_SUFFIXES)}) in class folders")
        return paths, np.asarray(labels, dtype=np.int64), classes
    table = root / f"{split}.csv"
    if not table.is_file():
        raise DataError(f"{root} has neither {split}/<class>/<video> folders nor a {split}.csv of 'path label' lines")
    paths, labels = [], []
    for n, line in enumerate(table.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1) if " " in line.strip() else line.split(",")
        if len(parts) != 2 or not parts[1].strip().isdigit():
            raise DataError(f"{table}:{n}: expected 'path label', got {line!r}")
        p = Path(parts[0].strip())
        paths.append(str(p if p.is_absolute() else root / p))
        labels.append(int(parts[1]))
    return paths, np.asarray(labels, dtype=np.int64), [str(c) for c in range(max(labels) + 1)]


# ---------------------------------------------------------------------------------------------- clip sampling
@dataclass(frozen=True)
class ClipSampling:
    """How a clip is cut from a video: ``frames`` x ``stride`` in time, a ``crop`` in space."""

    frames: int = 8
    stride: int = 2
    crop: int = 64
    jitter: tuple[int, int] = (64, 64)
    hflip: float = 0.0
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    views: int = 3

    def __post_init__(self):
        if self.frames < 1 or self.stride < 1 or self.crop < 1 or self.views not in (1, 3):
            raise ValueError(f"bad clip sampling {self}: frames, stride, crop >= 1 and views 1 or 3")


MOVING_DIGITS_SAMPLING = ClipSampling()
# TimeSformer's Kinetics recipe (8 x 32, 224, jitter 256-320); X-ViT 16 x 16 uses mean = std = 0.5.
KINETICS_SAMPLING = ClipSampling(frames=8, stride=32, crop=224, jitter=(256, 320), hflip=0.5,
                                 mean=(0.45, 0.45, 0.45), std=(0.225, 0.225, 0.225))


def frame_indices(length: int, frames: int, stride: int, start: int | None = None) -> np.ndarray:
    """``frames`` indices every ``stride`` frames from ``start`` (default: the centre clip), clamped to the video."""
    span = (frames - 1) * stride + 1
    if start is None:
        start = max(length - span, 0) // 2
    return np.clip(start + stride * np.arange(frames), 0, length - 1)


def _resize_short(x: torch.Tensor, short: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    if min(h, w) == short:
        return x
    size = (short, max(short, round(w * short / h))) if h <= w else (max(short, round(h * short / w)), short)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def spatial_crops(x: torch.Tensor, crop: int, views: int) -> list[torch.Tensor]:
    """``views`` crops of ``crop`` px along the long side (start, centre, end), as SlowFast's ``uniform_crop``."""
    h, w = x.shape[-2:]
    if h < crop or w < crop:
        raise DataError(f"frames of {h}x{w} px are smaller than the {crop} px crop")
    offsets = [(h - crop) // 2, (w - crop) // 2]
    if views == 1:
        return [x[..., offsets[0] : offsets[0] + crop, offsets[1] : offsets[1] + crop]]
    long_axis = 0 if h > w else 1
    out = []
    for pos in (0, ((h, w)[long_axis] - crop) // 2, (h, w)[long_axis] - crop):
        o = list(offsets)
        o[long_axis] = pos
        out.append(x[..., o[0] : o[0] + crop, o[1] : o[1] + crop])
    return out


class VideoDataset(Dataset):
    """Clips + labels yielding ``(clip, label, index)``: ``clip`` ``[C, T, H, W]`` for training, ``[V, C, T, H, W]``
    for evaluation (V = ``sampling.views``). Training randomness of sample i in epoch e is a function of
    ``(seed, e, i)``."""

    def __init__(self, source, labels, classes: list[str], sampling: ClipSampling, train: bool,
                 boxes: np.ndarray | None = None, paths: list[str] | None = None, name: str = "", seed: int = 0):
        self.source, self.labels, self.classes = source, np.asarray(labels, dtype=np.int64), list(classes)
        self.sampling, self.train = sampling, train
        self.boxes, self.paths, self.name, self.seed = boxes, paths, name, seed
        self.epoch = 0
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def video(self, index: int) -> np.ndarray:
        """The decoded video, uint8 ``[T, H, W, 3]``."""
        return self.source[index] if isinstance(self.source, np.ndarray) else read_video(self.source[index])

    def __getitem__(self, index: int):
        s = self.sampling
        video = self.video(index)
        rng = np.random.default_rng([self.seed, self.epoch, index]) if self.train else None
        span = (s.frames - 1) * s.stride + 1
        start = int(rng.integers(0, max(len(video) - span, 0) + 1)) if rng is not None else None
        x = torch.from_numpy(video[frame_indices(len(video), s.frames, s.stride, start)])
        x = x.permute(0, 3, 1, 2).float().div_(255.0)  # [T, C, H, W]
        mean, std = torch.tensor(s.mean)[:, None, None], torch.tensor(s.std)[:, None, None]
        if rng is None:
            x = _resize_short(x, s.crop)
            views = [((v - mean) / std).transpose(0, 1) for v in spatial_crops(x, s.crop, s.views)]
            return torch.stack(views) if s.views > 1 else views[0], int(self.labels[index]), index
        x = _resize_short(x, int(rng.integers(s.jitter[0], s.jitter[1] + 1)))
        h, w = x.shape[-2:]
        if h < s.crop or w < s.crop:
            raise DataError(f"frames of {h}x{w} px are smaller than the {s.crop} px crop")
        top, left = int(rng.integers(0, h - s.crop + 1)), int(rng.integers(0, w - s.crop + 1))
        x = x[..., top : top + s.crop, left : left + s.crop]
        if rng.random() < s.hflip:
            x = x.flip(-1)
        return ((x - mean) / std).transpose(0, 1), int(self.labels[index]), index

    def select(self, indices) -> VideoDataset:
        idx = np.asarray(indices, dtype=np.int64)
        source = self.source[idx] if isinstance(self.source, np.ndarray) else [self.source[i] for i in idx]
        out = VideoDataset(source, self.labels[idx], self.classes, self.sampling, self.train,
                           None if self.boxes is None else self.boxes[idx],
                           None if self.paths is None else [self.paths[i] for i in idx], self.name, self.seed)
        out.epoch, out.skipped = self.epoch, list(self.skipped)
        return out


def default_sampling(spec: str | DataSpec) -> ClipSampling:
    spec = spec if isinstance(spec, DataSpec) else parse_video_spec(spec)
    return MOVING_DIGITS_SAMPLING if spec.kind == "moving-digits" else KINETICS_SAMPLING


def build_video_dataset(spec: str | DataSpec, split: str, sampling: ClipSampling | None = None,
                        train: bool | None = None, skip_corrupt: bool = False, limit: int | None = None,
                        seed: int = 0) -> VideoDataset:
    """Load a split (``train`` / ``val``) of a video spec; ``train`` (default: ``split == 'train'``) picks the
    random training clip or the deterministic 1 x ``views`` evaluation clips.

    An undecodable file raises :class:`CorruptVideoError` naming it when it is read; with ``skip_corrupt`` every file
    is decoded first and the bad ones are dropped, logged and listed in ``dataset.skipped``."""
    spec = spec if isinstance(spec, DataSpec) else parse_video_spec(spec)
    if split not in digits_lib.SPLITS:
        raise DataError(f"unknown split {split!r}; use 'train' or 'val'")
    sampling = sampling or default_sampling(spec)
    train = split == "train" if train is None else train
    if spec.kind == "moving-digits":
        data = load_split(split, MovingDigitsConfig(**dict(spec.options)))
        dataset = VideoDataset(data.clips, data.labels, list(digits_lib.CLASSES), sampling, train, boxes=data.boxes,
                               name="moving-digits", seed=seed)
    else:
        root = Path(spec.path).expanduser()
        if not root.is_dir():
            raise DataError(f"video folder not found: {root}")
        paths, labels, classes = _folder_index(root, split)
        dataset = VideoDataset(paths, labels, classes, sampling, train, paths=paths, name=str(root), seed=seed)
    if skip_corrupt and dataset.paths is not None:  # decode in order until `limit` readable clips are found
        paths = dataset.paths
        dataset, skipped = drop_unreadable(dataset, lambda i: read_video(paths[i]), CorruptVideoError, "video", limit,
                                           progress=False)
        dataset.skipped = skipped
    elif limit is not None:
        dataset = dataset.select(np.arange(min(limit, len(dataset))))
    return dataset


def model_sampling(spec: str | DataSpec, model: torch.nn.Module, img_size: int | None = None) -> ClipSampling:
    """The data spec's clip sampling at the model's frames and frame stride (``num_frames`` / ``frame_stride`` when it
    has them), crop (scale jitter scaled with it) and normalisation."""
    base = default_sampling(spec)
    resolved = resolve_data_config({}, model=model)
    crop = img_size or resolved["input_size"][-1]
    return replace(base, frames=getattr(model, "num_frames", base.frames),
                   stride=getattr(model, "frame_stride", base.stride), crop=crop,
                   jitter=tuple(round(j * crop / base.crop) for j in base.jitter),
                   mean=tuple(resolved["mean"]), std=tuple(resolved["std"]))


def build_video_eval_loader(spec: str | DataSpec, sampling: ClipSampling, batch_size: int, num_workers: int = 0,
                            limit: int | None = None, skip_corrupt: bool = False):
    """The validation clips, ``batch_size`` clips (each ``sampling.views`` views) per batch."""
    dataset = build_video_dataset(spec, "val", sampling, skip_corrupt=skip_corrupt, limit=limit)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def views_forward(model: torch.nn.Module, clips: torch.Tensor) -> torch.Tensor:
    """Multi-view testing (TimeSformer / X-ViT): ``[B, V, C, T, H, W]`` views folded into the batch, softmax
    averaged over the views; returns the log of the averaged probabilities ``[B, classes]`` (plain clips
    ``[B, C, T, H, W]`` pass through as one view)."""
    if clips.dim() == 5:
        return model(clips).float().log_softmax(-1)
    B, V = clips.shape[:2]
    probs = model(clips.flatten(0, 1)).float().softmax(-1).reshape(B, V, -1).mean(1)
    return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vitbench-video",
        description="The embedded moving-digits clips. 'export DIR' writes them as a video folder "
        "(DIR/{train,val}/<digit>/*.mp4 plus DIR/{train,val}.csv and DIR/boxes.json) usable as "
        "--data videofolder:DIR; 'info' prints their statistics.",
    )
    p.add_argument("command", choices=["export", "info"], help="export: write a video folder; info: print stats")
    p.add_argument("directory", nargs="?", help="target directory for export (must be new or empty)")
    for key in MOVING_DIGITS_OPTIONS:
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=getattr(MovingDigitsConfig, key),
                       help=f"{key.replace('_', ' ')} (default: %(default)s)")
    return p


def command(args: argparse.Namespace) -> int:
    cfg = MovingDigitsConfig(**{k: getattr(args, k) for k in MOVING_DIGITS_OPTIONS})
    if args.command == "export":
        if not args.directory:
            raise ValueError("export needs a target DIRECTORY")
        target = Path(args.directory)
        if target.exists() and any(target.iterdir()):
            raise ValueError(f"{target} exists and is not empty; choose a new directory")
        check_writable(target)
        export(target, cfg)
        print(f"wrote {cfg.train_size} train and {cfg.val_size} val clips to {target} "
              f"(use --data videofolder:{target})")
        return 0
    for split in digits_lib.SPLITS:
        data = load_split(split, cfg)
        travel = np.abs(data.boxes[:, -1, :2] - data.boxes[:, 0, :2]).sum(-1)
        print(f"{split}: {len(data.labels)} clips of {cfg.frames} x {cfg.canvas}px, per class "
              f"{np.bincount(data.labels, minlength=10).tolist()}, mean digit travel {travel.mean():.1f} px")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
