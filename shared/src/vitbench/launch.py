"""Multi-process training on CPU: the launchers that start N processes, and the one that silently starts one.

``torchrun --standalone --nproc_per_node N -m ats.train --cpu ...`` (any ``*-train`` module) starts N processes
that train as one run (gloo). ``accelerate launch --cpu --num_processes N`` starts N CPU processes only through
``mpirun`` (``--mpirun_hostfile``); without it, Accelerate runs the script once, in one process, with
``MASTER_ADDR`` set for the N it was asked for. :func:`check_launch` refuses that case before any work, so a run never
silently uses fewer processes than asked.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

# The variables a launcher sets to the number of processes and to this process's rank (torchrun, Intel MPI / MPICH,
# Open MPI, MVAPICH).
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
RANK_VARIABLES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


def launched_world_size(env: Mapping[str, str] = os.environ) -> int:
    """The number of processes the launcher started (1 without a launcher)."""
    return next((int(env[v]) for v in WORLD_SIZE_VARIABLES if env.get(v, "").isdigit()), 1)


def is_main_process(env: Mapping[str, str] = os.environ) -> bool:
    """Whether this is rank 0 of the launch (or no launcher): the process that prints a run's summary."""
    return next((int(env[v]) for v in RANK_VARIABLES if env.get(v, "").isdigit()), 0) == 0


def main_print(*args, **kwargs) -> None:
    """``print`` on the main process only (every rank of a multi-process run reaches the end of a command)."""
    if is_main_process():
        print(*args, **kwargs)


def main_module() -> str:
    """The ``-m`` module this process runs (``ats.train``), ``MODULE`` when it was not started with ``-m``."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name if spec is not None and spec.name != "__main__" else "MODULE"


def check_launch(env: Mapping[str, str] = os.environ) -> None:
    """``ValueError`` in one line when ``accelerate launch --cpu --num_processes N`` (N > 1, no mpirun; also without
    ``--cpu`` on a machine without GPUs) started this single process: Accelerate's simple launcher sets
    ``ACCELERATE_USE_CPU`` always and ``MASTER_ADDR`` when asked for several processes."""
    accelerate_simple = "ACCELERATE_USE_CPU" in env  # set by Accelerate's single-process launcher, --cpu or not
    if accelerate_simple and "MASTER_ADDR" in env and launched_world_size(env) == 1:
        raise ValueError("accelerate launch --cpu --num_processes N started one process (Accelerate starts several "
                         "CPU processes only through mpirun); for N processes run: torchrun --standalone "
                         f"--nproc_per_node N -m {main_module()} --cpu ...")
