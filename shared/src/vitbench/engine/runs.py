"""The run folder: one run per ``--output-dir``, atomic checkpoints, the log, and resuming exactly or refusing.

A checkpoint is ``save_state`` written into a temporary directory that is renamed into place, with a
``progress.json`` listing every file's size and SHA-256 (a truncated or corrupted checkpoint, its RNG states
included, is recognised and skipped on resume) and the run's configuration (a resume with other settings is refused
unless ``--resume-override`` names them; settings the resuming command does not know are refused outright). A write
that fails (disk full, I/O error) removes its partial checkpoint and names the path and the free space.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list

from ..cli import check_writable
from ..report import read_json_file, write_json
from .config import TrainConfig
from .lock import LOCK_NAME, RunLock, RunLocked

RUN_FILES = ("config.json", "log.jsonl", "results.json", "model.safetensors", "checkpoints", "tracking")
# Fields a resume does not compare: those that do not change a run's course (a resume may change them freely)
# and global_batch / scaled_lr, which follow from compared ones. Every other field of the configuration (and
# world_size, train_samples) must match the checkpoint's unless --resume-override names it.
RUN_ONLY_FIELDS = frozenset({
    "output_dir", "resume", "resume_override", "overwrite", "num_workers", "cpu", "checkpointing_steps",
    "keep_checkpoints", "max_steps", "eval_every", "limit_val", "skip_corrupt", "resume_overrides",
    "global_batch", "scaled_lr", "report_to", "tracker_run",
})
# Fields the engine adds to a saved configuration (compared when both sides have them, never "unknown").
ENGINE_FIELDS = frozenset({"world_size", "train_samples"})


class TrainProgress:
    """Where a run stands; saved with every checkpoint. The data position is the number of samples of ``epoch``
    consumed by all processes together, so a resume with another batch or world size (``--resume-override``)
    continues at the same place in the epoch."""

    def __init__(self):
        self.epoch = 0
        self.samples_done = 0
        self.num_updates = 0
        self.loss_sum = 0.0  # the summed batch losses of the epoch so far (mean over processes)
        self.loss_batches = 0  # and their number per process: the epoch's train_loss survives a resume

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "samples_done": self.samples_done, "num_updates": self.num_updates,
                "loss_sum": self.loss_sum, "loss_batches": self.loss_batches}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.samples_done, self.num_updates = state["epoch"], state["samples_done"], state["num_updates"]
        self.loss_sum, self.loss_batches = state.get("loss_sum", 0.0), state.get("loss_batches", 0)


def _step_of(path: Path) -> int | None:
    digits = path.name.removeprefix("step_")
    return int(digits) if path.name.startswith("step_") and digits.isdigit() else None


def _checkpoints(root: Path) -> list[Path]:
    """The run's checkpoints, oldest first by update number."""
    return sorted((p for p in root.glob("step_*") if p.is_dir() and _step_of(p) is not None), key=_step_of)


