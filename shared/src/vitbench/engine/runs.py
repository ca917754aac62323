"""The run folder: one run per ``--output-dir``, atomic checkpoints, the log, and resuming exactly or refusing.

A checkpoint is ``save_state`` written into a temporary directory that is renamed into place, with a
``progress.json`` listing every file's size (a truncated checkpoint is recognised and skipped on resume) and the
run's configuration (a resume with other settings is refused unless ``--resume-override`` names them).
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from accelerate import Accelerator

from ..cli import check_writable
from ..report import write_json
from .config import TrainConfig

RUN_FILES = ("config.json", "log.jsonl", "results.json", "model.safetensors", "checkpoints")
# Fields a resume does not compare: those that do not change a run's course (a resume may change them freely)
# and global_batch / scaled_lr, which follow from compared ones. Every other field of the configuration (and
# world_size, train_samples) must match the checkpoint's unless --resume-override names it.
RUN_ONLY_FIELDS = frozenset({
    "output_dir", "resume", "resume_override", "overwrite", "num_workers", "cpu", "checkpointing_steps",
    "keep_checkpoints", "max_steps", "eval_every", "limit_val", "skip_corrupt", "resume_overrides",
    "global_batch", "scaled_lr",
})


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


def _step_of(path: Path) -> int | None:
    digits = path.name.removeprefix("step_")
    return int(digits) if path.name.startswith("step_") and digits.isdigit() else None


def _checkpoints(root: Path) -> list[Path]:
    """The run's checkpoints, oldest first by update number."""
    return sorted((p for p in root.glob("step_*") if p.is_dir() and _step_of(p) is not None), key=_step_of)


def read_json(path: Path) -> dict:
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


def append_log(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def rewind(out: Path, updates: int) -> None:
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


def save_checkpoint(accelerator: Accelerator, root: Path, progress: TrainProgress, keep: int,
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


@dataclass
class RunFolder:
    """The folder of one run and what a resume continues from: ``record`` is the run's configuration as saved
    (``config.json``, every checkpoint), ``candidates`` the checkpoints to try (newest first), ``saved`` the
    configuration the resumed run was started with."""

    cfg: TrainConfig
    out: Path
    record: dict
    candidates: list[Path]
    saved: dict

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    @property
    def log(self) -> Path:
        return self.out / "log.jsonl"

    @classmethod
    def claim(cls, cfg: TrainConfig, accelerator: Accelerator, extra_config: dict | None = None) -> RunFolder:
        """One run, one folder; a resume continues exactly or is refused -- all before any expensive work. The
        main process then reports skipped checkpoints and clears the folder for ``--overwrite``."""
        world = accelerator.num_processes
        global_batch = cfg.batch_size * world * cfg.grad_accum
        lr = cfg.lr if cfg.unscale_lr else cfg.lr * global_batch / 512
        record = {**asdict(cfg), **(extra_config or {}), "world_size": world, "global_batch": global_batch,
                  "scaled_lr": lr}
        out = Path(cfg.output_dir)
        candidates, notes = resume_candidates(out, cfg.resume) if cfg.resume else ([], [])
        held = claim_output_dir(out, cfg.resume, cfg.overwrite)
        if held and candidates and candidates[0].resolve().parent != (out / "checkpoints").resolve():
            raise FileExistsError(f"{out} holds another run ({', '.join(held)}); resume a checkpoint from elsewhere "
                                  "into a new --output-dir")
        if cfg.resume_override:
            check_override_names(cfg.resume_override, record)
        saved = {}
        if cfg.resume:  # the newest checkpoint's settings; a run stopped before its first checkpoint: config.json
            saved = (read_json(candidates[0] / "progress.json").get("config") if candidates else None) \
                or read_json(out / "config.json")
        run = cls(cfg, out, record, candidates, saved)
        run.check_settings(out)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            run._clear(notes, held)
        accelerator.wait_for_everyone()
        return run

    def _clear(self, notes: list[str], held: list[str]) -> None:
        for note in notes:
            print(note, file=sys.stderr, flush=True)
        if self.cfg.overwrite and held:
            remove_run_files(self.out, held)
            print(f"--overwrite: removed the earlier run's {', '.join(held)} from {self.out}", file=sys.stderr)
        if self.cfg.resume and not self.candidates:
            print(f"--resume auto: no checkpoint in {self.out} yet; starting the run", file=sys.stderr)

    def check_settings(self, where: str | Path, strict: bool = False) -> dict[str, list]:
        """The resume's check: the settings of :attr:`record` that differ from :attr:`saved` must be named by
        ``--resume-override`` (``ValueError`` otherwise, naming ``where``); returns the accepted changes. Without
        saved settings nothing is compared unless ``strict``."""
        if not (self.saved or strict):
            return {}
        return accept_changes(config_changes(self.saved, self.record), self.cfg.resume_override, where)

    def load(self, accelerator: Accelerator) -> tuple[Path | None, list[str]]:
        """Load the newest candidate checkpoint that loads; one that does not is reported and the previous one is
        tried. Returns it (``None`` when starting) and the failures."""
        failures = []
        for path in self.candidates:  # newest first
            try:
                accelerator.load_state(str(path))
            except Exception as e:  # safetensors, pickle and shape errors have no common type
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                failures.append(f"{path.name}: {first}")
                continue
            return path, failures
        if self.candidates:
            raise ValueError(f"cannot resume from {self.candidates[0]}: it does not match this model/optimiser "
                             f"({'; '.join(failures)})")
        return None, failures

    def resumed(self, checkpoint: Path | None, updates: int) -> dict[str, list]:
        """Check the settings against those ``checkpoint`` was written with and record the accepted changes in
        :attr:`record` (``resume_overrides``); returns them."""
        accepted = {}
        if checkpoint is not None:
            self.saved = read_json(checkpoint / "progress.json").get("config") or self.saved
            accepted = self.check_settings(checkpoint, strict=True)
        self.record["resume_overrides"] = (self.saved.get("resume_overrides", []) if self.saved else []) + (
            [{"updates": updates, "checkpoint": str(checkpoint), "changes": accepted}] if accepted else [])
        return accepted
