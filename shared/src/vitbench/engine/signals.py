"""Preemption: SIGTERM / SIGUSR1 finish the current update, write a checkpoint and exit with
:data:`EXIT_PREEMPTED`."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import Accelerator

from .runs import TrainProgress, append_log

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 at a checkpoint; rerun with --resume auto


class Preempted(SystemExit):
    """SIGTERM / SIGUSR1 stopped the run after its checkpoint was written; exits with :data:`EXIT_PREEMPTED`."""

    def __init__(self, signal_name: str, checkpoint: Path):
        super().__init__(EXIT_PREEMPTED)
        self.signal_name, self.checkpoint = signal_name, checkpoint


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
              f"--resume auto (exit code {EXIT_PREEMPTED})", file=sys.stderr, flush=True)
    accelerator.wait_for_everyone()
    raise Preempted(name, checkpoint)
