"""The training configuration: :class:`TrainConfig` and its command-line flags (:func:`add_train_args`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from ..cli import flag_defaults
from ..dataspec import is_video, parse_data_spec
from ..flagtypes import field_problems
from ..models import is_model
from .tracking import REPORT_TO


@dataclass(frozen=True)
class TrainConfig:
    """Everything the loop needs; the DeiT recipe by default (per-dataset overrides in :mod:`vitbench.data`)."""

    data: str = "digits"
    model: str = "vit_digits_patch8_112"
    pretrained: bool = False
    checkpoint: str | None = None
    num_classes: int | None = None
    output_dir: str = "runs/train"
    epochs: int = 300
    batch_size: int = 64
    lr: float = 5e-4
    unscale_lr: bool = False
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_epochs: float = 5.0
    sched: str = "cosine"
    decay_rate: float = 0.1
    sched_on_updates: bool = False
    opt: str = "adamw"
    weight_decay: float = 0.05
    clip_grad: float | None = None
    smoothing: float = 0.1
    mixup: float | None = None
    cutmix: float | None = None
    repeated_aug: int | None = None
    auto_augment: str | None = None
    color_jitter: float | None = None
    drop_path: float = 0.1
    img_size: int | None = None
    num_workers: int = 2
    seed: int = 0
    cpu: bool = False
    mixed_precision: str = "no"
    grad_accum: int = 1
    checkpointing_steps: int = 0
    keep_checkpoints: int = 2
    resume: str | None = None
    resume_override: tuple[str, ...] = ()
    overwrite: bool = False
    max_steps: int | None = None
    eval_every: int = 1
    limit_train: int | None = None
    limit_val: int | None = None
    skip_corrupt: bool = False
    report_to: str = "none"

    def __post_init__(self):
        problems = field_problems(self)  # every numeric flag's range (vitbench.flagtypes.RULES), for Python callers too
        if problems:
            raise ValueError(problems[0])
        checks = [
            (self.mixed_precision in ("no", "fp16", "bf16"), f"--mixed-precision {self.mixed_precision!r}"),
            (not (self.overwrite and self.resume), "give --resume (continue the run) or --overwrite (start over), "
                                                    "not both"),
            (self.resume or not self.resume_override, "--resume-override needs --resume"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if is_video(parse_data_spec(self.data)):
            given = [flag for flag, value in (("--mixup", self.mixup), ("--cutmix", self.cutmix),
                                              ("--auto-augment", self.auto_augment),
                                              ("--color-jitter", self.color_jitter)) if value not in (None, 0, "none")]
            if given:
                raise ValueError(f"{', '.join(given)}: image augmentation; clips are augmented by their sampling "
                                 f"(vitbench.video: random start, scale jitter, crop, flip), {self.data} is video")
        if not (self.model.startswith(("hf-hub:", "local-dir:")) or is_model(self.model)):
            raise ValueError(f"unknown model {self.model!r}; see timm.list_models() (embedded: vit_digits_patch8_112)")

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> TrainConfig:
        values = {f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)}
        if values.get("resume_override") is not None:
            values["resume_override"] = tuple(values["resume_override"])
        return cls(**values)


def add_train_args(parser: argparse.ArgumentParser, **defaults) -> argparse.ArgumentParser:
    """Add the common training flags (DeiT recipe defaults; ``defaults`` overrides them per package)."""
    d = flag_defaults(TrainConfig, defaults)
    _add_data_args(parser, d)
    _add_optimisation_args(parser, d)
    _add_run_args(parser, d)
    return parser


def _add_data_args(parser: argparse.ArgumentParser, d: dict) -> None:
    g = parser.add_argument_group("data and model")
    g.add_argument("--data", default=d["data"],
                   help="digits | imagefolder:PATH | hf:NAME[:CONFIG] | arrow:PATH | moving-digits | "
                        "videofolder:PATH")
    g.add_argument("--model", default=d["model"], help="timm model name")
    g.add_argument("--pretrained", action="store_true", default=d["pretrained"],
                   help="initialise from timm's pretrained weights for --model")
    g.add_argument("--checkpoint", default=d["checkpoint"], help="initialise from a local .safetensors/.pth")
    g.add_argument("--num-classes", type=int, default=d["num_classes"],
                   help="train a new N-class head (the initial weights' head is dropped; default: the model's own)")
    g.add_argument("--img-size", type=int, default=d["img_size"], help="input size (default: the model's)")
    g.add_argument("--num-workers", type=int, default=d["num_workers"], help="data-loading processes per rank")
    g.add_argument("--limit-train", type=int, default=d["limit_train"], help="use only the first N train images")
    g.add_argument("--limit-val", type=int, default=d["limit_val"], help="use only the first N val images")
    g.add_argument("--skip-corrupt", action="store_true", default=d["skip_corrupt"],
                   help="check every image first; drop and count unreadable ones instead of failing")


def _add_optimisation_args(parser: argparse.ArgumentParser, d: dict) -> None:
    g = parser.add_argument_group("optimisation (DeiT recipe)")
    g.add_argument("--epochs", type=int, default=d["epochs"], help="passes over the training set")
    g.add_argument("--batch-size", type=int, default=d["batch_size"], help="per process")
    g.add_argument("--lr", type=float, default=d["lr"], help="base lr, scaled by global batch / 512")
    g.add_argument("--unscale-lr", action="store_true", default=d["unscale_lr"], help="do not scale --lr")
    g.add_argument("--min-lr", type=float, default=d["min_lr"], help="lr at the end of the cosine / poly schedule")
    g.add_argument("--warmup-lr", type=float, default=d["warmup_lr"], help="lr at the start of the linear warm-up")
    g.add_argument("--warmup-epochs", type=float, default=d["warmup_epochs"],
                   help="linear warm-up length in epochs (fractions allowed; 0: none)")
    g.add_argument("--sched", default=d["sched"], help="timm scheduler: cosine, poly (linear with --decay-rate 1), "
                   "step, constant, ...")
    g.add_argument("--decay-rate", type=float, default=d["decay_rate"], help="step decay / poly power")
    g.add_argument("--sched-on-updates", action="store_true", default=d["sched_on_updates"],
                   help="step the schedule every update instead of every epoch")
    g.add_argument("--opt", default=d["opt"], help="timm optimiser name")
    g.add_argument("--weight-decay", type=float, default=d["weight_decay"],
                   help="decoupled weight decay (AdamW); biases, norms and tokens are not decayed")
    g.add_argument("--clip-grad", type=float, default=d["clip_grad"],
                   help="clip the gradient norm to this value (default: none, no clipping)")
    g.add_argument("--smoothing", type=float, default=d["smoothing"], help="label smoothing")
    g.add_argument("--mixup", type=float, default=d["mixup"], help="mixup alpha (default: per dataset)")
    g.add_argument("--cutmix", type=float, default=d["cutmix"], help="cutmix alpha (default: per dataset)")
    g.add_argument("--repeated-aug", type=int, default=d["repeated_aug"],
                   help="repeats per sample (DeiT: 3; default: per dataset; 0 off)")
    g.add_argument("--auto-augment", default=d["auto_augment"],
                   help="timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1 (default: per dataset; 'none' off)")
    g.add_argument("--color-jitter", type=float, default=d["color_jitter"],
                   help="colour jitter strength, used by timm only without auto-augment (default: per dataset; 0 off)")
    g.add_argument("--drop-path", type=float, default=d["drop_path"], help="stochastic depth rate, in [0, 1)")
    g.add_argument("--grad-accum", type=int, default=d["grad_accum"], help="gradient accumulation steps")


def _add_run_args(parser: argparse.ArgumentParser, d: dict) -> None:
    g = parser.add_argument_group("run")
    g.add_argument("--output-dir", default=d["output_dir"],
                   help="the run's folder: config.json, log.jsonl, checkpoints/, model.safetensors, results.json")
    g.add_argument("--seed", type=int, default=d["seed"], help="seed of weights init, data order and augmentation")
    g.add_argument("--cpu", action="store_true", default=d["cpu"],
                   help="force CPU (needed for multi-process CPU runs under torchrun)")
    g.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=d["mixed_precision"],
                   help="Accelerate autocast (fp16 with loss scaling on CUDA)")
    g.add_argument("--checkpointing-steps", type=int, default=d["checkpointing_steps"],
                   help="also checkpoint every N updates (0: at the end of every epoch only)")
    g.add_argument("--keep-checkpoints", type=int, default=d["keep_checkpoints"],
                   help="keep the newest N checkpoints of this run (0: keep all)")
    g.add_argument("--resume", default=d["resume"],
                   help="continue the run in --output-dir: 'auto' (the newest intact checkpoint; starts the run if "
                        "the folder holds none yet) or a checkpoint directory")
    g.add_argument("--resume-override", nargs="+", default=list(d["resume_override"]), metavar="FIELD",
                   help="with --resume: accept these changed settings (e.g. lr batch_size); recorded in config.json "
                        "and log.jsonl. Any other change of a setting that alters the run is refused")
    g.add_argument("--overwrite", action="store_true", default=d["overwrite"],
                   help="start over in an --output-dir that holds another run, deleting its config, log, "
                        "checkpoints, weights and results")
    g.add_argument("--max-steps", type=int, default=d["max_steps"], help="stop after N updates")
    g.add_argument("--eval-every", type=int, default=d["eval_every"], help="evaluate every N epochs (0: at end)")
    g.add_argument("--report-to", choices=REPORT_TO, default=d["report_to"],
                   help="also send log.jsonl's records to experiment trackers through Accelerate (tensorboard: "
                        "OUTPUT_DIR/tracking; all: every one installed; default: none)")
