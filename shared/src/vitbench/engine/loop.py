"""The training loop: :func:`train` runs the DeiT recipe on HuggingFace Accelerate over any data source.

The sample order of an epoch comes from a seeded sampler, the augmentation of sample ``i`` in epoch ``e`` is a pure
function of ``(seed, e, i)``, and RNG states are restored, so a run killed after any checkpoint and resumed ends
with the same weights as an uninterrupted one. The repeated-augmentation sampler is applied per rank by hand, never
sharded a second time by ``prepare``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data import CorruptImageError, DataDefaults, train_sampler_indices
from ..launch import check_launch
from ..models import save_weights
from ..report import write_json
from ..sources import DataSource, LabelledSet, data_source, resolve_input
from ..video import CorruptVideoError
from .config import TrainConfig
from .metrics import decode_message, evaluate_classifier, ranks_in_sync
from .health import Diverged, diverged, first_nonfinite, resume_hint, weights_max
from .runs import (
    RunFolder,
    TrainProgress,
    append_log,
    guarded_write,
    intact_note,
    lock_run,
    read_json,
    rewind,
    save_checkpoint,
)
from .signals import preempted, stop_requested, stop_signals
from .tracking import end_trackers, log_record, start_trackers, tracker_kwargs

LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, Callable], torch.Tensor]


def train(cfg: TrainConfig, build_model: Callable[[], torch.nn.Module], *, loss_fn: LossFn | None = None,
          param_groups: Callable[[torch.nn.Module], list] | None = None,
          on_epoch_start: Callable[[int, torch.nn.Module], None] | None = None,
          eval_forward: Callable | None = None, extra_config: dict | None = None,
          recipe_overrides: dict | None = None, before_start: Callable[[], None] | None = None) -> dict:
    """Train ``build_model()`` with the DeiT recipe; returns the final metrics.

    ``loss_fn(model, images, targets, criterion)`` computes the loss (default ``criterion(model(images), targets)``);
    ``param_groups(model)`` returns optimiser groups (dicts may set their own ``lr``; default: every trainable
    parameter, no weight decay on norms/biases); ``on_epoch_start(epoch, model)`` may switch phases;
    ``eval_forward(model, images)`` returns logits for evaluation; ``recipe_overrides`` replaces fields of the
    dataset's :class:`~vitbench.data.DataDefaults` (e.g. a paper's own augmentation); ``before_start()`` runs on
    the main process once every input loaded, just before the run writes (a caller's own ``--overwrite``). Writes
    ``config.json``, ``log.jsonl``, ``checkpoints/step_*`` and finally ``model.safetensors`` and ``results.json`` to
    ``cfg.output_dir`` (main process only), holding the folder's lock (:mod:`.lock`) throughout. Raises
    :class:`Preempted` when SIGTERM/SIGUSR1/SIGINT stopped the run at a checkpoint, :class:`Diverged` on a
    non-finite loss, weights or outputs. The process group is left up (no ``end_training``), so several ``train``
    calls (stages) can run in one process: tearing it down and re-creating it on the same torchrun store races on
    stale addresses.
    """
    check_launch()  # before any work: a launcher that started fewer processes than asked is refused
    accelerator = Accelerator(cpu=cfg.cpu, mixed_precision=cfg.mixed_precision,
                              gradient_accumulation_steps=cfg.grad_accum, step_scheduler_with_optimizer=False,
                              **tracker_kwargs(cfg))
    lock = lock_run(Path(cfg.output_dir), accelerator)
    try:
        folder = RunFolder.claim(cfg, accelerator, extra_config)
        set_seed(cfg.seed)
        model = build_model()
        new_head(model, cfg, accelerator, resuming=bool(folder.candidates))
        defaults = recipe_defaults(cfg, model, recipe_overrides)
        source = data_source(cfg.data, model, cfg.img_size, defaults=defaults)
        train_set, val_loader = load_data(cfg, source, model, folder)
        recipe = Recipe.build(cfg, model, param_groups, defaults, train_set, folder, accelerator)
        val_set = val_loader.dataset
        model, recipe.optimizer, val_loader = accelerator.prepare(model, recipe.optimizer, val_loader)
        loop = Loop(cfg, accelerator, folder, model, recipe, train_set, (val_set, val_loader), loss_fn,
                    eval_forward or source.forward, on_epoch_start)
        loop.resume(before_start)
        with stop_signals() as received:
            loop.train_epochs(received)
        return loop.finish()
    finally:
        end_trackers(accelerator)
        lock.release()


def new_head(model: torch.nn.Module, cfg: TrainConfig, accelerator: Accelerator, resuming: bool) -> None:
    """``--num-classes N``: replace the classifier by a new ``N``-class head (timm's ``reset_classifier``),
    saying that the initial weights' head was dropped. A resume loads the new head from its checkpoint."""
    n = cfg.num_classes
    old = getattr(model, "num_classes", None)
    if n is None or old == n:
        return
    if old is None or not hasattr(model, "reset_classifier"):
        raise ValueError(f"--num-classes {n}: {cfg.model} has no classifier head to replace")
    model.reset_classifier(n)
    if not resuming:
        source = "the --checkpoint's" if cfg.checkpoint else "the pretrained" if cfg.pretrained else "the model's"
        dropped = "dropped" if cfg.checkpoint or cfg.pretrained else "replaced (it was untrained)"
        accelerator.print(f"--num-classes {n}: a new {n}-class head; {source} {old}-class head weights {dropped}",
                          file=sys.stderr)


def recipe_defaults(cfg: TrainConfig, model: torch.nn.Module, overrides: dict | None) -> DataDefaults:
    """The dataset's recipe (:class:`~vitbench.data.DataDefaults`) with a method's ``overrides`` and the
    ``--auto-augment`` / ``--color-jitter`` flags applied."""
    dd = resolve_input(model, cfg.data, cfg.img_size)[3]
    if overrides:
        dd = replace(dd, **overrides)
    if cfg.auto_augment is not None:
        dd = replace(dd, auto_augment=None if cfg.auto_augment == "none" else cfg.auto_augment)
    if cfg.color_jitter is not None:
        dd = replace(dd, color_jitter=cfg.color_jitter or None)
    return dd


def load_data(cfg: TrainConfig, source: DataSource, model: torch.nn.Module,
              folder: RunFolder) -> tuple[LabelledSet, DataLoader]:
    """The training split and the validation loader (``--batch-size`` inputs per batch, so clips of several views
    come fewer per batch); refuses a class count other than the model's and, on resume, a changed training set."""
    train_set = source.train_set(cfg.limit_train, cfg.skip_corrupt, cfg.seed)
    val_loader = source.eval_loader(max(cfg.batch_size // source.views, 1), cfg.num_workers, cfg.limit_val,
                                    cfg.skip_corrupt)
    if not cfg.skip_corrupt:
        source.check_headers(val_loader.dataset)  # cheap: a broken validation file fails now, not after an epoch
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and num_classes != len(train_set.classes):
        raise ValueError(f"model {cfg.model} has {num_classes} classes but {cfg.data} has {len(train_set.classes)}; "
                         f"train a new head with --num-classes {len(train_set.classes)}")
    folder.record["train_samples"] = len(train_set)
    folder.check_settings(folder.out)
    return train_set, val_loader


@dataclass
class Recipe:
    """The optimisation of a run (optimiser, schedule, mixing, loss) and the geometry of its epochs."""

    optimizer: torch.optim.Optimizer
    scheduler: object
    mixup: Mixup | None
    criterion: Callable
    repeats: int
    batches_per_epoch: int
    updates_per_epoch: int

    @classmethod
    def build(cls, cfg: TrainConfig, model: torch.nn.Module, param_groups: Callable | None, dd: DataDefaults,
              train_set: LabelledSet, folder: RunFolder, accelerator: Accelerator) -> Recipe:
        params = param_groups(model) if param_groups else model
        optimizer = create_optimizer_v2(params, opt=cfg.opt, lr=folder.record["scaled_lr"],
                                        weight_decay=cfg.weight_decay)
        repeats = (3 if dd.repeated_aug else 0) if cfg.repeated_aug is None else cfg.repeated_aug
        samples_per_rank = len(train_sampler_indices(len(train_set), 0, cfg.seed, accelerator.process_index,
                                                     accelerator.num_processes, repeats))
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
        mixup, criterion = mixing(cfg, dd, len(train_set.classes))
        return cls(optimizer, scheduler, mixup, criterion, repeats, batches_per_epoch, updates_per_epoch)


def mixing(cfg: TrainConfig, dd: DataDefaults, num_classes: int) -> tuple[Mixup | None, Callable]:
    """Mixup/CutMix (alphas: the flags, else the dataset's) and the loss that goes with it."""
    mixup_alpha = dd.mixup if cfg.mixup is None else cfg.mixup
    cutmix_alpha = dd.cutmix if cfg.cutmix is None else cfg.cutmix
    if mixup_alpha > 0 or cutmix_alpha > 0:
        if cfg.batch_size % 2:
            raise ValueError("mixup/cutmix need an even --batch-size")
        return (Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, label_smoothing=cfg.smoothing,
                      num_classes=num_classes), SoftTargetCrossEntropy())
    if cfg.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return None, torch.nn.CrossEntropyLoss()


class Loop:
    """The epochs of one run over a prepared model, with its checkpoints, evaluations, log and preemption."""

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator, folder: RunFolder, model: torch.nn.Module,
                 recipe: Recipe, train_set: LabelledSet, val: tuple[LabelledSet, DataLoader], loss_fn: LossFn | None,
                 eval_forward: Callable | None, on_epoch_start: Callable | None):
        self.cfg, self.accelerator, self.folder, self.model, self.recipe = cfg, accelerator, folder, model, recipe
        self.train_set, (self.val_set, self.val_loader), self.loss_fn = train_set, val, loss_fn
        self.eval_forward, self.on_epoch_start = eval_forward, on_epoch_start
        self.world = accelerator.num_processes
        self.main = accelerator.is_main_process
        self.progress = TrainProgress()
        accelerator.register_for_checkpointing(self.progress)
        self.checkpoint: Path | None = None
        self.resumed_from: Path | None = None
        self.resumed_at = 0  # the update the run resumed at
        self.saved_at: int | None = None
        self.metrics: dict = {}
        self.train_loss = float("nan")
        self.loss_sum = torch.zeros((), device=accelerator.device)
        self.loss_batches = 0
        self.received: list[str] = []
        self.done = False
        self.finished: dict | None = None  # the results of a run that a resume found complete
        self.started = 0.0

    def resume(self, before_start: Callable[[], None] | None = None) -> None:
        """Load the newest intact checkpoint (if resuming), then -- every input loaded -- clear the folder for
        ``--overwrite`` and write ``config.json`` and the start of the log. A resume of a complete run writes
        nothing and :meth:`finish` returns its results."""
        folder, progress, accelerator = self.folder, self.progress, self.accelerator
        resumed_from, failures = folder.load(accelerator, self.loaded_problem)
        accepted = folder.resumed(resumed_from, progress.num_updates)
        self.checkpoint = self.resumed_from = resumed_from
        self.resumed_at = progress.num_updates
        if resumed_from is None and self.loaded_problem():  # a NaN in --checkpoint, --init-backbone, ...
            bad = first_nonfinite(accelerator.unwrap_model(self.model))
            raise ValueError(f"the initial weights of {self.cfg.model} are not finite ({bad}); nothing was trained "
                             "or removed")
        if self.main:
            for failure in failures:
                print(f"checkpoint {failure}; resuming from {resumed_from}", file=sys.stderr)
        self.finished = self.complete_results() if resumed_from is not None else None
        if self.finished is not None:
            accelerator.print(f"{folder.out} holds a finished run (update {progress.num_updates}, results.json); "
                              "nothing to do", file=sys.stderr)
            return
        if self.main:
            folder.start()
            if before_start is not None:
                before_start()
            if self.cfg.resume:
                rewind(folder.out, progress.num_updates)
            start_trackers(accelerator, folder.record, folder.saved)
            self.write(folder.out / "config.json", lambda: write_json(folder.out / "config.json", folder.record))
            self.log({"event": "resume" if resumed_from else "start", "epoch": progress.epoch,
                      "updates": progress.num_updates, "checkpoint": resumed_from and str(resumed_from),
                      "overrides": accepted, "world_size": self.world,
                      "skipped_images": {"train": self.train_set.skipped, "val": self.val_set.skipped}})
        if resumed_from is not None:
            accelerator.print(f"resumed from {resumed_from} at epoch {progress.epoch}, update {progress.num_updates}"
                              + (f" with {', '.join(f'{k} {a!r} -> {b!r}' for k, (a, b) in accepted.items())}"
                                 if accepted else ""))
        accelerator.wait_for_everyone()

    def loaded_problem(self) -> str | None:
        """Why freshly loaded checkpoint weights cannot be trained from (a non-finite tensor), or ``None``."""
        if math.isfinite(weights_max(self.model).item()):
            return None
        return f"holds non-finite weights ({first_nonfinite(self.accelerator.unwrap_model(self.model))})"

    def complete_results(self) -> dict | None:
        """The saved results when the resumed checkpoint is the run's end and ``results.json`` was written there."""
        cfg, progress = self.cfg, self.progress
        at_end = progress.epoch >= cfg.epochs or (cfg.max_steps is not None and progress.num_updates >= cfg.max_steps)
        results = read_json(self.folder.out / "results.json") if at_end else {}
        return results if results.get("updates") == progress.num_updates else None

    def write(self, path: Path, write: Callable[[], object]):
        """A write of the run's results or log; a failure (disk full, I/O) becomes one line naming ``path``."""
        return guarded_write(path, write, lambda: intact_note(self.folder.checkpoints))

    def log(self, record: dict) -> None:
        self.write(self.folder.log, lambda: append_log(self.folder.log, record))

    def schedule_position(self) -> int:
        return (self.progress.epoch * self.recipe.updates_per_epoch
                + self.progress.samples_done // self.folder.record["global_batch"])

    def train_epochs(self, received: list[str]) -> None:
        """Every remaining epoch (none when resumed at ``--max-steps``); ``received`` collects stop signals."""
        cfg, progress = self.cfg, self.progress
        self.received = received
        if self.finished is not None:
            return
        if cfg.sched_on_updates:
            self.recipe.scheduler.step_update(self.schedule_position())
        else:
            self.recipe.scheduler.step(progress.epoch)
        self.started = time.time()
        self.done = cfg.max_steps is not None and progress.num_updates >= cfg.max_steps  # resumed at --max-steps
        for epoch in range(progress.epoch, progress.epoch if self.done else cfg.epochs):
            self.epoch(epoch)
            if self.done:
                break

    def epoch(self, epoch: int) -> None:
        cfg, accelerator = self.cfg, self.accelerator
        if self.on_epoch_start is not None:
            self.on_epoch_start(epoch, accelerator.unwrap_model(self.model))
        self.train_set.set_epoch(epoch)
        loader = self.epoch_loader(epoch)
        batches = len(loader.sampler) // cfg.batch_size
        self.model.train()
        total = self.recipe.batches_per_epoch
        # the epoch's losses so far (a resumed epoch continues the sum its checkpoint saved)
        self.loss_sum = torch.full((), self.progress.loss_sum, device=accelerator.device)
        self.loss_batches = self.progress.loss_batches
        bar = tqdm(loader, desc=f"epoch {epoch}", disable=not self.main, initial=total - batches, total=total)
        try:
            consumed = self.train_batches(bar, epoch, batches)
        except (CorruptImageError, CorruptVideoError) as e:
            where = f"the last checkpoint is {self.checkpoint}" if self.checkpoint else "no checkpoint was written yet"
            raise type(e)(
                f"{decode_message(e)} ({where}); replace the file, or continue without it: --resume auto "
                "--skip-corrupt --resume-override train_samples (the sample order changes)") from None
        finally:
            bar.close()
        self.train_loss = accelerator.reduce(self.loss_sum / max(self.loss_batches, 1), reduction="mean").item()
        self.end_epoch(epoch, consumed == batches)

    def epoch_loader(self, epoch: int) -> DataLoader:
        """This rank's rest of the epoch: its sample order from where the run stands, whole updates only."""
        cfg, recipe = self.cfg, self.recipe
        order = train_sampler_indices(len(self.train_set), epoch, cfg.seed, self.accelerator.process_index,
                                      self.world, recipe.repeats)
        micro_step = cfg.batch_size * cfg.grad_accum  # samples per process per update
        order = order[: recipe.batches_per_epoch * cfg.batch_size][self.progress.samples_done // self.world:]
        order = order[: len(order) // micro_step * micro_step]
        return DataLoader(self.train_set, batch_size=cfg.batch_size, sampler=order, num_workers=cfg.num_workers,
                          drop_last=True, generator=torch.Generator().manual_seed(cfg.seed + epoch),
                          pin_memory=self.accelerator.device.type == "cuda")

    def train_batches(self, bar, epoch: int, batches: int) -> int:
        """Train on the batches of ``bar``; returns the batches consumed. Stops early at ``--max-steps`` or on a
        stop signal (:class:`Preempted`); a non-finite loss or weights raise :class:`Diverged`."""
        cfg, progress, device = self.cfg, self.progress, self.accelerator.device
        consumed, losses = 0, []
        for images, targets, _ in bar:
            loss = self.step(images.to(device, non_blocking=True), targets.to(device, non_blocking=True))
            losses.append(loss.detach().float().reshape(1))
            self.loss_sum += loss.detach()
            self.loss_batches += 1
            consumed += 1
            progress.samples_done += cfg.batch_size * self.world
            if not self.accelerator.sync_gradients:
                continue
            progress.num_updates += 1
            last = self.check_update(losses, epoch)
            losses = []
            self.recipe.scheduler.step_update(self.schedule_position())
            bar.set_postfix(loss=f"{last:.4f}", lr=f"{self.recipe.optimizer.param_groups[0]['lr']:.2e}")
            if self.after_update(epoch, epoch_end=consumed == batches):
                break
        return consumed

    def step(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One forward/backward (an update every ``--grad-accum`` of them); returns the loss."""
        accelerator, recipe, model = self.accelerator, self.recipe, self.model
        if recipe.mixup is not None:
            images, targets = recipe.mixup(images, targets)
        with accelerator.accumulate(model):
            with accelerator.autocast():
                loss = (self.loss_fn(model, images, targets, recipe.criterion) if self.loss_fn
                        else recipe.criterion(model(images), targets))
            accelerator.backward(loss)
            if self.cfg.clip_grad and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), self.cfg.clip_grad)
            recipe.optimizer.step()
            recipe.optimizer.zero_grad(set_to_none=True)
        return loss

    def check_update(self, losses: list[torch.Tensor], epoch: int) -> float:
        """The update's losses and its weights' largest absolute value, read in the one host sync the progress bar
        already made (all processes agree on the verdict); returns the last loss. Non-finite: :class:`Diverged`."""
        values = torch.cat([*losses, weights_max(self.model).float().reshape(1).to(losses[0].device)])
        bad = (~torch.isfinite(values)).any().float()
        if self.world > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        *read, flag = torch.cat([values, bad.reshape(1)]).tolist()
        *loss_values, weights = read
        if not flag:
            return loss_values[-1]
        bad_loss = next((v for v in loss_values if not math.isfinite(v)), None)
        if bad_loss is not None:
            what = f"loss {bad_loss}"
        elif not math.isfinite(weights):
            what = (f"loss {loss_values[-1]:.4g}, then non-finite weights after the update "
                    f"({first_nonfinite(self.accelerator.unwrap_model(self.model))})")
        else:
            what = "a non-finite loss on another process"
        raise self.diverged(what, epoch)

    def diverged(self, what: str, epoch: int) -> Diverged:
        """Log the divergence; the error names the update, ``what`` went non-finite and where to resume."""
        updates = self.progress.num_updates
        if self.main:
            self.log({"event": "diverged", "epoch": epoch, "updates": updates, "what": what,
                      "checkpoint": self.checkpoint and str(self.checkpoint)})
        hint = resume_hint(self.checkpoint, self.cfg.lr, self.resumed_from, self.resumed_at, updates)
        return diverged(what, epoch, updates, hint)

    def after_update(self, epoch: int, epoch_end: bool) -> bool:
        """Checkpoint every ``--checkpointing-steps`` updates, stop at ``--max-steps`` (returns True) or on a stop
        signal (checkpoint, then :class:`Preempted`)."""
        cfg, updates = self.cfg, self.progress.num_updates
        if cfg.checkpointing_steps and updates % cfg.checkpointing_steps == 0 and not epoch_end:
            self.save(epoch)
        if cfg.max_steps is not None and updates >= cfg.max_steps:
            self.done = True
            return True
        if not epoch_end and stop_requested(self.accelerator, self.received):
            if self.saved_at != updates:
                self.save(epoch)
            self.stop(epoch)
        return False

    def check_weights(self, epoch: int) -> None:
        """Before every save: finite weights, or :class:`Diverged` (nothing non-finite is ever written)."""
        if not math.isfinite(weights_max(self.model).item()):
            raise self.diverged(f"non-finite weights ({first_nonfinite(self.accelerator.unwrap_model(self.model))})",
                                epoch)

    def save(self, epoch: int) -> None:
        """A checkpoint of finite weights, with the epoch's loss sum so far (mean over processes)."""
        self.check_weights(epoch)
        self.progress.loss_sum = self.accelerator.reduce(self.loss_sum.float(), reduction="mean").item() \
            if self.progress.samples_done else 0.0
        self.progress.loss_batches = self.loss_batches if self.progress.samples_done else 0
        self.checkpoint = save_checkpoint(self.accelerator, self.folder.checkpoints, self.progress,
                                          self.cfg.keep_checkpoints, self.folder.record)
        self.saved_at = self.progress.num_updates

    def stop(self, epoch: int):
        preempted(self.accelerator, self.folder.log, self.received, self.checkpoint, self.progress, epoch)

    def end_epoch(self, epoch: int, epoch_finished: bool) -> None:
        """Close the epoch: schedule, checkpoint (before evaluating: a failing evaluation loses no training),
        evaluation when due, the log line; a stop signal ends the run here."""
        cfg, progress = self.cfg, self.progress
        if epoch_finished:
            progress.epoch, progress.samples_done = epoch + 1, 0
            if not cfg.sched_on_updates:
                self.recipe.scheduler.step(progress.epoch)
        last = progress.epoch >= cfg.epochs or self.done
        if self.saved_at != progress.num_updates or epoch_finished:
            self.save(epoch)
        stop = stop_requested(self.accelerator, self.received)
        entry = {"epoch": epoch, "updates": progress.num_updates, "train_loss": self.train_loss,
                 "lr": self.recipe.optimizer.param_groups[0]["lr"], "time_s": time.time() - self.started}
        if not stop and ((cfg.eval_every and epoch_finished and progress.epoch % cfg.eval_every == 0) or last):
            self.metrics = self.evaluate(epoch)
            entry.update(self.metrics)
        self.accelerator.print(json.dumps(entry))
        if self.main:
            self.log(entry)
        log_record(self.accelerator, entry)
        if stop:
            self.stop(epoch)

    def evaluate(self, epoch: int) -> dict:
        """:func:`evaluate_classifier`; an unreadable validation image names the file and the saved checkpoint,
        non-finite outputs are a divergence (no accuracy is reported for them)."""
        try:
            metrics = evaluate_classifier(self.model, self.val_loader, self.accelerator, self.eval_forward)
        except (CorruptImageError, CorruptVideoError) as e:
            where = f"training up to {self.checkpoint} is saved" if self.checkpoint else "no checkpoint was written"
            raise type(e)(f"{decode_message(e)} ({where}); continue without the file: --resume auto "
                          "--skip-corrupt") from None
        nonfinite = metrics.pop("nonfinite", 0)
        if nonfinite:
            raise self.diverged(f"non-finite outputs on {nonfinite} of {metrics['n']} validation inputs", epoch)
        return metrics

    def finish(self) -> dict:
        """The final metrics (evaluating once more if the last epoch did not), the weights and ``results.json``."""
        if self.finished is not None:
            return self.finished
        accelerator, progress, out = self.accelerator, self.progress, self.folder.out
        if not self.metrics:
            self.metrics = self.evaluate(progress.epoch)
        self.check_weights(progress.epoch)
        result = {"train_loss": self.train_loss, **self.metrics, "updates": progress.num_updates,
                  "epochs": progress.epoch, "wall_time_s": time.time() - self.started, "world_size": self.world,
                  "ranks_in_sync": ranks_in_sync(accelerator, self.model),
                  "skipped_images": {"train": len(self.train_set.skipped),
                                     "val": len(self.val_set.skipped)}}
        if self.main:
            model = accelerator.unwrap_model(self.model)
            self.write(out / "model.safetensors", lambda: save_weights(model, out / "model.safetensors"))
            self.write(out / "results.json", lambda: write_json(out / "results.json", result))
        accelerator.wait_for_everyone()
        return result
