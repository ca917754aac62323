"""Image and video data behind one interface: what the training engine and the evaluation harness use of a data
set (:class:`DataSource`), so neither branches on the kind of data.

:func:`data_source` picks the implementation from the ``--data`` spec: :class:`ImageSource` (DeiT transforms,
:mod:`vitbench.data`) or :class:`VideoSource` (clip sampling at the model's frames, evaluated on several views,
:mod:`vitbench.video`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from timm.data import resolve_data_config
from torch.utils.data import DataLoader

from .data import DataDefaults, build_dataset, build_eval_loader, check_headers, data_defaults, train_transform
from .dataspec import DataSpec, is_video, parse_data_spec
from .video import ClipSampling, build_video_dataset, build_video_eval_loader, model_sampling, views_forward


class LabelledSet(Protocol):
    """A split as the engine and the harness use it: items ``(input, label, index)``, the class names, the files
    dropped as unreadable, and a seeded, per-epoch random augmentation."""

    classes: list[str]
    skipped: list[str]
    seed: int | None

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]: ...

    def set_epoch(self, epoch: int) -> None: ...


@dataclass(frozen=True)
class InputSpec:
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float

    def boxes(self, dataset, index) -> torch.Tensor | None:
        """Ground-truth boxes of ``index`` in model-input pixels; None without boxes or under a centre crop."""
        if self.crop_pct != 1.0 or not hasattr(dataset, "boxes_for"):
            return None
        return dataset.boxes_for(index, self.img_size)


class DataSource(Protocol):
    """A data set prepared for one model: its training split, its validation loader and how it is evaluated."""

    spec: DataSpec
    input: InputSpec  # the model input of evaluation (size, normalisation, centre crop)
    views: int  # model inputs per validation sample (the clips' spatial views; 1 for images)
    forward: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None  # evaluation forward; None: model(x)

    def train_set(self, limit: int | None, skip_corrupt: bool, seed: int) -> LabelledSet: ...

    def eval_loader(self, batch_size: int, num_workers: int, limit: int | None, skip_corrupt: bool) -> DataLoader:
        """The validation split, ``batch_size`` samples (each ``views`` inputs) per batch, in order."""

    def check_headers(self, dataset: LabelledSet) -> None:
        """A cheap check (no decoding) of every file of a split; raises naming the first unreadable one."""


@dataclass(frozen=True)
class ImageSource:
    """Images with the DeiT transforms of ``defaults`` (training) and the centre crop of ``input`` (evaluation)."""

    spec: DataSpec
    input: InputSpec
    defaults: DataDefaults
    views: int = 1
    forward: Callable | None = None

    def train_set(self, limit: int | None, skip_corrupt: bool, seed: int) -> LabelledSet:
        i = self.input
        dataset = build_dataset(self.spec, "train", train_transform(i.img_size, i.mean, i.std, self.defaults),
                                skip_corrupt=skip_corrupt, limit=limit)
        dataset.seed = seed
        return dataset

    def eval_loader(self, batch_size: int, num_workers: int, limit: int | None, skip_corrupt: bool) -> DataLoader:
        i = self.input
        return build_eval_loader(self.spec, i.img_size, i.mean, i.std, batch_size=batch_size, crop_pct=i.crop_pct,
                                 num_workers=num_workers, limit=limit, skip_corrupt=skip_corrupt)

    def check_headers(self, dataset: LabelledSet) -> None:
        check_headers(dataset)


@dataclass(frozen=True)
class VideoSource:
    """Clips cut by ``sampling``; evaluated on ``sampling.views`` views with the softmax averaged."""

    spec: DataSpec
    sampling: ClipSampling
    forward: Callable | None = views_forward

    @property
    def input(self) -> InputSpec:
        return InputSpec(self.sampling.crop, self.sampling.mean, self.sampling.std, 1.0)

    @property
    def views(self) -> int:
        return self.sampling.views

    def train_set(self, limit: int | None, skip_corrupt: bool, seed: int) -> LabelledSet:
        return build_video_dataset(self.spec, "train", self.sampling, skip_corrupt=skip_corrupt, limit=limit,
                                   seed=seed)

    def eval_loader(self, batch_size: int, num_workers: int, limit: int | None, skip_corrupt: bool) -> DataLoader:
        return build_video_eval_loader(self.spec, self.sampling, batch_size, num_workers, limit, skip_corrupt)

    def check_headers(self, dataset: LabelledSet) -> None:
        """Nothing: a video file has no check cheaper than decoding it."""


def resolve_input(model: torch.nn.Module, cfg_data: str, img_size: int | None = None):
    """(img_size, mean, std, DataDefaults) for a model on a dataset."""
    dd = data_defaults(cfg_data)
    resolved = resolve_data_config({}, model=model)
    size = img_size or resolved["input_size"][-1]
    return size, tuple(resolved["mean"]), tuple(resolved["std"]), dd


def data_source(spec: str | DataSpec, model: torch.nn.Module, img_size: int | None = None,
                defaults: DataDefaults | None = None, crop_pct: float | None = None) -> ImageSource | VideoSource:
    """The data of ``spec`` prepared for ``model`` at ``img_size`` (default: the model's input size). Images take
    ``defaults`` (default: the dataset's :func:`~vitbench.data.data_defaults`) and evaluate at ``crop_pct``
    (default: that of ``defaults``); clips take the model's frames and stride
    (:func:`~vitbench.video.model_sampling`)."""
    spec = parse_data_spec(spec)
    if is_video(spec):
        return VideoSource(spec, model_sampling(spec, model, img_size))
    size, mean, std, dd = resolve_input(model, spec, img_size)
    dd = defaults or dd
    return ImageSource(spec, InputSpec(size, mean, std, dd.crop_pct if crop_pct is None else crop_pct), dd)
