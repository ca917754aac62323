"""Evaluation inside training: top-1/top-5 over a loader, the ranks' agreement, and the decode-error line."""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate import Accelerator
from timm.utils import accuracy
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data import preserved_rng


def evaluate_classifier(model, loader: DataLoader, accelerator: Accelerator | None = None,
                        forward: Callable | None = None, progress: bool = True) -> dict:
    """Top-1/top-5 (percent) over a loader; under Accelerate, the loader must be prepared (gather_for_metrics).
    Leaves the random states alone, so evaluating inside a training run does not change its course. ``nonfinite``
    counts the inputs whose logits hold a NaN or inf (their accuracy means nothing)."""
    device = accelerator.device if accelerator else next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct1 = correct5 = total = 0.0
    nonfinite = 0
    main = accelerator is None or accelerator.is_main_process
    with torch.inference_mode(), preserved_rng():
        for images, labels, _ in tqdm(loader, desc="eval", disable=not (progress and main), leave=False):
            images, labels = images.to(device), labels.to(device)
            logits = forward(model, images) if forward else model(images)
            if accelerator is not None:
                logits, labels = accelerator.gather_for_metrics((logits, labels))
            nonfinite += int((~torch.isfinite(logits.float())).flatten(1).any(1).sum())  # top1.item() syncs anyway
            top1, top5 = accuracy(logits.float(), labels, topk=(1, min(5, logits.shape[-1])))
            correct1 += top1.item() * len(labels) / 100
            correct5 += top5.item() * len(labels) / 100
            total += len(labels)
    model.train(was_training)
    return {"top1": 100 * correct1 / max(total, 1), "top5": 100 * correct5 / max(total, 1), "n": int(total),
            "nonfinite": nonfinite}


def ranks_in_sync(accelerator: Accelerator, model: torch.nn.Module) -> bool:
    """Whether every process holds the same weights (compares per-tensor float64 sums and sums of squares)."""
    params = [p.detach().double() for p in model.parameters()]
    signature = torch.stack([torch.stack([p.sum(), (p * p).sum()]) for p in params]).flatten()
    gathered = accelerator.gather(signature.unsqueeze(0).to(accelerator.device))
    return bool((gathered == gathered[0]).all().item())


def decode_message(e: Exception) -> str:
    """The 'cannot decode image/video ...' line of an error, also when a DataLoader worker wrapped it in a
    traceback."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for line in reversed(lines):
        if "cannot decode " in line:
            return line[line.index("cannot decode "):]
    return lines[0] if lines else type(e).__name__
