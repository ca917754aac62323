"""``liferegress-train``: two-stage training (Algorithm 1, as released) or the single-stage ablation (Table IV).

* stage 1: only ``W`` is trained (lr 1e-3), soft weights, backbone frozen;
* stage 2: only blocks ``t_base..T-1`` are trained (lr 1e-5) under hard pruning, predictor frozen;
* single stage: ``W`` (1e-3) and the whole backbone (1e-5) together with soft weights, for both stages' epochs.

Each stage is one run of ``vitbench.engine.train`` (Accelerate: multi-GPU/node, CPU multi-process, AMP, atomic
checkpoints, exact resume) in ``OUTPUT_DIR/stage1``, ``stage2`` or ``single``: the stages are parts of one run, which
owns ``OUTPUT_DIR`` (a folder holding another run is refused unless ``--resume auto`` or ``--overwrite``).
``--resume auto`` keeps the finished stages only if they were trained with the same settings and continues whichever
stage was interrupted; a finished run is reported and left as it is. The final model is
``OUTPUT_DIR/model.safetensors`` (backbone + ``life_predictor.W``, config in the metadata) and
``OUTPUT_DIR/results.json`` holds every stage's metrics next to the paper's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from vitbench.cli import check_train_input, renamed, run
from vitbench.engine import (
    TrainConfig,
    accept_changes,
    add_train_args,
    claim_output_dir,
    config_changes,
    lock_run,
    new_head,
    remove_run_files,
    train,
)
from vitbench.models import create_model, load_checkpoint as load_backbone
from vitbench.launch import main_print
from vitbench.report import markdown_table, write_json

from .checkpoint import load_checkpoint, save_checkpoint
from .life import DEFAULT_DROP_LAYERS
from .paper import paper_row
from .patch import apply, set_mode

SCHEMES = ("two-stage", "single-stage")
RUN_FILES = ("stage1", "stage2", "single", "model.safetensors", "results.json")

# The released recipe (package README): 1 epoch per stage, batch 128, AdamW wd 0.05 on every trained tensor, linear
# warm-up over 1 % of the updates then linear decay to 0 (timm "poly" with power 1), label smoothing 0.1, no mixup,
# cutmix, repeated augmentation or drop path; learning rates are absolute (not scaled by the batch size).
RECIPE = dict(
    data="digits", model="vit_digits_patch8_112", pretrained=True, output_dir="runs/liferegress-train", epochs=1,
    batch_size=128, lr=1e-3, unscale_lr=True, sched="poly", decay_rate=1.0, sched_on_updates=True, warmup_epochs=0.01,
    warmup_lr=0.0, min_lr=0.0, weight_decay=0.05, smoothing=0.1, mixup=0.0, cutmix=0.0, repeated_aug=0,
    drop_path=0.0, eval_every=1,
)


@dataclass(frozen=True)
class LifeTrainConfig:
    """Method flags; the engine flags stay in ``vitbench.engine.TrainConfig``."""

    scheme: str = "two-stage"
    keep_rate: float = 0.7
    temperature: float = 1.5
    drop_layers: tuple[int, ...] = DEFAULT_DROP_LAYERS
    predictor_lr: float = 1e-3
    backbone_lr: float = 1e-5

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"--scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if not 0.0 < self.keep_rate <= 1.0:
            raise ValueError(f"--rho must be in (0, 1], got {self.keep_rate}")
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")
        if self.predictor_lr <= 0 or self.backbone_lr <= 0:
            raise ValueError("--predictor-lr and --backbone-lr must be > 0")

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> LifeTrainConfig:
        return cls(scheme=ns.scheme, keep_rate=ns.rho, temperature=ns.temperature,
                   drop_layers=tuple(ns.drop_layers), predictor_lr=ns.predictor_lr, backbone_lr=ns.backbone_lr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="liferegress-train",
        description="Train Life Regression on a pretrained timm ViT/DeiT: two stages (W with soft weights, then "
        "blocks 4-11 under hard pruning) or the single-stage ablation. --epochs is per stage. Defaults: the "
        "released recipe on the embedded digits and backbone.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("life regression")
    g.add_argument("--scheme", choices=SCHEMES, default="two-stage",
                   help="two-stage (the paper: W alone, then blocks 4-11) or single-stage (the ablation)")
    g.add_argument("--rho", type=float, default=0.7, help="keep rate rho (0.7 -> 140/100/72 tokens)")
    g.add_argument("--temperature", type=float, default=1.5, help="U of the soft weights sigmoid(U (tau - t))")
    g.add_argument("--drop-layers", type=int, nargs="+", default=list(DEFAULT_DROP_LAYERS),
                   help="0-indexed blocks where the token set shrinks; lives are predicted before the first")
    g.add_argument("--predictor-lr", type=float, default=1e-3, help="lr of W (stage 1 / single stage)")
    g.add_argument("--backbone-lr", type=float, default=1e-5, help="lr of the backbone (stage 2 / single stage)")
    renamed(g, "--keep-rate", "--rho")
    add_train_args(p, **RECIPE)
    return p


def _stage_done(stage_dir: Path, epochs: int) -> bool:
    results = stage_dir / "results.json"
    return results.is_file() and json.loads(results.read_text()).get("epochs", 0) >= epochs


def _builder(tcfg, lcfg: LifeTrainConfig, stage: str, init: str | None):
    """Model factory for one stage: backbone (pretrained / --checkpoint), patched, trainable set and mode."""

    def build() -> torch.nn.Module:
        model = create_model(tcfg.model, pretrained=tcfg.pretrained and init is None and tcfg.checkpoint is None,
                             drop_path_rate=tcfg.drop_path)
        if tcfg.checkpoint and init is None:
            load_backbone(model, tcfg.checkpoint)
        if init is None:  # --num-classes: a new head, said once (later stages load the earlier stage's head)
            new_head(model, tcfg, PartialState(), resuming=False)
        elif tcfg.num_classes:
            model.reset_classifier(tcfg.num_classes)
        apply(model, keep_rate=lcfg.keep_rate, temperature=lcfg.temperature, drop_layers=lcfg.drop_layers)
        if init is not None:
            load_checkpoint(model, init)
        t_base = model.life_cfg.t_base
        for name, p in model.named_parameters():
            if stage == "stage1":  # W, and a --num-classes head (our option: it is new, so it must learn)
                p.requires_grad_(name == "life_predictor.W" or (tcfg.num_classes is not None and _is_head(name)))
            elif stage == "stage2":
                p.requires_grad_(name.startswith("blocks.") and int(name.split(".")[1]) >= t_base)
            else:
                p.requires_grad_(True)
        return set_mode(model, "hard" if stage == "stage2" else "auto")

    return build


def _is_head(name: str) -> bool:
    return name.startswith("head.")


def _param_groups(lcfg: LifeTrainConfig, new_head: bool = False):
    """W (and a ``--num-classes`` head, ``new_head``) at the predictor's lr, the rest at the backbone's."""

    def fast(name: str) -> bool:
        return name == "life_predictor.W" or (new_head and _is_head(name))

    def groups(model) -> list[dict]:
        w = [p for n, p in model.named_parameters() if fast(n) and p.requires_grad]
        rest = [p for n, p in model.named_parameters() if not fast(n) and p.requires_grad]
        out = []
        if w:
            out.append({"params": w, "lr": lcfg.predictor_lr})
        if rest:
            out.append({"params": rest, "lr": lcfg.backbone_lr})
        return out

    return groups


def _step_logger(path: Path):
    """``loss_fn`` for the engine that also appends each step's loss and mean clamped life (the released code's
    diagnostic) to ``steps.jsonl`` on the main process."""

    def loss_fn(model, images, targets, criterion):
        loss = criterion(model(images), targets)
        # looked up per call: a PartialState made before the engine's Accelerator(cpu=...) would pin the process
        # group to a non-distributed state
        if PartialState().is_main_process:
            inner = getattr(model, "module", model)
            lives, cfg = inner.record.lives, inner.life_cfg
            record = {"loss": loss.item(), "life": lives[:, 1:].clamp(cfg.t_base, cfg.depth).mean().item()}
            with path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        return loss

    return loss_fn


def loss_trend(path: Path, frac: float = 0.1) -> dict:
    """Mean training loss over the first and the last ``frac`` of the logged steps."""
    losses = [json.loads(line)["loss"] for line in path.read_text().splitlines()] if path.is_file() else []
    if not losses:
        return {}
    k = max(1, int(len(losses) * frac))
    return {"loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k, "steps_logged": len(losses)}


def released_augmentation(data: str) -> dict | None:
    """The released training transform (package README): random-resized crop, flip and colour jitter 0.4, without
    RandAugment or random erasing. The embedded digits keep their own defaults (no crops or flips)."""
    return None if data.startswith("digits") else {"auto_augment": None, "reprob": 0.0, "color_jitter": 0.4}


def train_stages(tcfg: TrainConfig, lcfg: LifeTrainConfig) -> dict:
    """Train the scheme's stages (keeping finished ones on ``--resume``); returns the per-stage results. Only the main
    process writes the final weights and ``results.json``."""
    out = Path(tcfg.output_dir)
    if tcfg.resume not in (None, "auto"):
        raise ValueError("liferegress-train resumes per stage: use --resume auto")
    state = PartialState(cpu=tcfg.cpu)  # the same process group the engine's Accelerator(cpu=...) uses
    held = claim_output_dir(out, tcfg.resume, tcfg.overwrite, RUN_FILES)
    finished = finished_run(out, tcfg, lcfg, held) if tcfg.resume and not tcfg.overwrite else None
    state.wait_for_everyone()  # every process has looked before the main one locks and writes
    lock = lock_run(out, state, "liferegress-train")  # refused on every process when another run holds it
    try:
        return _train_stages(tcfg, lcfg, out, held, state, finished)
    finally:
        lock.release()


def scheme_stages(lcfg: LifeTrainConfig) -> list[str]:
    return ["stage1", "stage2"] if lcfg.scheme == "two-stage" else ["single"]


def finished_run(out: Path, tcfg: TrainConfig, lcfg: LifeTrainConfig, held: list[str]) -> dict | None:
    """What ``--resume auto`` finds in ``out``: the saved summary of a finished run (every stage done, the final
    weights and ``results.json`` written), which a resume leaves as it is, or ``None`` (something to continue).
    Final files without any stage folder to continue from are a finished run whose stages are gone or another
    command's results: refused (``FileExistsError``), as the engine refuses them for one run."""
    final = [name for name in ("model.safetensors", "results.json") if name in held]
    stages = scheme_stages(lcfg)
    if final and not any(stage in held for stage in stages):
        raise FileExistsError(f"--resume {tcfg.resume}: {out} holds a finished run or another command's results "
                              f"({', '.join(held)}) and no checkpoint to continue from; start over with --overwrite "
                              "or choose another --output-dir")
    if len(final) < 2 or not all(_stage_done(out / s, tcfg.epochs * (2 if s == "single" else 1)) for s in stages):
        return None
    try:
        summary = json.loads((out / "results.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    own = isinstance(summary, dict) and summary.get("finished") is True and isinstance(summary.get("stages"), dict)
    return summary if own and set(summary["stages"]) == set(stages) else None


def _train_stages(tcfg: TrainConfig, lcfg: LifeTrainConfig, out: Path, held: list[str], state,
                  finished: dict | None = None) -> dict:
    """:func:`train_stages` holding ``out``'s lock. ``--overwrite`` removes the earlier run (``held``) only when the
    first stage has loaded every input and is about to write (the engine's ``before_start``). A ``finished`` run
    (:func:`finished_run`) is checked against the settings and returned; nothing is written."""
    stages = scheme_stages(lcfg)
    results, init, accepted, trained = {}, None, {}, False
    for stage in stages:
        sdir = out / stage
        epochs = tcfg.epochs * (2 if stage == "single" else 1)
        clear = tcfg.overwrite and not trained  # the first stage trained with --overwrite clears the earlier run
        scfg = dataclasses.replace(tcfg, output_dir=str(sdir), epochs=epochs, overwrite=clear and stage in held)
        extra = {"stage": stage, **dataclasses.asdict(lcfg)}
        if not tcfg.overwrite and _stage_done(sdir, epochs):  # only with --resume: the folder held no run otherwise
            saved = json.loads((sdir / "config.json").read_text())
            changes = config_changes(saved, {**dataclasses.asdict(scfg), **extra})
            accepted |= accept_changes(changes, tcfg.resume_override, sdir)
            results[stage] = json.loads((sdir / "results.json").read_text())
        else:
            trained = True
            others = [h for h in held if h != stage] if clear else []
            groups = _param_groups(lcfg, new_head=tcfg.num_classes is not None)
            results[stage] = train(scfg, _builder(tcfg, lcfg, stage, init), param_groups=groups,
                                   loss_fn=_step_logger(sdir / "steps.jsonl"), extra_config=extra,
                                   recipe_overrides=released_augmentation(tcfg.data),
                                   before_start=lambda others=others: remove_run_files(out, others))
            results[stage].update(loss_trend(sdir / "steps.jsonl"))
            if results[stage].get("epochs", 0) < epochs:  # stopped by --max-steps: resume later
                return {"stages": results, "finished": False}
        init = str(sdir / "model.safetensors")
    if accepted and not trained:
        listed = "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in accepted.items())
        raise ValueError(f"{out} holds a finished run; its weights were trained without these changes ({listed}); "
                         "use --overwrite or another --output-dir")
    if finished is not None and not trained:
        main_print(f"{out} holds a finished run (model.safetensors, results.json); nothing to do", file=sys.stderr)
        return finished
    last = results[stages[-1]]
    scheme = "two" if lcfg.scheme == "two-stage" else "single"
    summary = {"stages": results, "finished": True, "checkpoint": str(out / "model.safetensors"), "model": tcfg.model,
               "keep_rate": lcfg.keep_rate, "temperature": lcfg.temperature, "scheme": lcfg.scheme,
               "top1": last.get("top1"), "top5": last.get("top5"), "resume_overrides": accepted,
               **paper_row(tcfg.model, lcfg.keep_rate, scheme, lcfg.temperature)}
    if state.is_main_process:
        model = _builder(tcfg, lcfg, "final", init)()
        save_checkpoint(model, out / "model.safetensors",
                        extra={"model": tcfg.model, "data": tcfg.data, "scheme": lcfg.scheme})
        write_json(out / "results.json", summary)
    state.wait_for_everyone()
    return summary


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), command, argv, check=check_train_input)


def command(args: argparse.Namespace) -> int:
    summary = train_stages(TrainConfig.from_args(args), LifeTrainConfig.from_args(args))
    if not summary["finished"]:
        main_print("stopped early (--max-steps); continue with --resume auto")
        return 0
    rows = [{"stage": s, "loss_first": r.get("loss_first"), "loss_last": r.get("loss_last"), "top1": r.get("top1"),
             "top5": r.get("top5"), "updates": r.get("updates")} for s, r in summary["stages"].items()]
    main_print(markdown_table(rows, digits=4))
    columns = ("model", "scheme", "keep_rate", "temperature", "top1", "paper_top1", "top5", "paper_top5")
    main_print(markdown_table([summary], [c for c in columns if c in summary], digits=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
