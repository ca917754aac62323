"""The training loop every package shares: DeiT recipe on HuggingFace Accelerate.

Accelerate provides devices, DDP (``accelerate launch``; ``torchrun --nproc_per_node N ... --cpu`` on CPU boxes),
mixed precision, gradient accumulation and ``save_state``/``load_state``. timm provides the transforms, Mixup/CutMix,
losses, optimiser and scheduler. What this module adds:

* exact resume: the sample order of an epoch comes from a seeded sampler, the augmentation of sample ``i`` in
  epoch ``e`` is a pure function of ``(seed, e, i)``, and RNG states are restored, so a run killed after any
  checkpoint and resumed ends with the same weights as an uninterrupted one;
* atomic checkpoints: ``save_state`` writes into a temporary directory that is renamed into place, with a
  ``progress.json`` listing every file's size (a truncated checkpoint is recognised and skipped on resume) and the
  run's configuration (a resume with other settings is refused unless ``--resume-override`` names them);
* one run, one output folder (``--overwrite`` to start over), checked writable before any work;
* preemption: SIGTERM / SIGUSR1 finish the current update, write a checkpoint and exit with
  :data:`EXIT_PREEMPTED`;
* the repeated-augmentation sampler is applied per rank by hand, never sharded a second time by ``prepare``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from collections.abc import Callable, Iterator

import timm
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from timm.data import Mixup, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import accuracy
from torch.utils.data import DataLoader

from .cli import check_writable, flag_defaults
from .data import (
    CorruptImageError, build_dataset, build_eval_loader, check_headers, data_defaults, parse_data_spec,
    preserved_rng, train_sampler_indices, train_transform,
)
from .report import write_json
from .video import (
    CorruptVideoError, build_video_dataset, build_video_eval_loader, is_video, model_sampling, views_forward,
)

LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, Callable], torch.Tensor]

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 at a checkpoint; rerun with --resume auto
RUN_FILES = ("config.json", "log.jsonl", "results.json", "model.safetensors", "checkpoints")
# Fields a resume does not compare: those that do not change a run's course (a resume may change them freely)
# and global_batch / scaled_lr, which follow from compared ones. Every other field of the configuration (and
# world_size, train_samples) must match the checkpoint's unless --resume-override names it.
RUN_ONLY_FIELDS = frozenset({
    "output_dir", "resume", "resume_override", "overwrite", "num_workers", "cpu", "checkpointing_steps",
    "keep_checkpoints", "max_steps", "eval_every", "limit_val", "skip_corrupt", "resume_overrides",
    "global_batch", "scaled_lr",
})


@dataclass(frozen=True)
class TrainConfig:
    """Everything the loop needs; the DeiT recipe by default (per-dataset overrides in :mod:`vitbench.data`)."""

    data: str = "digits"
    model: str = "vit_digits_patch8_112"
    pretrained: bool = False
    checkpoint: str | None = None
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

    def __post_init__(self):
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.grad_accum >= 1, f"--grad-accum must be >= 1, got {self.grad_accum}"),
            (0.0 <= self.smoothing < 1.0, f"--smoothing must be in [0, 1), got {self.smoothing}"),
            (0.0 <= self.drop_path < 1.0, f"--drop-path must be in [0, 1), got {self.drop_path}"),
            (self.color_jitter is None or self.color_jitter >= 0,
             f"--color-jitter must be >= 0, got {self.color_jitter}"),
            (self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {self.warmup_epochs}"),
            (self.mixed_precision in ("no", "fp16", "bf16"), f"--mixed-precision {self.mixed_precision!r}"),
            (self.max_steps is None or self.max_steps >= 1, f"--max-steps must be >= 1, got {self.max_steps}"),
            (self.checkpointing_steps >= 0, "--checkpointing-steps must be >= 0"),
            (self.keep_checkpoints >= 0, f"--keep-checkpoints must be >= 0, got {self.keep_checkpoints}"),
            (self.num_workers >= 0, f"--num-workers must be >= 0, got {self.num_workers}"),
            (self.eval_every >= 0, f"--eval-every must be >= 0, got {self.eval_every}"),
            (self.limit_train is None or self.limit_train >= 1, f"--limit-train must be >= 1, got {self.limit_train}"),
            (self.limit_val is None or self.limit_val >= 1, f"--limit-val must be >= 1, got {self.limit_val}"),
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
        if not (self.model.startswith(("hf-hub:", "local-dir:")) or timm.is_model(self.model)):
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
    g = parser.add_argument_group("data and model")
    g.add_argument("--data", default=d["data"],
                   help="digits | imagefolder:PATH | hf:NAME[:CONFIG] | arrow:PATH | moving-digits | "
                        "videofolder:PATH")
    g.add_argument("--model", default=d["model"], help="timm model name")
    g.add_argument("--pretrained", action="store_true", default=d["pretrained"],
                   help="initialise from timm's pretrained weights for --model")
    g.add_argument("--checkpoint", default=d["checkpoint"], help="initialise from a local .safetensors/.pth")
    g.add_argument("--img-size", type=int, default=d["img_size"], help="input size (default: the model's)")
    g.add_argument("--num-workers", type=int, default=d["num_workers"])
    g.add_argument("--limit-train", type=int, default=d["limit_train"], help="use only the first N train images")
    g.add_argument("--limit-val", type=int, default=d["limit_val"], help="use only the first N val images")
    g.add_argument("--skip-corrupt", action="store_true", default=d["skip_corrupt"],
                   help="check every image first; drop and count unreadable ones instead of failing")
    g = parser.add_argument_group("optimisation (DeiT recipe)")
    g.add_argument("--epochs", type=int, default=d["epochs"])
    g.add_argument("--batch-size", type=int, default=d["batch_size"], help="per process")
    g.add_argument("--lr", type=float, default=d["lr"], help="base lr, scaled by global batch / 512")
    g.add_argument("--unscale-lr", action="store_true", default=d["unscale_lr"], help="do not scale --lr")
    g.add_argument("--min-lr", type=float, default=d["min_lr"])
    g.add_argument("--warmup-lr", type=float, default=d["warmup_lr"])
    g.add_argument("--warmup-epochs", type=float, default=d["warmup_epochs"])
    g.add_argument("--sched", default=d["sched"], help="timm scheduler: cosine, poly (linear with --decay-rate 1), "
                   "step, constant, ...")
    g.add_argument("--decay-rate", type=float, default=d["decay_rate"], help="step decay / poly power")
    g.add_argument("--sched-on-updates", action="store_true", default=d["sched_on_updates"],
                   help="step the schedule every update instead of every epoch")
    g.add_argument("--opt", default=d["opt"], help="timm optimiser name")
    g.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    g.add_argument("--clip-grad", type=float, default=d["clip_grad"])
    g.add_argument("--smoothing", type=float, default=d["smoothing"], help="label smoothing")
    g.add_argument("--mixup", type=float, default=d["mixup"], help="mixup alpha (default: per dataset)")
    g.add_argument("--cutmix", type=float, default=d["cutmix"], help="cutmix alpha (default: per dataset)")
    g.add_argument("--repeated-aug", type=int, default=d["repeated_aug"],
                   help="repeats per sample (DeiT: 3; default: per dataset; 0 off)")
    g.add_argument("--auto-augment", default=d["auto_augment"],
                   help="timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1 (default: per dataset; 'none' off)")
    g.add_argument("--color-jitter", type=float, default=d["color_jitter"],
                   help="colour jitter strength, used by timm only without auto-augment (default: per dataset; 0 off)")
    g.add_argument("--drop-path", type=float, default=d["drop_path"])
    g.add_argument("--grad-accum", type=int, default=d["grad_accum"], help="gradient accumulation steps")
    g = parser.add_argument_group("run")
    g.add_argument("--output-dir", default=d["output_dir"])
    g.add_argument("--seed", type=int, default=d["seed"])
    g.add_argument("--cpu", action="store_true", default=d["cpu"],
                   help="force CPU (needed for multi-process CPU runs under torchrun)")
    g.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=d["mixed_precision"])
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
    return parser


class TrainProgress:
    """Where a run stands; saved with every checkpoint. The data position is the number of samples of ``epoch``
    consumed by all processes together, so a resume with another batch or world size (``--resume-override``)
    continues at the same place in the epoch."""

    def __init__(self):
        self.epoch = 0
        self.samples_done = 0
        self.num_updates = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "samples_done": self.samples_done, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.samples_done, self.num_updates = state["epoch"], state["samples_done"], state["num_updates"]


class Preempted(SystemExit):
    """SIGTERM / SIGUSR1 stopped the run after its checkpoint was written; exits with :data:`EXIT_PREEMPTED`."""

    def __init__(self, signal_name: str, checkpoint: Path):
        super().__init__(EXIT_PREEMPTED)
        self.signal_name, self.checkpoint = signal_name, checkpoint


def resolve_input(model: torch.nn.Module, cfg_data: str, img_size: int | None = None):
    """(img_size, mean, std, DataDefaults) for a model on a dataset."""
    dd = data_defaults(cfg_data)
    resolved = resolve_data_config({}, model=model)
    size = img_size or resolved["input_size"][-1]
    return size, tuple(resolved["mean"]), tuple(resolved["std"]), dd


def evaluate_classifier(model, loader: DataLoader, accelerator: Accelerator | None = None,
                        forward: Callable | None = None, progress: bool = True) -> dict:
    """Top-1/top-5 (percent) over a loader; under Accelerate, the loader must be prepared (gather_for_metrics).
    Leaves the random states alone, so evaluating inside a training run does not change its course."""
    from tqdm.auto import tqdm

    device = accelerator.device if accelerator else next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct1 = correct5 = total = 0.0
    main = accelerator is None or accelerator.is_main_process
    with torch.inference_mode(), preserved_rng():
        for images, labels, _ in tqdm(loader, desc="eval", disable=not (progress and main), leave=False):
            images, labels = images.to(device), labels.to(device)
            logits = forward(model, images) if forward else model(images)
            if accelerator is not None:
                logits, labels = accelerator.gather_for_metrics((logits, labels))
            top1, top5 = accuracy(logits.float(), labels, topk=(1, min(5, logits.shape[-1])))
            correct1 += top1.item() * len(labels) / 100
            correct5 += top5.item() * len(labels) / 100
            total += len(labels)
    model.train(was_training)
    return {"top1": 100 * correct1 / max(total, 1), "top5": 100 * correct5 / max(total, 1), "n": int(total)}


def ranks_in_sync(accelerator: Accelerator, model: torch.nn.Module) -> bool:
    """Whether every process holds the same weights (compares per-tensor float64 sums and sums of squares)."""
    params = [p.detach().double() for p in model.parameters()]
    signature = torch.stack([torch.stack([p.sum(), (p * p).sum()]) for p in params]).flatten()
    gathered = accelerator.gather(signature.unsqueeze(0).to(accelerator.device))
    return bool((gathered == gathered[0]).all().item())


def _step_of(path: Path) -> int | None:
    digits = path.name.removeprefix("step_")
    return int(digits) if path.name.startswith("step_") and digits.isdigit() else None


def _checkpoints(root: Path) -> list[Path]:
    """The run's checkpoints, oldest first by update number."""
    return sorted((p for p in root.glob("step_*") if p.is_dir() and _step_of(p) is not None), key=_step_of)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint directory ``path`` cannot be trusted (unreadable ``progress.json``, a file missing or of
    another size than was written), or ``None``."""
    try:
        info = json.loads((path / "progress.json").read_text())
    except (OSError, ValueError) as e:
        return f"progress.json unreadable: {e}"
    for name, size in info.get("files", {}).items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
    return None


def resume_candidates(output_dir: str | Path, resume: str) -> tuple[list[Path], list[str]]:
    """The checkpoints ``--resume`` may continue from, newest first, and a note for each damaged one skipped.

    ``resume`` is a checkpoint directory (refused if damaged) or ``auto``: every intact checkpoint under
    ``output_dir/checkpoints`` (none at all: an empty list, the run starts from the beginning)."""
    if resume != "auto":
        path = Path(resume)
        if not (path / "progress.json").is_file():
            raise FileNotFoundError(f"--resume {resume}: not a checkpoint directory (no progress.json)")
        problem = checkpoint_problem(path)
        if problem:
            raise ValueError(f"--resume {resume}: the checkpoint is damaged ({problem})")
        return [path], []
    root = Path(output_dir) / "checkpoints"
    found = _checkpoints(root)
    intact, notes = [], []
    for path in reversed(found):
        problem = checkpoint_problem(path)
        if problem:
            notes.append(f"checkpoint {path} is damaged ({problem}); skipped")
        else:
            intact.append(path)
    if found and not intact:
        raise ValueError(f"--resume auto: no intact checkpoint under {root} ({'; '.join(notes)}); "
                         "start over with --overwrite")
    return intact, notes


def held_run_files(out: Path, names: tuple[str, ...] = RUN_FILES) -> list[str]:
    """Which of a run's files and folders ``out`` holds (an empty folder does not count)."""
    return [n for n in names if (out / n).is_file() or ((out / n).is_dir() and any((out / n).iterdir()))]


