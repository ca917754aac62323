"""The training loop every package shares: DeiT recipe on HuggingFace Accelerate.

Accelerate provides devices, DDP (``accelerate launch``; ``torchrun --nproc_per_node N ... --cpu`` on CPU boxes),
mixed precision, gradient accumulation and ``save_state``/``load_state``. timm provides the transforms, Mixup/CutMix,
losses, optimiser and scheduler. What this module adds:

* exact resume: the sample order of an epoch comes from a seeded sampler, the augmentation of sample ``i`` in
  epoch ``e`` is a pure function of ``(seed, e, i)``, and RNG states are restored, so a run killed after any
  checkpoint and resumed ends with the same weights as an uninterrupted one;
* atomic checkpoints: ``save_state`` writes into a temporary directory that is renamed into place;
* the repeated-augmentation sampler is applied per rank by hand, never sharded a second time by ``prepare``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from collections.abc import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from timm.data import Mixup, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import accuracy
from torch.utils.data import DataLoader

from .data import (
    build_dataset, build_eval_loader, data_defaults, preserved_rng, train_sampler_indices,
    train_transform,
)
from .report import write_json

LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, Callable], torch.Tensor]


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
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> TrainConfig:
        return cls(**{f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)})


def add_train_args(parser: argparse.ArgumentParser, **defaults) -> argparse.ArgumentParser:
    """Add the common training flags (DeiT recipe defaults; ``defaults`` overrides them per package)."""
    d = {f.name: f.default for f in fields(TrainConfig)}
    unknown = set(defaults) - set(d)
    if unknown:
        raise KeyError(f"unknown TrainConfig fields: {sorted(unknown)}")
    d.update(defaults)
    g = parser.add_argument_group("data and model")
    g.add_argument("--data", default=d["data"], help="digits | imagefolder:PATH | hf:NAME[:CONFIG] | arrow:PATH")
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
    g.add_argument("--keep-checkpoints", type=int, default=d["keep_checkpoints"])
    g.add_argument("--resume", default=d["resume"], help="checkpoint directory, or 'auto' for the latest one")
    g.add_argument("--max-steps", type=int, default=d["max_steps"], help="stop after N updates")
    g.add_argument("--eval-every", type=int, default=d["eval_every"], help="evaluate every N epochs (0: at end)")
    return parser


class TrainProgress:
    """Where a run stands; saved with every checkpoint."""

    def __init__(self):
        self.epoch = 0
        self.batches_done = 0  # micro-batches of ``epoch`` already consumed
        self.num_updates = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches_done, self.num_updates = state["epoch"], state["batches_done"], state["num_updates"]


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


def _checkpoints(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step_*") if p.is_dir())


def find_resume_dir(output_dir: str | Path, resume: str) -> Path:
    """The checkpoint directory for ``--resume`` (``auto`` = the newest under ``output_dir/checkpoints``)."""
    if resume == "auto":
        found = _checkpoints(Path(output_dir) / "checkpoints")
        if not found:
            raise FileNotFoundError(f"--resume auto: no checkpoint under {Path(output_dir) / 'checkpoints'}")
        return found[-1]
    path = Path(resume)
    if not (path / "progress.json").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint directory (no progress.json)")
    return path


def _save_checkpoint(accelerator: Accelerator, root: Path, progress: TrainProgress, keep: int) -> Path:
    final = root / f"step_{progress.num_updates:08d}"
    tmp = root / f".tmp_step_{progress.num_updates:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / "progress.json", progress.state_dict())
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in _checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


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
    ``log.jsonl``, ``checkpoints/step_*`` and finally ``model.safetensors`` and ``results.json`` to ``cfg.output_dir``.
    The process group is left up (no ``end_training``), so several ``train`` calls (stages) can run in one process:
    tearing it down and re-creating it on the same torchrun store races on stale addresses.
    """
    from tqdm.auto import tqdm

    from .models import save_weights

    accelerator = Accelerator(cpu=cfg.cpu, mixed_precision=cfg.mixed_precision,
                              gradient_accumulation_steps=cfg.grad_accum, step_scheduler_with_optimizer=False)
    set_seed(cfg.seed)
    out = Path(cfg.output_dir)
    ckpt_root = out / "checkpoints"
    model = build_model()
    img_size, mean, std, dd = resolve_input(model, cfg.data, cfg.img_size)
    if recipe_overrides:
        dd = replace(dd, **recipe_overrides)
    if cfg.auto_augment is not None:
        dd = replace(dd, auto_augment=None if cfg.auto_augment == "none" else cfg.auto_augment)
    if cfg.color_jitter is not None:
        dd = replace(dd, color_jitter=cfg.color_jitter or None)
    train_set = build_dataset(cfg.data, "train", train_transform(img_size, mean, std, dd),
                              skip_corrupt=cfg.skip_corrupt, limit=cfg.limit_train)
    train_set.seed = cfg.seed
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and num_classes != len(train_set.classes):
        raise ValueError(f"model {cfg.model} has {num_classes} classes but {cfg.data} has {len(train_set.classes)}")
    val_loader = build_eval_loader(cfg.data, img_size, mean, std, batch_size=cfg.batch_size, crop_pct=dd.crop_pct,
                                   num_workers=cfg.num_workers, limit=cfg.limit_val)

    world = accelerator.num_processes
    global_batch = cfg.batch_size * world * cfg.grad_accum
    lr = cfg.lr if cfg.unscale_lr else cfg.lr * global_batch / 512
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
    if cfg.resume:
        resume_dir = find_resume_dir(cfg.output_dir, cfg.resume)
        try:
            accelerator.load_state(str(resume_dir))
        except Exception as e:
            raise ValueError(f"cannot resume from {resume_dir}: it does not match this model/optimiser ({e})") from e
        accelerator.print(f"resumed from {resume_dir} at epoch {progress.epoch}, update {progress.num_updates}")
    elif accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", {**asdict(cfg), **(extra_config or {}), "world_size": world,
                                         "global_batch": global_batch, "scaled_lr": lr})
    device = accelerator.device
    log_path = out / "log.jsonl"
    if cfg.sched_on_updates:
        scheduler.step_update(progress.num_updates)
    else:
        scheduler.step(progress.epoch)
    started = time.time()
    done = cfg.max_steps is not None and progress.num_updates >= cfg.max_steps  # resumed at --max-steps
    metrics: dict = {}
    train_loss = float("nan")
    saved_at = None
    for epoch in range(progress.epoch, progress.epoch if done else cfg.epochs):
        if on_epoch_start is not None:
            on_epoch_start(epoch, accelerator.unwrap_model(model))
        train_set.set_epoch(epoch)
        order = train_sampler_indices(len(train_set), epoch, cfg.seed, accelerator.process_index, world, repeats)
        order = order[: batches_per_epoch * cfg.batch_size][progress.batches_done * cfg.batch_size:]
        loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=order, num_workers=cfg.num_workers,
                            drop_last=True, generator=torch.Generator().manual_seed(cfg.seed + epoch),
                            pin_memory=device.type == "cuda")
        model.train()
        loss_sum = torch.zeros((), device=device)
        n_loss = 0
        bar = tqdm(loader, desc=f"epoch {epoch}", disable=not accelerator.is_main_process,
                   initial=progress.batches_done, total=batches_per_epoch)
        for images, targets, _ in bar:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            if mixup is not None:
                images, targets = mixup(images, targets)
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss = loss_fn(model, images, targets, criterion) if loss_fn else criterion(model(images), targets)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch}, update {progress.num_updates}")
                accelerator.backward(loss)
                if cfg.clip_grad and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            n_loss += 1
            progress.batches_done += 1
            if accelerator.sync_gradients:
                progress.num_updates += 1
                scheduler.step_update(progress.num_updates)
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
                at_max = cfg.max_steps is not None and progress.num_updates >= cfg.max_steps
                epoch_end = progress.batches_done >= batches_per_epoch
                if cfg.checkpointing_steps and progress.num_updates % cfg.checkpointing_steps == 0 and not epoch_end:
                    _save_checkpoint(accelerator, ckpt_root, progress, cfg.keep_checkpoints)
                    saved_at = progress.num_updates
                if at_max:
                    done = True
                    break
        bar.close()
        train_loss = accelerator.reduce(loss_sum / max(n_loss, 1), reduction="mean").item()
        epoch_finished = progress.batches_done >= batches_per_epoch
        if epoch_finished:
            progress.epoch, progress.batches_done = epoch + 1, 0
            if not cfg.sched_on_updates:
                scheduler.step(progress.epoch)
        last = progress.epoch >= cfg.epochs or done
        record = {"epoch": epoch, "updates": progress.num_updates, "train_loss": train_loss,
                  "lr": optimizer.param_groups[0]["lr"], "time_s": time.time() - started}
        if (cfg.eval_every and epoch_finished and progress.epoch % cfg.eval_every == 0) or last:
            metrics = evaluate_classifier(model, val_loader, accelerator, eval_forward)
            record.update(metrics)
        accelerator.print(json.dumps(record))
        if accelerator.is_main_process:
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if saved_at != progress.num_updates or epoch_finished:
            _save_checkpoint(accelerator, ckpt_root, progress, cfg.keep_checkpoints)
        if done:
            break

    if not metrics:
        metrics = evaluate_classifier(model, val_loader, accelerator, eval_forward)
    result = {"train_loss": train_loss, **metrics, "updates": progress.num_updates, "epochs": progress.epoch,
              "wall_time_s": time.time() - started, "world_size": world,
              "ranks_in_sync": ranks_in_sync(accelerator, model)}
    if accelerator.is_main_process:
        save_weights(accelerator.unwrap_model(model), out / "model.safetensors")
        write_json(out / "results.json", result)
    accelerator.wait_for_everyone()
    return result
