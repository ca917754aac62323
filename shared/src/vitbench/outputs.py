"""Outputs an evaluation owns, written all or nothing.

An evaluation writes into a hidden staging folder beside its ``--output-dir`` (:class:`StagedOutputs`); only when
every file is complete are they moved into place (``os.replace`` per file, with SIGINT/SIGTERM held back for those
few renames), and the files an earlier evaluation listed in its ``results.json`` that this one did not write are
removed then. A run that fails or is interrupted removes its staging folder and leaves the earlier results and
figures as they were.

Ownership (:func:`check_output_folder`, :func:`check_json_target`): an evaluation writes into a new or empty
folder or into an earlier evaluation's folder (its ``results.json`` in the evaluation schema), never into a training
run's folder, and its ``--json`` file never replaces a file that is not an earlier evaluation's result. The same rule
for the measuring commands (``vitbench-flops``, ``vitbench-throughput``, the benchmarks of ``vitbench.bench``):
:func:`check_own_json` lets their ``--json`` replace only an earlier output of the same command.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

# A training run's files (vitbench.engine): a folder holding any of them belongs to that run.
RUN_MARKERS = ("config.json", "log.jsonl", "model.safetensors", "checkpoints", "progress.json")
# Top-level keys of an evaluation's results.json (vitbench.evaluation.RESULT_SCHEMA).
RESULT_KEYS = frozenset({"config", "environment", "data", "rows"})
OWN_FILES = ("results.json", "results.md")
STAGING_PREFIX = ".eval-staging-"
MIN_FREE_MB = 2.0  # refused up front below this: the results and a few figures of the smallest evaluation
# Exit codes of an interrupted command: the shell's 128 + signal number.
EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}
# Write errors that mean "the disk cannot take the files", reported with the free space.
SPACE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class Interrupted(KeyboardInterrupt):
    """A command stopped by SIGINT (Ctrl-C) or SIGTERM; ``detail`` says what became of its outputs.
    ``vitbench.cli.run`` prints ``prog: interrupted (SIGNAL)<detail>`` and exits with :data:`EXIT_SIGNAL`."""

    def __init__(self, signal_name: str = "SIGINT", detail: str = ""):
        super().__init__(f"interrupted ({signal_name}){detail}")
        self.signal_name, self.detail = signal_name, detail
        self.code = EXIT_SIGNAL.get(signal_name, 130)


def free_mb(path: str | os.PathLike) -> float | None:
    """Free space (MB) of the file system holding ``path`` (its nearest existing parent); None when unknown."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free / 1e6
    except OSError:
        return None


def write_error(path: str | os.PathLike, e: OSError, detail: str = "") -> OSError:
    """``e`` (raised while writing ``path``) as one line naming the path, the reason and the free space."""
    free = free_mb(path)
    room = "" if free is None else f" ({free:.1f} MB free)" if free < 10 else f" ({free:.0f} MB free)"
    error = OSError(f"cannot write {path}: {e.strerror or e}{room}{detail}")
    error.errno = e.errno  # str(error) stays the one line (no "[Errno N]" prefix)
    return error


def read_result(path: Path) -> dict | None:
    """The parsed ``results.json`` of an earlier evaluation at ``path``; None when it is not one (another file,
    unreadable, or another command's JSON)."""
    data = read_json_or_none(path)
    return data if has_keys(*RESULT_KEYS)(data) else None


def run_files(folder: Path) -> list[str]:
    """The files of a training run present in ``folder``."""
    return [name for name in RUN_MARKERS if (folder / name).exists()]


def check_output_folder(folder: Path) -> None:
    """Refuse an ``--output-dir`` that holds a training run or a ``results.json`` of another kind (``ValueError``)."""
    found = run_files(folder)
    if found:
        raise ValueError(f"--output-dir {folder} holds a training run ({', '.join(found)}); an evaluation never "
                         "writes into it: give another --output-dir")
    name = next((n for n in OWN_FILES if (folder / n).exists()), None)
    if name is not None and read_result(folder / "results.json") is None:
        raise ValueError(f"--output-dir {folder} holds a {name} that no evaluation wrote; an evaluation never "
                         "replaces it: give another --output-dir")


def earlier_files(folder: Path) -> set[str]:
    """The names of the files an earlier evaluation in ``folder`` wrote (its results and the figures its
    ``results.json`` lists); empty without one."""
    previous = read_result(folder / "results.json") or {}
    listed = {Path(f).name for row in previous.get("rows", []) if isinstance(row, dict)
              for f in (row.get("figures") or {}).values() if isinstance(f, str)}
    return listed | set(OWN_FILES) if previous else set()


def check_figure_names(folder: Path, patterns: list[str]) -> None:
    """Refuse an ``--output-dir`` holding files named like this command's figures (``patterns``) that no earlier
    evaluation wrote there: the run would replace them (``ValueError``)."""
    owned = earlier_files(folder)
    foreign = sorted({p.name for pattern in patterns for p in folder.glob(pattern) if p.is_file()} - owned)
    if foreign:
        raise ValueError(f"--output-dir {folder} holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''} "
                         "that no evaluation wrote there; an evaluation never replaces it: give another --output-dir")