def claim_output_dir(out: Path, resume: str | None, overwrite: bool, names: tuple[str, ...] = RUN_FILES) -> list[str]:
    """One run, one folder: ``out`` must be writable and hold no other run unless ``resume`` (continue it) or
    ``overwrite`` (the caller then deletes it with :func:`remove_run_files`). Returns the run files found.
    Reads only, so every process can call it before the main one deletes anything."""
    check_writable(out)
    held = held_run_files(out, names)
    if held and not (resume or overwrite):
        raise FileExistsError(f"{out} holds another run ({', '.join(held)}); continue it with --resume auto, "
                              "start over with --overwrite (deletes those), or choose another --output-dir")
    return held


def remove_run_files(out: Path, held: list[str]) -> None:
    for name in held:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _flat(record: dict, prefix: str = "") -> dict:
    """``record`` as JSON values with nested dicts flattened to dotted keys (``lfvit.alpha``)."""
    out = {}
    for key, value in json.loads(json.dumps(record)).items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(saved: dict, record: dict) -> dict[str, list]:
    """The settings of ``record`` that differ from ``saved`` as ``{field: [saved, new]}``, ignoring
    :data:`RUN_ONLY_FIELDS` (they do not change the run's course)."""
    old, new = _flat(saved), _flat(record)
    return {k: [old.get(k), v] for k, v in new.items() if k not in RUN_ONLY_FIELDS and old.get(k) != v}


