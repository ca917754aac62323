"""``ats-train``: fine-tune a ViT with ATS (paper App. E.1) or train it plainly with ATS off, on Accelerate.

Paper setting (DynamicViT/DeiT recipe): initialise from the backbone (``--pretrained`` or ``--checkpoint``),
30 epochs, AdamW, lr 5e-4 scaled by global batch / 512, batch 8 x 96, cosine schedule, DeiT augmentation, and
K = all tokens during training (``--rho 1``: multi-stage blocks 3..11). ``--no-ats`` trains the plain model
(this is how the embedded backbone is trained). Multi-GPU/multi-node: ``accelerate launch -m ats.train ...``;
multi-process CPU: ``torchrun --nproc_per_node 2 -m ats.train --cpu ...``. The weights keep timm's layout, so
``ats-eval --checkpoint OUTPUT_DIR/model.safetensors`` evaluates them at any rho or K. Video models
(``--model xvit_digits_patch8_64 --data moving-digits``) train on clips (:mod:`ats.video.train`).

CvT (``--model cvt_13_224`` ...; App. E.2): with ATS on, the model is built with a ``linear`` stage 3 and ATS in
stage 3's blocks 0..8 (``--stages`` is stage-local); ``--checkpoint`` takes official or HuggingFace ``dw_bn``
weights (folded into the linear stage 3) or a linear checkpoint of ours as it is. With ``--no-ats`` the CvT trains
as given (``dw_bn``). ``ats-eval --model cvt_13_224 --finetuned OUTPUT_DIR/model.safetensors`` evaluates the output.

EViT (``--model evit_deit_small_patch16_224`` or the embedded ``evit_digits_patch8_112``; keep 0.7 in blocks 3, 6,
9): ``--checkpoint`` takes DeiT or released EViT weights (one layout). ``--no-ats`` trains the EViT itself; with ATS
on, ATS runs in blocks 4, 5, 7, 8, 10, 11 and ``--rho 0.7`` is Table A.5's K_n = round(0.7 x the tokens EViT alone
gives block n). ``ats-eval --model evit_deit_small_patch16_224 --checkpoint EVIT.pth --finetuned
OUTPUT_DIR/model.safetensors`` evaluates the output next to the EViT it started from.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

import vitbench
from vitbench.cli import check_train_input, renamed, run
from vitbench.engine import TrainConfig, add_train_args, train
from vitbench.launch import main_print

from . import backbones, patch
from .options import parse_stages
from .video import train as video_train
from .video.models import VIDEO_MODELS


@dataclass(frozen=True)
class ATSTrainConfig:
    """The ATS part of a training run (None stages: ATS off)."""

    stages: tuple[int, ...] | None = tuple(range(3, 12))
    rho: float | None = 1.0
    k: float | None = None
    mode: str = "official"
    variant: tuple[str, ...] = ()

    def __post_init__(self):
        if self.stages is not None:
            patch.ATSConfig(self.stages, (self.k or self.rho or 1.0,) * len(self.stages), self.mode,
                            frozenset(self.variant))
        if self.rho is not None and not 0 < self.rho <= 1:
            raise ValueError(f"--rho must be in (0, 1], got {self.rho}")
        if self.k is not None and self.k < 2:
            raise ValueError(f"--k must be >= 2, got {self.k}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ats-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(p, epochs=30, output_dir="runs/ats_train")
    g = p.add_argument_group("ATS (the flags of ats-eval, same names and meanings)")
    g.add_argument("--no-ats", action="store_true", help="train the plain model (ATS off; default: ATS on)")
    g.add_argument("--stages", type=parse_stages, default=None,
                   help="ATS blocks, 0-based: 3-11, 3 or 0,3,6 (default: 3-11; video: X-ViT 3-11, TimeSformer 3-5, "
                   "App. E.4/E.5; CvT: stage 3's blocks, stage-local, default 0-8, App. E.2)")
    g.add_argument("--rho", type=float, default=None,
                   help="training keep rate rho, K_n = max(round(rho*N_n), 8) (default: 1, K = all tokens, as the "
                   "paper)")
    g.add_argument("--k", type=float, default=None, help="training absolute K instead of rho (default: none)")
    g.add_argument("--mode", choices=patch.MODES, default="official",
                   help="released-code or paper selection (default: %(default)s)")
    g.add_argument("--variant", nargs="+", choices=patch.VARIANTS, default=[],
                   help="train an ablation, e.g. topk (Table A.3; default: none)")
    for old, new in (("--ats-stages", "--stages"), ("--ats-rho", "--rho"), ("--ats-k", "--k"),
                     ("--ats-mode", "--mode"), ("--ats-variant", "--variant")):
        renamed(g, old, new)
    return p


def ats_config_from_args(ns: argparse.Namespace) -> ATSTrainConfig:
    if ns.rho is not None and ns.k is not None:
        raise ValueError("give --rho or --k, not both")
    rho = None if ns.k is not None else (1.0 if ns.rho is None else ns.rho)
    stages = ns.stages or video_train.default_stages(ns.model) or backbones.for_name(ns.model).stages
    return ATSTrainConfig(None if ns.no_ats else tuple(stages), rho, ns.k, ns.mode, tuple(ns.variant))


def build_model(cfg: TrainConfig, ats_cfg: ATSTrainConfig):
    if cfg.model in VIDEO_MODELS:
        return video_train.build_model(cfg, ats_cfg)
    kwargs = {"img_size": cfg.img_size} if cfg.img_size else {}
    family = backbones.for_name(cfg.model)
    if family.owns_weights:  # CvT, PS-ViT, EViT: their own checkpoint layouts (a CvT: linear stage 3 for ATS)
        kwargs.update(family.build_kwargs if ats_cfg.stages is not None else {})
        model = vitbench.create_model(cfg.model, pretrained=cfg.pretrained, drop_path_rate=cfg.drop_path, **kwargs)
        if cfg.checkpoint:
            backbones.load_weights(model, cfg.checkpoint)
    else:
        model = vitbench.create_model(cfg.model, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint,
                                      drop_path_rate=cfg.drop_path, **kwargs)
    if ats_cfg.stages is not None:
        backbones.apply(model, stages=ats_cfg.stages, rho=ats_cfg.rho, k=ats_cfg.k, mode=ats_cfg.mode,
                        variant=ats_cfg.variant)
    return model


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), command, argv, check=check_train_input)


def command(ns: argparse.Namespace) -> int:
    cfg = TrainConfig.from_args(ns)
    ats_cfg = ats_config_from_args(ns)
    result = train(cfg, lambda: build_model(cfg, ats_cfg), extra_config={"ats": asdict(ats_cfg)})
    main_print(f"done: top-1 {result.get('top1', float('nan')):.2f}% after {result['updates']} updates; "
          f"weights in {cfg.output_dir}/model.safetensors (ranks in sync: {result['ranks_in_sync']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
