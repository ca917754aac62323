"""Divergence: a non-finite loss, weights or outputs stop the run in one line, and non-finite weights are never saved.

The loop reads one small tensor per update (the update's losses and the largest absolute weight, where it already
read the loss for the progress bar), so the check costs no extra host sync. The largest absolute value (the inf-norm)
is exact for any finite weights, however large, and NaN or inf for any non-finite one.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.nn.utils import get_total_norm

from vitbench.models import first_non_finite


class Diverged(ValueError):
    """Training diverged (non-finite loss, weights or outputs); the message names the update and where to resume.
    A ``ValueError``, so the commands report it as one ``prog: error:`` line with exit code 2."""


def weights_max(model: torch.nn.Module) -> torch.Tensor:
    """The largest absolute value of the model's floating-point parameters (NaN/inf if any is non-finite), on the
    model's device; no host sync."""
    params = [p.detach() for p in model.parameters() if p.is_floating_point()]
    return get_total_norm(params, norm_type=math.inf) if params else torch.zeros(())


def first_nonfinite(model: torch.nn.Module) -> str | None:
    """The name of the first parameter or buffer holding a NaN or inf, or ``None`` (one host read per tensor: for
    messages and saves, not for every update)."""
    found = first_non_finite([*model.named_parameters(), *model.named_buffers()])
    return found and found[0]


def resume_hint(checkpoint: Path | None, lr: float, resumed_from: Path | None, resumed_at: int, updates: int) -> str:
    """How to go on after a divergence at update ``updates``: the newest intact checkpoint and a lower learning rate
    (a run resumed from ``resumed_from`` at update ``resumed_at`` that diverged at once says so)."""
    lower = f"{lr / 10:g}"
    if checkpoint is None:
        return f"no checkpoint was written yet; start over with a lower learning rate (e.g. --lr {lower} --overwrite)"
    first = (f"the first update after resuming from {resumed_from}; "
             if resumed_from is not None and checkpoint == resumed_from and updates == resumed_at + 1 else "")
    return (f"{first}the newest intact checkpoint is {checkpoint}: continue from it with a lower learning rate, e.g. "
            f"--resume auto --lr {lower} --resume-override lr")


def diverged(what: str, epoch: int, updates: int, hint: str) -> Diverged:
    return Diverged(f"training diverged at update {updates} (epoch {epoch}): {what}; {hint}")