def accept_changes(changes: dict[str, list], overrides: tuple[str, ...], where: str | Path) -> dict[str, list]:
    """Refuse the ``changes`` that ``--resume-override`` does not name (``ValueError`` listing them); returns the
    accepted ones."""
    names = {o.removeprefix("--").replace("-", "_") for o in overrides}
    refused = {k: v for k, v in changes.items() if k not in names}
    if refused:
        listed = "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise ValueError(f"cannot resume {where}: it was started with other settings ({listed}); rerun with the "
                         f"saved values, accept them with --resume-override {' '.join(refused)}, or start over with "
                         "--overwrite")
    return {k: v for k, v in changes.items() if k in names}


def check_override_names(overrides: tuple[str, ...], record: dict) -> None:
    known = {k for k in _flat(record) if k not in RUN_ONLY_FIELDS} | {"train_samples"}
    unknown = sorted({o.removeprefix("--").replace("-", "_") for o in overrides} - known)
    if unknown:
        raise ValueError(f"--resume-override: unknown field(s) {', '.join(unknown)}; "
                         f"fields: {', '.join(sorted(known))}")


def _log_records(path: Path) -> list[dict]:
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except ValueError:  # a line cut short by a kill
            continue
    return records


def _append_log(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _rewind(out: Path, updates: int) -> None:
    """Before a run continues from update ``updates``: drop the log records and checkpoints written after it (the
    abandoned rest of the run; intact later checkpoints are kept as ``superseded_step_*``) and partial writes."""
    log_path = out / "log.jsonl"
    if log_path.is_file():
        kept = [r for r in _log_records(log_path) if r.get("updates", 0) <= updates]
        tmp = log_path.with_name(log_path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(log_path)
    root = out / "checkpoints"
    for tmp in root.glob(".tmp_step_*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for path in _checkpoints(root):
        if _step_of(path) <= updates:
            continue
        if checkpoint_problem(path):
            shutil.rmtree(path)
        else:
            target = path.with_name("superseded_" + path.name)
            shutil.rmtree(target, ignore_errors=True)
            path.rename(target)


def _save_checkpoint(accelerator: Accelerator, root: Path, progress: TrainProgress, keep: int,
                     record: dict) -> Path:
    """Write a checkpoint atomically: ``save_state`` into a temporary directory, then ``progress.json`` (position,
    the run's configuration and every file's size), then a rename; older ones beyond ``keep`` are removed."""
    final = root / f"step_{progress.num_updates:08d}"
    tmp = root / f".tmp_step_{progress.num_updates:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {f.relative_to(tmp).as_posix(): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        write_json(tmp / "progress.json", {**progress.state_dict(), "config": record, "files": files})
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in _checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


@contextlib.contextmanager
def stop_signals() -> Iterator[list[str]]:
    """While the block runs, SIGTERM and SIGUSR1 (what cluster schedulers send before a kill) are collected by name
    instead of ending the process; the training loop checks the list after every update."""
    received: list[str] = []
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield received
        return

    def handler(signum, frame):
        received.append(signal.Signals(signum).name)

    wanted = [signal.SIGTERM] + ([signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else [])
    previous = {s: signal.signal(s, handler) for s in wanted}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _stop_requested(accelerator: Accelerator, received: list[str]) -> bool:
    """Whether any process received a stop signal (all processes agree, so they stop at the same update)."""
    if accelerator.num_processes == 1:
        return bool(received)
    flag = torch.tensor(float(bool(received)), device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item())


def _decode_message(e: Exception) -> str:
    """The 'cannot decode image/video ...' line of an error, also when a DataLoader worker wrapped it in a
    traceback."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for line in reversed(lines):
        if "cannot decode " in line:
            return line[line.index("cannot decode "):]
    return lines[0] if lines else type(e).__name__


def train(cfg: TrainConfig, build_model: Callable[[], torch.nn.Module], *, loss_fn: LossFn | None = None,
          param_groups: Callable[[torch.nn.Module], list] | None = None,
          on_epoch_start: Callable[[int, torch.nn.Module], None] | None = None,
          eval_forward: Callable | None = None, extra_config: dict | None = None,
          recipe_overrides: dict | None = None) -> dict:
    """Train ``build_model()`` with the DeiT recipe; returns the final metrics.

    ``loss_fn(model, images, targets, criterion)`` computes the loss (default ``criterion(model(images), targets)``);
    ``param_groups(model)`` returns optimiser groups (dicts may set their own ``lr``; default: every trainable
    parameter, no weight decay on norms/biases); ``on_epoch_start(epoch, model)`` may switch phases;
    ``eval_forward(model, images)`` returns logits for evaluation; ``recipe_overrides`` replaces fields of the
    dataset's :class:`~vitbench.data.DataDefaults` (e.g. a paper's own augmentation). Writes ``config.json``,
    ``log.jsonl``, ``checkpoints/step_*`` and finally ``model.safetensors`` and ``results.json`` to ``cfg.output_dir``
    (main process only). Raises :class:`Preempted` when SIGTERM/SIGUSR1 stopped the run at a checkpoint.
    The process group is left up (no ``end_training``), so several ``train`` calls (stages) can run in one process:
    tearing it down and re-creating it on the same torchrun store races on stale addresses.
    """
    from tqdm.auto import tqdm

    from .models import save_weights

    accelerator = Accelerator(cpu=cfg.cpu, mixed_precision=cfg.mixed_precision,
                              gradient_accumulation_steps=cfg.grad_accum, step_scheduler_with_optimizer=False)
    main = accelerator.is_main_process
    out = Path(cfg.output_dir)
    ckpt_root, log_path = out / "checkpoints", out / "log.jsonl"
    world = accelerator.num_processes
    global_batch = cfg.batch_size * world * cfg.grad_accum
    lr = cfg.lr if cfg.unscale_lr else cfg.lr * global_batch / 512
    record = {**asdict(cfg), **(extra_config or {}), "world_size": world, "global_batch": global_batch,
              "scaled_lr": lr}

    # One run, one folder; a resume continues exactly or is refused -- all before any expensive work.
    candidates, notes = resume_candidates(out, cfg.resume) if cfg.resume else ([], [])
    held = claim_output_dir(out, cfg.resume, cfg.overwrite)
    if held and candidates and candidates[0].resolve().parent != ckpt_root.resolve():
        raise FileExistsError(f"{out} holds another run ({', '.join(held)}); resume a checkpoint from elsewhere "
                              "into a new --output-dir")
    if cfg.resume_override:
        check_override_names(cfg.resume_override, record)
    saved = {}
    if cfg.resume:  # the newest checkpoint's settings; a run stopped before its first checkpoint: config.json
        saved = (_read_json(candidates[0] / "progress.json").get("config") if candidates else None) \
            or _read_json(out / "config.json")
    if saved:
        accept_changes(config_changes(saved, record), cfg.resume_override, out)
    accelerator.wait_for_everyone()
    if main:
        for note in notes:
            print(note, file=sys.stderr, flush=True)
        if cfg.overwrite and held:
            remove_run_files(out, held)
            print(f"--overwrite: removed the earlier run's {', '.join(held)} from {out}", file=sys.stderr)
        if cfg.resume and not candidates:
            print(f"--resume auto: no checkpoint in {out} yet; starting the run", file=sys.stderr)
    accelerator.wait_for_everyone()

    set_seed(cfg.seed)
    model = build_model()
    img_size, mean, std, dd = resolve_input(model, cfg.data, cfg.img_size)
    if recipe_overrides:
        dd = replace(dd, **recipe_overrides)
    if cfg.auto_augment is not None:
        dd = replace(dd, auto_augment=None if cfg.auto_augment == "none" else cfg.auto_augment)
    if cfg.color_jitter is not None:
        dd = replace(dd, color_jitter=cfg.color_jitter or None)
    if is_video(cfg.data):  # clips [C, T, H, W]; evaluation on 1 x 3 views, softmax averaged
        sampling = model_sampling(cfg.data, model, cfg.img_size)
        train_set = build_video_dataset(cfg.data, "train", sampling, skip_corrupt=cfg.skip_corrupt,
                                        limit=cfg.limit_train, seed=cfg.seed)
        val_loader = build_video_eval_loader(cfg.data, sampling, max(cfg.batch_size // sampling.views, 1),
                                             cfg.num_workers, cfg.limit_val, cfg.skip_corrupt)
        val_set = val_loader.dataset
        eval_forward = eval_forward or views_forward
    else:
        train_set = build_dataset(cfg.data, "train", train_transform(img_size, mean, std, dd),
                                  skip_corrupt=cfg.skip_corrupt, limit=cfg.limit_train)
        val_loader = build_eval_loader(cfg.data, img_size, mean, std, batch_size=cfg.batch_size,
                                       crop_pct=dd.crop_pct, num_workers=cfg.num_workers, limit=cfg.limit_val,
                                       skip_corrupt=cfg.skip_corrupt)
        val_set = val_loader.dataset
        if not cfg.skip_corrupt:
            check_headers(val_set)  # cheap (no decoding): a broken validation file fails now, not after an epoch
    train_set.seed = cfg.seed
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and num_classes != len(train_set.classes):
        raise ValueError(f"model {cfg.model} has {num_classes} classes but {cfg.data} has {len(train_set.classes)}")
    record["train_samples"] = len(train_set)
    if saved:
        accept_changes(config_changes(saved, record), cfg.resume_override, out)

    params = param_groups(model) if param_groups else model
    optimizer = create_optimizer_v2(params, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay)
    repeats = (3 if dd.repeated_aug else 0) if cfg.repeated_aug is None else cfg.repeated_aug
    samples_per_rank = len(train_sampler_indices(len(train_set), 0, cfg.seed, accelerator.process_index, world,
                                                 repeats))
    batches_per_epoch = samples_per_rank // cfg.batch_size // cfg.grad_accum * cfg.grad_accum
    if batches_per_epoch == 0:
        raise ValueError(f"{samples_per_rank} training samples per process cannot fill one update of "
                         f"{cfg.batch_size} x {cfg.grad_accum}; lower --batch-size or --grad-accum")
    updates_per_epoch = batches_per_epoch // cfg.grad_accum
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs, decay_rate=cfg.decay_rate, min_lr=cfg.min_lr,
        warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs, step_on_epochs=not cfg.sched_on_updates,
        updates_per_epoch=updates_per_epoch,
    )
    mixup_alpha = dd.mixup if cfg.mixup is None else cfg.mixup
    cutmix_alpha = dd.cutmix if cfg.cutmix is None else cfg.cutmix
    mixup = None
    if mixup_alpha > 0 or cutmix_alpha > 0:
        if cfg.batch_size % 2:
            raise ValueError("mixup/cutmix need an even --batch-size")
        mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, label_smoothing=cfg.smoothing,
                      num_classes=len(train_set.classes))
        criterion = SoftTargetCrossEntropy()
    elif cfg.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()

    model, optimizer, val_loader = accelerator.prepare(model, optimizer, val_loader)
    progress = TrainProgress()
    accelerator.register_for_checkpointing(progress)
    resumed_from, failures = None, []
    for path in candidates:  # newest first: one that does not load is reported and the previous one is tried
        try:
            accelerator.load_state(str(path))
        except Exception as e:  # safetensors, pickle and shape errors have no common type
            failures.append(f"{path.name}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")
            continue
        resumed_from = path
        break
    if candidates and resumed_from is None:
        raise ValueError(f"cannot resume from {candidates[0]}: it does not match this model/optimiser "
                         f"({'; '.join(failures)})")
    accepted = {}
    if resumed_from is not None:
        saved = _read_json(resumed_from / "progress.json").get("config") or saved
        accepted = accept_changes(config_changes(saved, record), cfg.resume_override, resumed_from)
    record["resume_overrides"] = (saved.get("resume_overrides", []) if saved else []) + (
        [{"updates": progress.num_updates, "checkpoint": str(resumed_from), "changes": accepted}] if accepted else [])
    if main:
        for failure in failures:
            print(f"checkpoint {failure} does not load; resuming from {resumed_from}", file=sys.stderr)
        if cfg.resume:
            _rewind(out, progress.num_updates)
        write_json(out / "config.json", record)
        _append_log(log_path, {"event": "resume" if resumed_from else "start", "epoch": progress.epoch,
                               "updates": progress.num_updates, "checkpoint": resumed_from and str(resumed_from),
                               "overrides": accepted, "world_size": world,
                               "skipped_images": {"train": train_set.skipped, "val": val_set.skipped}})
    if resumed_from is not None:
        accelerator.print(f"resumed from {resumed_from} at epoch {progress.epoch}, update {progress.num_updates}"
                          + (f" with {', '.join(f'{k} {a!r} -> {b!r}' for k, (a, b) in accepted.items())}"
                             if accepted else ""))
    accelerator.wait_for_everyone()

    device = accelerator.device
    micro_step = cfg.batch_size * cfg.grad_accum  # samples per process per update

    def schedule_position() -> int:
        return progress.epoch * updates_per_epoch + progress.samples_done // global_batch

    if cfg.sched_on_updates:
        scheduler.step_update(schedule_position())
    else:
        scheduler.step(progress.epoch)
    started = time.time()
    done = cfg.max_steps is not None and progress.num_updates >= cfg.max_steps  # resumed at --max-steps
    metrics: dict = {}
    train_loss = float("nan")
    saved_at, checkpoint = None, resumed_from
    with stop_signals() as received:
        for epoch in range(progress.epoch, progress.epoch if done else cfg.epochs):
            if on_epoch_start is not None:
                on_epoch_start(epoch, accelerator.unwrap_model(model))
            train_set.set_epoch(epoch)
            order = train_sampler_indices(len(train_set), epoch, cfg.seed, accelerator.process_index, world, repeats)
            order = order[: batches_per_epoch * cfg.batch_size][progress.samples_done // world:]
            order = order[: len(order) // micro_step * micro_step]
            batches = len(order) // cfg.batch_size
            loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=order, num_workers=cfg.num_workers,
                                drop_last=True, generator=torch.Generator().manual_seed(cfg.seed + epoch),
                                pin_memory=device.type == "cuda")
            model.train()
            loss_sum = torch.zeros((), device=device)
            n_loss = consumed = 0
            bar = tqdm(loader, desc=f"epoch {epoch}", disable=not main, initial=batches_per_epoch - batches,
                       total=batches_per_epoch)
            try:
                for images, targets, _ in bar:
                    images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
                    if mixup is not None:
                        images, targets = mixup(images, targets)
                    with accelerator.accumulate(model):
                        with accelerator.autocast():
                            loss = (loss_fn(model, images, targets, criterion) if loss_fn
                                    else criterion(model(images), targets))
                        if not torch.isfinite(loss):
                            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch}, "
                                                     f"update {progress.num_updates}")
                        accelerator.backward(loss)
                        if cfg.clip_grad and accelerator.sync_gradients:
                            accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    loss_sum += loss.detach()
                    n_loss += 1
                    consumed += 1
                    progress.samples_done += cfg.batch_size * world
                    if not accelerator.sync_gradients:
                        continue
                    progress.num_updates += 1
                    scheduler.step_update(schedule_position())
                    bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
                    at_max = cfg.max_steps is not None and progress.num_updates >= cfg.max_steps
                    epoch_end = consumed == batches
                    if (cfg.checkpointing_steps and progress.num_updates % cfg.checkpointing_steps == 0
                            and not epoch_end):
                        checkpoint = _save_checkpoint(accelerator, ckpt_root, progress, cfg.keep_checkpoints, record)
                        saved_at = progress.num_updates
                    if at_max:
                        done = True
                        break
                    if not epoch_end and _stop_requested(accelerator, received):
                        if saved_at != progress.num_updates:
                            checkpoint = _save_checkpoint(accelerator, ckpt_root, progress, cfg.keep_checkpoints,
                                                          record)
                        _preempted(accelerator, log_path, received, checkpoint, progress, epoch)
            except (CorruptImageError, CorruptVideoError) as e:
                where = f"the last checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
                raise type(e)(
                    f"{_decode_message(e)} ({where}); replace the file, or continue without it: --resume auto "
                    "--skip-corrupt --resume-override train_samples (the sample order changes)") from None
            finally:
                bar.close()
            train_loss = accelerator.reduce(loss_sum / max(n_loss, 1), reduction="mean").item()
            epoch_finished = consumed == batches
            if epoch_finished:
                progress.epoch, progress.samples_done = epoch + 1, 0
                if not cfg.sched_on_updates:
                    scheduler.step(progress.epoch)
            last = progress.epoch >= cfg.epochs or done
            if saved_at != progress.num_updates or epoch_finished:  # before evaluating: a failing evaluation
                checkpoint = _save_checkpoint(accelerator, ckpt_root, progress, cfg.keep_checkpoints, record)
                saved_at = progress.num_updates  # loses no training
            stop = _stop_requested(accelerator, received)
            entry = {"epoch": epoch, "updates": progress.num_updates, "train_loss": train_loss,
                     "lr": optimizer.param_groups[0]["lr"], "time_s": time.time() - started}
            if not stop and ((cfg.eval_every and epoch_finished and progress.epoch % cfg.eval_every == 0) or last):
                metrics = _evaluate(model, val_loader, accelerator, eval_forward, checkpoint)
                entry.update(metrics)
            accelerator.print(json.dumps(entry))
            if main:
                _append_log(log_path, entry)
            if stop:
                _preempted(accelerator, log_path, received, checkpoint, progress, epoch)
            if done:
                break

    if not metrics:
        metrics = _evaluate(model, val_loader, accelerator, eval_forward, checkpoint)
    result = {"train_loss": train_loss, **metrics, "updates": progress.num_updates, "epochs": progress.epoch,
              "wall_time_s": time.time() - started, "world_size": world,
              "ranks_in_sync": ranks_in_sync(accelerator, model),
              "skipped_images": {"train": len(train_set.skipped), "val": len(val_set.skipped)}}
    if main:
        save_weights(accelerator.unwrap_model(model), out / "model.safetensors")
        write_json(out / "results.json", result)
    accelerator.wait_for_everyone()
    return result


def _evaluate(model, val_loader, accelerator: Accelerator, eval_forward, checkpoint: Path | None) -> dict:
    """:func:`evaluate_classifier`; an unreadable validation image names the file and the saved checkpoint."""
    try:
        return evaluate_classifier(model, val_loader, accelerator, eval_forward)
    except (CorruptImageError, CorruptVideoError) as e:
        where = f"training up to {checkpoint} is saved" if checkpoint else "no checkpoint was written"
        raise type(e)(f"{_decode_message(e)} ({where}); continue without the file: --resume auto "
                                "--skip-corrupt") from None


def _preempted(accelerator: Accelerator, log_path: Path, received: list[str], checkpoint: Path,
               progress: TrainProgress, epoch: int):
    name = received[0] if received else "a stop signal on another process"
    if accelerator.is_main_process:
        _append_log(log_path, {"event": "preempted", "signal": name, "epoch": epoch, "updates": progress.num_updates,
                               "checkpoint": str(checkpoint)})
        print(f"stopped by {name} at update {progress.num_updates}: checkpoint {checkpoint}; continue with "
              f"--resume auto (exit code {EXIT_PREEMPTED})", file=sys.stderr, flush=True)
    accelerator.wait_for_everyone()
    raise Preempted(name, checkpoint)
