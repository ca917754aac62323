"""One process per run folder: an OS file lock (``fcntl.flock``) on ``OUTPUT_DIR/.lock`` held for the run's lifetime.

The kernel releases the lock when its process ends in any way (return, exception, ``kill -9``), so a lock can never
outlive its owner. The file records the owner's PID for the refusal message; a clean exit empties it, so a PID left
in a file that is not locked is a process that died holding it (a stale lock, reported and taken over).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from vitbench.outputs import process_alive

LOCK_NAME = ".lock"


class RunLocked(OSError):
    """Another live process holds the run folder's lock."""


class RunLock:
    """The lock of one run folder; :meth:`acquire` refuses (``RunLocked``) while another process holds it."""

    def __init__(self, folder: str | Path, what: str = "run"):
        self.path = Path(folder) / LOCK_NAME
        self.what = what
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a stale lock of a dead process was taken over."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLocked(f"{self.path.parent} is in use by another {self.what} (PID {owner}, lock file "
                            f"{self.path}); wait for it to end or choose another --output-dir") from None
        previous = os.pread(fd, 64, 0).decode(errors="replace").strip()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        if previous.isdigit() and int(previous) != os.getpid() and not process_alive(int(previous)):
            return f"{self.path}: stale lock of PID {previous} (no longer running) taken over"
        return None

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)  # a clean exit: no stale PID left behind
        os.close(self.fd)  # closing the descriptor releases the flock
        self.fd = None
