"""LF-ViT training objective (Eq. 12) and the CE + CE variant of Table 7."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LOSS_VARIANTS = ("ce_kl", "ce_ce")


def lfvit_loss(z_location: torch.Tensor, z_focus: torch.Tensor, targets: torch.Tensor,
               criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               variant: str = "ce_kl") -> torch.Tensor:
    """Eq. 12: ``CE(z_f, y) + KL(softmax(z_f).detach() || softmax(z_l))`` (batchmean), as released.

    ``criterion`` is the supervised loss on (possibly soft, mixup) targets. ``variant="ce_ce"`` replaces the
    KL term by ``criterion(z_l, y)`` (Eq. 13, Table 7).
    """
    if variant not in LOSS_VARIANTS:
        raise ValueError(f"unknown loss variant {variant!r}; choose from {LOSS_VARIANTS}")
    loss = criterion(z_focus, targets)
    if variant == "ce_ce":
        return loss + criterion(z_location, targets)
    teacher = F.softmax(z_focus.detach().float(), dim=-1)
    return loss + F.kl_div(F.log_softmax(z_location.float(), dim=-1), teacher, reduction="batchmean")
