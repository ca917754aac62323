"""Preemption: SIGTERM / SIGUSR1 finish the current update, write a checkpoint and exit with
:data:`EXIT_PREEMPTED`; Ctrl-C (SIGINT) does the same and exits with :data:`EXIT_INTERRUPTED`. A second Ctrl-C
aborts at once (Python's ``KeyboardInterrupt``), without a new checkpoint."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import Accelerator

from .runs import TrainProgress, append_log

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 at a checkpoint; rerun with --resume auto
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C: stopped at a checkpoint; rerun with --resume auto


def exit_code(signal_name: str) -> int:
    return EXIT_INTERRUPTED if signal_name == "SIGINT" else EXIT_PREEMPTED


class Preempted(SystemExit):
    """SIGTERM / SIGUSR1 / SIGINT stopped the run after its checkpoint was written; exits with
    :data:`EXIT_PREEMPTED` (:data:`EXIT_INTERRUPTED` for SIGINT)."""

    def __init__(self, signal_name: str, checkpoint: Path):
        super().__init__(exit_code(signal_name))
        self.signal_name, self.checkpoint = signal_name, checkpoint


@contextlib.contextmanager
def stop_signals() -> Iterator[list[str]]:
    """While the block runs, SIGTERM and SIGUSR1 (what cluster schedulers send before a kill) and SIGINT (Ctrl-C)
    are collected by name instead of ending the process; the training loop checks the list after every update. The
    first SIGINT puts Python's own handler back, so a second one aborts. DataLoader workers forked inside the block
    inherit the handler and ignore the signals (a terminal's Ctrl-C reaches every process of the group), so the
    main process alone decides where the run stops."""
    received: list[str] = []
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield received
        return

    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:  # a DataLoader worker forked inside the block: Ctrl-C reaches the whole group
            return
        received.append(signal.Signals(signum).name)
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, previous[signal.SIGINT])
            print("interrupted: stopping after this update with a checkpoint (Ctrl-C again aborts without one)",
                  file=sys.stderr, flush=True)

    wanted = [signal.SIGTERM, signal.SIGINT] + ([signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else [])
    previous = {s: signal.signal(s, handler) for s in wanted}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def stop_requested(accelerator: Accelerator, received: list[str]) -> bool:
    """Whether any process received a stop signal (all processes agree, so they stop at the same update)."""
    if accelerator.num_processes == 1:
        return bool(received)
    flag = torch.tensor(float(bool(received)), device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item())


def preempted(accelerator: Accelerator, log_path: Path, received: list[str], checkpoint: Path,
              progress: TrainProgress, epoch: int):
    """Log and report the stop at ``checkpoint``, then raise :class:`Preempted` on every process."""
    name = received[0] if received else "a stop signal on another process"
    if accelerator.is_main_process:
        append_log(log_path, {"event": "preempted", "signal": name, "epoch": epoch, "updates": progress.num_updates,
                              "checkpoint": str(checkpoint)})
        print(f"stopped by {name} at update {progress.num_updates}: checkpoint {checkpoint}; continue with "
              f"--resume auto (exit code {exit_code(name)})", file=sys.stderr, flush=True)
    accelerator.wait_for_everyone()
    raise Preempted(name, checkpoint)