def read_json(path: Path) -> dict:
    """The JSON in ``path`` ({} when absent); a damaged file raises ``ValueError`` naming it."""
    return read_json_file(path) if path.is_file() else {}


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _listing_problem(info) -> str | None:
    """Why a parsed ``progress.json`` is not a checkpoint listing (valid JSON of another shape), or ``None``."""
    if not isinstance(info, dict):
        return f"progress.json holds {type(info).__name__}, not an object"
    files = info.get("files")
    if not isinstance(files, dict) or not files:
        return f"progress.json lists no files ('files': {json.dumps(files)[:40]})"
    for name, entry in files.items():
        size = entry.get("bytes") if isinstance(entry, dict) else entry
        if not isinstance(size, int) or isinstance(size, bool):
            return f"progress.json entry for {name} is malformed"
    if not isinstance(info.get("config", {}), dict):
        return "progress.json 'config' is malformed"
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint directory ``path`` cannot be trusted (unreadable or malformed ``progress.json``, a file
    missing, of another size or with another SHA-256 than was written), or ``None``."""
    try:
        info = json.loads((path / "progress.json").read_text())
    except (OSError, ValueError) as e:
        return f"progress.json unreadable: {e}"
    problem = _listing_problem(info)
    if problem:
        return problem
    for name, entry in info["files"].items():
        file = path / name
        size, digest = (entry["bytes"], entry.get("sha256")) if isinstance(entry, dict) else (entry, None)
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
        if digest is not None and sha256(file) != digest:
            return f"{name} does not match the SHA-256 recorded when it was written"
        if digest is None and name.startswith("random_states_") and not _unpickles(file):
            return f"{name} does not load (the RNG states)"
    return None


def _unpickles(path: Path) -> bool:
    try:
        torch.load(path, map_location="cpu", weights_only=False)  # our own file, as Accelerate loads it
    except Exception:  # any unpickling failure
        return False
    return True


def free_space(path: Path) -> str:
    """The free space of the file system holding ``path`` (or its nearest existing parent), for messages."""
    for folder in (path, *path.parents):
        if folder.exists():
            free = shutil.disk_usage(folder).free
            break
    else:
        return "free space unknown"
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if free < 1024 or unit == "TB":
            return f"{free:.0f} {unit} free" if unit == "bytes" else f"{free:.1f} {unit} free"
        free /= 1024
    return "free space unknown"


def write_failed(path: Path, error: BaseException, after: str) -> OSError:
    """The one-line ``OSError`` of a failed write (disk full, quota, I/O error): the path, why, the free space and
    ``after`` (what is intact and how to go on)."""
    if isinstance(error, OSError) and error.strerror:
        reason = error.strerror
        path = Path(error.filename) if error.filename else path
    else:  # safetensors and torch.save report OS errors in their own exception types
        lines = [line for line in str(error).splitlines() if line.strip()]
        reason = lines[0] if lines else type(error).__name__
    return OSError(f"cannot write {path}: {reason} ({free_space(path)}); {after}")


def guarded_write(path: Path, write: Callable[[], object], after: Callable[[], str]):
    """Run ``write`` (which writes ``path``); any failure becomes :func:`write_failed`'s one line, ending with
    ``after()``."""
    try:
        return write()
    except Exception as e:  # OSError, SafetensorError, torch.save's RuntimeError: a write failed
        raise write_failed(path, e, after()) from None


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
    """Which of a run's files and folders ``out`` holds (an empty folder, or one holding only a run lock, does not
    count)."""
    return [n for n in names if (out / n).is_file()
            or ((out / n).is_dir() and any(p.name != LOCK_NAME for p in (out / n).iterdir()))]


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


def lock_run(out: Path, accelerator: Accelerator | PartialState, what: str = "run") -> RunLock:
    """Check ``out`` is writable and take its lock (:class:`~.lock.RunLock`) on the main process; a refusal is
    raised on every process. The caller releases it when the run ends."""
    check_writable(out)
    lock, refusal = RunLock(out, what), None
    if accelerator.is_main_process:
        try:
            note = lock.acquire()
        except RunLocked as e:
            refusal = str(e)
        else:
            if note:
                print(note, file=sys.stderr, flush=True)
    if accelerator.num_processes > 1:
        box = [refusal]
        broadcast_object_list(box)
        refusal = box[0]
    if refusal:
        lock.release()
        raise RunLocked(refusal)
    return lock


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


def foreign_fields(saved: dict, record: dict) -> list[str]:
    """The settings ``saved`` has and ``record`` does not: a configuration written by another command (an
    ``ats-train`` checkpoint resumed by ``vitbench-train`` has ``ats.*``)."""
    new = _flat(record)
    return sorted(k for k in _flat(saved) if k not in new and k not in RUN_ONLY_FIELDS | ENGINE_FIELDS)


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
    text = path.read_bytes().decode("utf-8", errors="replace") if path.is_file() else ""  # bad bytes: a bad line
    for line in text.splitlines():
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


def intact_note(root: Path) -> str:
    """Where a run stands after a failed write: its newest intact checkpoint, or that it has none."""
    found = next((p for p in reversed(_checkpoints(root)) if not checkpoint_problem(p)), None)  # hashes the newest
    if found:
        return f"the newest intact checkpoint is {found}; free space and continue with --resume auto"
    return "no checkpoint was written yet; free space and start again"


def save_checkpoint(accelerator: Accelerator, root: Path, progress: TrainProgress, keep: int,
                    record: dict) -> Path:
    """Write a checkpoint atomically: ``save_state`` into a temporary directory, then ``progress.json`` (position,
    the run's configuration and every file's size and SHA-256, taken before the rename), then a rename; older
    ones beyond ``keep`` are removed. A failed write removes the partial checkpoint and raises one line
    (:func:`write_failed`); the earlier checkpoints are left as they were."""
    final = root / f"step_{progress.num_updates:08d}"
    tmp = root / f".tmp_step_{progress.num_updates:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            files = {f.relative_to(tmp).as_posix(): {"bytes": f.stat().st_size, "sha256": sha256(f)}
                     for f in sorted(tmp.rglob("*")) if f.is_file()}
            write_json(tmp / "progress.json", {**progress.state_dict(), "config": record, "files": files})
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
    except Exception as e:  # OSError, SafetensorError, torch.save's RuntimeError: a write failed
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failed(tmp, e, intact_note(root)) from None
    if accelerator.is_main_process:
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
    notes: list[str] = field(default_factory=list)
    held: list[str] = field(default_factory=list)

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    @property
    def log(self) -> Path:
        return self.out / "log.jsonl"

    @classmethod
    def claim(cls, cfg: TrainConfig, accelerator: Accelerator, extra_config: dict | None = None) -> RunFolder:
        """One run, one folder; a resume continues exactly or is refused -- all before any expensive work, and
        nothing is removed here: ``--overwrite`` clears the folder in :meth:`start`, once every input loaded."""
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
        finished = [name for name in ("results.json", "model.safetensors") if name in held]
        if cfg.resume and not candidates and finished:
            raise FileExistsError(f"--resume {cfg.resume}: {out} holds a finished run or another command's results "
                                  f"({', '.join(held)}) and no checkpoint to continue from; start over with "
                                  "--overwrite or choose another --output-dir")
        if cfg.resume_override:
            check_override_names(cfg.resume_override, record)
        saved = {}
        if cfg.resume:  # the newest checkpoint's settings; a run stopped before its first checkpoint: config.json
            saved = (read_json(candidates[0] / "progress.json").get("config") if candidates else None) \
                or read_json(out / "config.json")
        run = cls(cfg, out, record, candidates, saved, notes, held)
        run.check_settings(out)
        return run

    def start(self) -> None:
        """The run is about to write: report skipped checkpoints and clear the folder for ``--overwrite`` (main
        process only; every input of the run has been loaded by now)."""
        for note in self.notes:
            print(note, file=sys.stderr, flush=True)
        if self.cfg.overwrite and self.held:
            remove_run_files(self.out, self.held)
            print(f"--overwrite: removed the earlier run's {', '.join(self.held)} from {self.out}", file=sys.stderr)
        if self.cfg.resume and not self.candidates:
            print(f"--resume auto: no checkpoint in {self.out} yet; starting the run", file=sys.stderr)

    def check_settings(self, where: str | Path, strict: bool = False) -> dict[str, list]:
        """The resume's check: the settings of :attr:`record` that differ from :attr:`saved` must be named by
        ``--resume-override`` (``ValueError`` otherwise, naming ``where``); returns the accepted changes. Without
        saved settings nothing is compared unless ``strict``."""
        if not (self.saved or strict):
            return {}
        foreign = foreign_fields(self.saved or {}, self.record)
        if foreign:
            raise ValueError(f"cannot resume {where}: it was written by another command (settings unknown here: "
                             f"{', '.join(foreign)}); resume it with that command, or start over with --overwrite")
        return accept_changes(config_changes(self.saved, self.record), self.cfg.resume_override, where)

    def load(self, accelerator: Accelerator, check: Callable[[], str | None] = lambda: None,
             ) -> tuple[Path | None, list[str]]:
        """Load the newest candidate checkpoint that loads and passes ``check`` (e.g. finite weights); one that
        does not is reported and the previous one is tried. Returns it (``None`` when starting) and the failures."""
        failures = []
        for path in self.candidates:  # newest first
            try:
                accelerator.load_state(str(path))
            except Exception as e:  # safetensors, pickle and shape errors have no common type
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                failures.append(f"{path.name}: {first}")
                continue
            problem = check()
            if problem:
                failures.append(f"{path.name}: {problem}")
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
