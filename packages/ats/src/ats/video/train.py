"""The video side of ``ats-train``: an :mod:`ats.video.models` model, initialised from ``--checkpoint`` by its
layout (:func:`ats.video.checkpoint.load_video_checkpoint`: the authors' release, an image ViT, or our own), with
ATS from :mod:`ats.video.patch`. Clips, their augmentation and the 1 x 3-view evaluation come from the shared engine
(:mod:`vitbench.engine`, :mod:`vitbench.video`)."""

from __future__ import annotations

import timm

from .checkpoint import load_video_checkpoint
from .models import VIDEO_MODELS, VideoTransformer
from .patch import STAGES, apply


def default_stages(name: str) -> tuple[int, ...] | None:
    """The paper's ATS blocks for a video model (App. E.4/E.5), None for other models."""
    entry = VIDEO_MODELS.get(name)
    return None if entry is None else STAGES[entry[0].arch]


def build_model(cfg, ats_cfg) -> VideoTransformer:
    """The video model of a :class:`vitbench.engine.TrainConfig` with ATS per :class:`ats.train.ATSTrainConfig`."""
    if cfg.pretrained:
        raise ValueError(f"no pretrained weights are shipped for {cfg.model}; initialise it with --checkpoint "
                         "(an image ViT of the same width and depth, the authors' release, or an ats-train output)")
    kwargs = {"img_size": cfg.img_size} if cfg.img_size else {}
    model = timm.create_model(cfg.model, drop_path_rate=cfg.drop_path, **kwargs)
    if cfg.checkpoint:
        load_video_checkpoint(model, cfg.checkpoint)
    if ats_cfg.stages is not None:
        if ats_cfg.variant:
            raise ValueError(f"--variant {' '.join(ats_cfg.variant)}: the ablations are built for image models")
        apply(model, stages=ats_cfg.stages, rho=ats_cfg.rho, k=ats_cfg.k, mode=ats_cfg.mode)
    return model
