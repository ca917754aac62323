"""Focus stage: coarse -> fine index mapping, feature fusion and focus-sequence assembly (pure functions)."""

from __future__ import annotations

import torch


def coarse_to_fine_index(cells: torch.Tensor, grid: int) -> torch.Tensor:
    """Fine-grid (2g x 2g) indices of the 2 x 2 children of coarse cells (B, K) -> (B, 4K).

    Cell (r, c) has children 2r*2g + 2c, +1, +2g, +2g+1. The order is the released one: all top-left
    children, then all top-right, bottom-left, bottom-right.
    """
    r, c = cells // grid, cells % grid
    top_left = 2 * r * (2 * grid) + 2 * c
    return torch.cat((top_left, top_left + 1, top_left + 2 * grid, top_left + 2 * grid + 1), dim=1)


def fine_to_coarse_index(fine: torch.Tensor, grid: int) -> torch.Tensor:
    """Parent coarse cell of fine-grid indices (inverse of :func:`coarse_to_fine_index`)."""
    return (fine // (2 * grid) // 2) * grid + (fine % (2 * grid)) // 2


def upsample_tokens(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """Nearest x2 upsampling of a g x g token map (B, g^2, D) -> (B, 4g^2, D), Eq. 11's Upsample."""
    b, n, d = tokens.shape
    t = tokens.reshape(b, grid, 1, grid, 1, d).expand(b, grid, 2, grid, 2, d)
    return t.reshape(b, 4 * n, d)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per-image token gather: x (B, N, D), index (B, K) -> (B, K, D)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def focus_sequence(cls_token: torch.Tensor, fine_patches: torch.Tensor, reuse: torch.Tensor,
                   fine_pos: torch.Tensor, coarse_embeddings: torch.Tensor, cells: torch.Tensor,
                   reused_cells: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Focus-stage input sequence ``[cls; 4K fine tokens; g^2 - K reused coarse tokens]``.

    Args:
        cls_token: (B, 1, D) focus CLS (fresh ``cls_token`` plus the fine table's CLS position).
        fine_patches: (B, 4g^2, D) full-resolution patch embeddings.
        reuse: (B, g^2, D) fusion features ``MLP(LN(Z_L))`` of the coarse output tokens; each fine token
            receives its parent's feature (the nearest x2 upsampling of Eq. 11, gathered rather than formed).
        fine_pos: (1, 4g^2, D) fine positional table without its CLS entry.
        coarse_embeddings: (B, g^2, D) the localization stage's *input* patch embeddings (with coarse
            positions), reused for every cell not sent to the focus stage.
        cells, reused_cells: outputs of :func:`lfvit.localization.select_cells`.
    Returns:
        (sequence (B, 1 + 4K + g^2 - K, D), fine indices (B, 4K)).
    """
    fine_idx = coarse_to_fine_index(cells, grid)
    parents = cells.repeat(1, 4)
    fine = gather_tokens(fine_patches, fine_idx) + gather_tokens(reuse, parents) + fine_pos[0, fine_idx]
    coarse = gather_tokens(coarse_embeddings, reused_cells)
    return torch.cat((cls_token, fine, coarse), dim=1), fine_idx


def focus_sequence_length(grid: int, num_cells: int) -> int:
    """1 + 4K + (g^2 - K) tokens (116 for g 7, K 22)."""
    return 1 + 4 * num_cells + grid * grid - num_cells