def check_json_target(path: Path, out_dir: Path) -> None:
    """Refuse a ``--json`` path that would replace another run's file: the output folder's own results, a file in a
    training run's folder, another evaluation folder's results, or any existing file that is no evaluation result."""
    if path.resolve() in {(out_dir / name).resolve() for name in OWN_FILES}:
        raise ValueError(f"--json {path} would replace the output folder's own {path.name}; give another path")
    if run_files(path.parent) and (path.exists() or path.name == "results.json"):
        raise ValueError(f"--json {path} is in a training run's folder ({', '.join(run_files(path.parent))}); "
                         "give a path outside it")
    if not path.exists():
        return
    if path.name in OWN_FILES and (path.parent / "results.md").exists():
        raise ValueError(f"--json {path} would replace another evaluation's {path.name} (its folder's results.md "
                         "would no longer match); give another path")
    if read_result(path) is None:
        raise ValueError(f"--json {path} exists and is not an evaluation's results; an evaluation never replaces "
                         "it: give another path")


def read_json_or_none(path: Path) -> object:
    """The parsed JSON at ``path``; None when it cannot be read or is not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # a decoding error is a ValueError
        return None


def has_keys(*keys: str) -> Callable[[object], bool]:
    """A test for :func:`check_own_json`: the JSON is an object holding every one of ``keys``."""
    return lambda data: isinstance(data, dict) and set(keys) <= set(data)


def check_own_json(path: str | os.PathLike, is_own: Callable[[object], bool], what: str = "--json") -> None:
    """Refuse (``ValueError``) a ``--json`` path holding a file that ``is_own`` does not recognise as an earlier output
    of the same command (another run's ``results.json``, an evaluation's, a non-JSON file); replacing the command's own
    earlier output is fine. Call it before the work; the output is then written once with
    :func:`vitbench.report.write_json` (a temporary file and an atomic rename)."""
    path = Path(path)
    if path.is_file() and not is_own(read_json_or_none(path)):
        raise ValueError(f"{what} {path} exists and is not an earlier result of this command; it is never replaced: "
                         "give another path")


def remove_dead_staging(parent: Path) -> None:
    """Remove staging folders of evaluations that died without cleaning up (killed with SIGKILL)."""
    for folder in parent.glob(f"{STAGING_PREFIX}*"):
        pid = folder.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def process_alive(pid: int) -> bool:
    """Whether a process with this PID is running (stale staging folders and run locks are those of dead ones)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM delivered only after the block (the few renames of a commit are never cut in half)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class StagedOutputs:
    """A staging folder beside ``out_dir`` that receives every file of the run; :meth:`commit` moves them in.

    Use as a context manager: leaving it by an exception (a full disk, Ctrl-C) removes the staging folder and the
    ``--json`` temporary, so the earlier files stay as they were and nothing partial is left."""

    def __init__(self, out_dir: Path, json_path: Path | None = None):
        self.out = Path(out_dir)
        self.json = Path(json_path) if json_path else None
        self.dir = self.out.parent / f"{STAGING_PREFIX}{self.out.name}-{os.getpid()}"
        self.json_tmp = None if self.json is None else self.json.with_name(f".{self.json.name}.{os.getpid()}.tmp")
        self.committed: list[Path] = []
        self.removed: list[str] = []

    def __enter__(self) -> StagedOutputs:
        self.out.mkdir(parents=True, exist_ok=True)
        free = free_mb(self.out)
        if free is not None and free < MIN_FREE_MB:
            raise OSError(f"cannot write {self.out}: {free:.1f} MB free, an evaluation writes about {MIN_FREE_MB:.0f} "
                          "MB or more (results and figures); free space or choose another --output-dir")
        try:
            remove_dead_staging(self.out.parent)
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir.mkdir()
        except PermissionError:  # a writable folder in a read-only parent: stage inside it (same file system)
            self.dir = self.out / self.dir.name
            remove_dead_staging(self.out)
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir.mkdir()
        return self

    def __exit__(self, kind, error, tb) -> None:
        self.cleanup()
        if isinstance(error, OSError) and error.errno in SPACE_ERRORS and "earlier results" not in str(error):
            where = error.filename or self.out
            raise write_error(where, error, f"; nothing was written, the earlier files in {self.out} are "
                                            "untouched") from None

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.json_tmp is not None:
            self.json_tmp.unlink(missing_ok=True)

    def final(self, path: str | os.PathLike) -> Path:
        """Where a file written into the staging folder ends up."""
        path = Path(path)
        return self.out / path.name if path.parent == self.dir else path

    def write_json_copy(self, text: str) -> None:
        """The ``--json`` file's content, written beside it now and renamed into place by :meth:`commit`."""
        if self.json is None or self.json_tmp is None:
            return
        self.json.parent.mkdir(parents=True, exist_ok=True)
        with open(self.json_tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def commit(self) -> list[Path]:
        """Move every staged file into the output folder (``results.json`` last), the ``--json`` file into place,
        then remove the files an earlier evaluation listed there that this run did not write. Returns the files
        now in place."""
        earlier = earlier_files(self.out)
        names = sorted(p.name for p in self.dir.iterdir())
        names.sort(key=lambda n: (n == "results.json", n == "results.md"))
        with signals_held():
            for name in names:
                os.replace(self.dir / name, self.out / name)
                self.committed.append(self.out / name)
            if self.json is not None and self.json_tmp is not None:
                os.replace(self.json_tmp, self.json)
                self.committed.append(self.json)
            for name in sorted(earlier - set(names) - set(OWN_FILES)):
                stale = self.out / name
                if stale.is_file():
                    stale.unlink()
                    self.removed.append(name)
        return self.committed
