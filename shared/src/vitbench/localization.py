"""Localization against ground-truth boxes: the share of chosen patch tokens that lie on the object.

A patch counts as on the object when its centre lies in the box. Token indices are the papers' original
indices (0 = CLS, 1 + row * W + col); negative entries are padding. The random baseline is the same share over
all patches, i.e. the expected share for tokens drawn uniformly at random.
"""

from __future__ import annotations

import torch


def on_box(indices: torch.Tensor, boxes: torch.Tensor, grid: tuple[int, int], img_size: int) -> torch.Tensor:
    """``[B, K]`` bool: whether each patch token's centre lies in its image's box (``[B, 4]`` ``x0, y0, x1, y1`` in
    input pixels). CLS and padding entries are False."""
    gh, gw = grid
    patch = indices - 1
    cy = torch.div(patch, gw, rounding_mode="floor").float().add(0.5) * (img_size / gh)
    cx = (patch % gw).float().add(0.5) * (img_size / gw)
    x0, y0, x1, y1 = (boxes[:, i : i + 1].to(cx) for i in range(4))
    return (patch >= 0) & (cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1)


def on_box_share(indices: torch.Tensor, boxes: torch.Tensor, grid: tuple[int, int], img_size: int) -> torch.Tensor:
    """``[B]``: share of each image's patch tokens (CLS and padding excluded) that lie on the box."""
    valid = (indices > 0).sum(1).clamp(min=1)
    return on_box(indices, boxes, grid, img_size).sum(1) / valid


def random_share(boxes: torch.Tensor, grid: tuple[int, int], img_size: int) -> torch.Tensor:
    """``[B]``: the share for uniformly random patch tokens (the box's share of all patches)."""
    every = torch.arange(1, grid[0] * grid[1] + 1).expand(boxes.shape[0], -1)
    return on_box_share(every, boxes, grid, img_size)
