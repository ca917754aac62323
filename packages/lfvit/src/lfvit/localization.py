"""Localization stage: global class attention (GCA), NGCA windows and class-discriminative cells.

Pure tensor functions (no modules). Grids are square, ``g x g`` coarse cells in raster order; a window is
given by its top-left cell ``(row, col)`` and has side ``m``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

REGION_MODES = ("ngca", "negative_ngca", "max_gca", "min_gca", "random")


def cls_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Head-mean class attention ``a_cls`` (Eq. 2, CLS query row) from ``q, k`` of shape (B, H, N, d).

    Only the CLS row ``softmax(q_cls k^T * scale)`` is computed, so the full N x N map is never formed.
    Returns (B, N) including the CLS column.
    """
    row = (q[:, :, :1] * scale) @ k.transpose(-2, -1)
    return row.softmax(dim=-1).mean(dim=1)[:, 0]


def global_class_attention(cls_rows: Sequence[torch.Tensor], beta: float) -> torch.Tensor:
    """Global class attention, Eq. 8: ``a_bar_l = beta * a_bar_{l-1} + (1 - beta) * a_l`` starting from 0.

    ``cls_rows`` are the per-block class-attention rows (B, N) of the blocks taking part (3..11 as released);
    the moving average commutes with the head mean, so head-mean rows give the released GCA exactly.
    Returns the patch part (B, N - 1), CLS column dropped.
    """
    if not cls_rows:
        raise ValueError("global_class_attention needs at least one block's class attention")
    gca = torch.zeros_like(cls_rows[0])
    for row in cls_rows:
        gca = beta * gca + (1.0 - beta) * row
    return gca[:, 1:]


def num_focus_cells(region_size: int, alpha: float) -> int:
    """K = ceil(m * m * alpha), the number of coarse cells of the window sent to the focus stage."""
    return int(math.ceil(region_size * region_size * alpha))


def ngca_scores(gca: torch.Tensor, region_size: int) -> torch.Tensor:
    """Neighbourhood GCA, Eq. 9: sum of GCA over every stride-1 m x m window.

    gca: (B, g*g) in raster order. Returns (B, g-m+1, g-m+1); entry (i, j) is the window with top-left (i, j).
    """
    g = grid_side(gca.shape[-1])
    check_region_size(region_size, g)
    grid = gca.reshape(-1, 1, g, g)
    return F.avg_pool2d(grid, region_size, stride=1, divisor_override=1)[:, 0]


def select_window(gca: torch.Tensor, region_size: int, mode: str = "ngca",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Top-left cell (row, col) of the class-discriminative region per image, shape (B, 2).

    ``ngca`` is Eq. 10 (argmax of the NGCA, first index on ties). Table 6 variants: ``negative_ngca`` (argmin
    NGCA); ``max_gca`` / ``min_gca`` (the window centred on the cell of largest / smallest GCA, shifted to lie
    inside the grid); ``random`` (uniform over the (g-m+1)^2 windows, drawn from ``generator``).
    """
    if mode not in REGION_MODES:
        raise ValueError(f"unknown region mode {mode!r}; choose from {REGION_MODES}")
    g = grid_side(gca.shape[-1])
    check_region_size(region_size, g)
    span = g - region_size + 1
    if mode in ("ngca", "negative_ngca"):
        scores = ngca_scores(gca, region_size).flatten(1)
        flat = scores.argmax(dim=1) if mode == "ngca" else scores.argmin(dim=1)
        return torch.stack((flat // span, flat % span), dim=1)
    if mode == "random":
        flat = torch.randint(span * span, (gca.shape[0],), generator=generator,
                             device="cpu").to(gca.device)
        return torch.stack((flat // span, flat % span), dim=1)
    cell = gca.argmax(dim=1) if mode == "max_gca" else gca.argmin(dim=1)
    centre = torch.stack((cell // g, cell % g), dim=1)
    return (centre - region_size // 2).clamp(0, g - region_size)


def window_cells(window: torch.Tensor, region_size: int, grid: int) -> torch.Tensor:
    """Raster indices (B, m*m) of the coarse cells inside each window (top-left ``window``, (B, 2))."""
    offs = torch.arange(region_size, device=window.device)
    rows = window[:, :1, None] + offs[None, :, None]
    cols = window[:, 1:, None] + offs[None, None, :]
    return (rows * grid + cols).flatten(1)


def select_cells(gca: torch.Tensor, window: torch.Tensor, region_size: int,
                 alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the coarse cells into the K = ceil(alpha m^2) focus cells and the g^2 - K reused ones.

    The m^2 window cells are sorted by their own GCA (descending) and the first K kept (paper: "top-K most
    informative tokens" of the region). Returns ``(kept (B, K), reused (B, g^2 - K))``; ``kept`` is in
    descending GCA order, ``reused`` lists the cells outside the window in raster order followed by the
    unselected window cells in descending GCA order (the released order up to a permutation of the outside
    cells, which cannot change any output: the blocks are permutation-equivariant).
    """
    b, n = gca.shape
    g = grid_side(n)
    k = num_focus_cells(region_size, alpha)
    if not 1 <= k <= region_size * region_size:
        raise ValueError(f"alpha={alpha} gives K={k}; need 1 <= K <= m*m={region_size * region_size}")
    inside = window_cells(window, region_size, g)
    order = gca.gather(1, inside).argsort(dim=1, descending=True, stable=True)
    ranked = inside.gather(1, order)
    mask = torch.ones(b, n, dtype=torch.bool, device=gca.device)
    mask.scatter_(1, inside, False)
    # raster order of the cells outside the window, from a stable sort (nonzero would need a host sync)
    outside = mask.byte().argsort(dim=1, descending=True, stable=True)[:, : n - region_size * region_size]
    return ranked[:, :k], torch.cat((outside, ranked[:, k:]), dim=1)


def grid_side(num_cells: int) -> int:
    """Side g of a square g x g grid with ``num_cells`` cells."""
    g = round(num_cells**0.5)  # not math.isqrt: a compiled focus stage with dynamic shapes passes a SymInt
    if g * g != num_cells:
        raise ValueError(f"{num_cells} cells do not form a square grid")
    return g


def check_region_size(region_size: int, grid: int) -> None:
    """Reject window sizes outside 1..g."""
    if not 1 <= region_size <= grid:
        raise ValueError(f"region size m={region_size} must satisfy 1 <= m <= g={grid}")
