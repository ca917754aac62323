"""The paper's figures as PNG: kept-token histograms (Fig. 6) and kept tokens on images (Figs. 2/7); the
accuracy-vs-GFLOPs sweep (Figs. 4/5) is :func:`vitbench.figures.accuracy_vs_gflops`."""

from __future__ import annotations

from pathlib import Path
from collections.abc import Sequence

import torch
from vitbench.figures import save  # sets the Agg backend before pyplot is imported

import matplotlib.pyplot as plt


def token_histograms(counts: torch.Tensor, stages: Sequence[int], path: Path, title: str) -> Path:
    """Fig. 6: per ATS stage, the histogram over images of the number of tokens it keeps (CLS included)."""
    cols = min(len(stages), 3)
    rows = -(-len(stages) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, block in zip(axes.flat, stages):
        values = counts[:, block].numpy()
        ax.hist(values, bins=min(30, max(1, int(values.max() - values.min()) + 1)), color="tab:blue")
        ax.set_title(f"block {block}", fontsize=9)
        ax.set_xlabel("tokens kept", fontsize=8)
        ax.set_ylabel("images", fontsize=8)
    for ax in list(axes.flat)[len(stages):]:
        ax.axis("off")
    fig.suptitle(f"{title}\nper ATS block: images by number of tokens kept (CLS included)", fontsize=9)
    fig.tight_layout()
    return save(fig, path)


def token_mask(kept: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``[H, W]`` bool map of the patch tokens among ``kept`` original indices (0 = CLS is ignored)."""
    mask = torch.zeros(grid[0] * grid[1], dtype=torch.bool)
    patches = kept[kept > 0] - 1
    mask[patches] = True
    return mask.view(*grid)


def kept_tokens(images: torch.Tensor, mean, std, kept: list[dict], stages: Sequence[int], grid: tuple[int, int],
                path: Path, boxes: torch.Tensor | None = None, indices: Sequence[int] = (), title: str = "") -> Path:
    """Figs. 2/7: each image, then the tokens each ATS stage keeps (dropped patches greyed out; the number after
    the block counts the kept tokens, CLS included; red: the ground-truth digit box)."""
    mean = torch.tensor(mean)[:, None, None]
    std = torch.tensor(std)[:, None, None]
    shown = [stages[0], *stages[1:-1:2], stages[-1]] if len(stages) > 5 else list(stages)
    fig, axes = plt.subplots(len(images), len(shown) + 1, figsize=(1.8 * (len(shown) + 1), 1.9 * len(images)),
                             squeeze=False)
    for r, image in enumerate(images):
        rgb = (image * std + mean).clamp(0, 1).permute(1, 2, 0)
        H, W = rgb.shape[:2]
        for c, block in enumerate([None, *shown]):
            ax = axes[r, c]
            shown_img = rgb.clone()
            if block is not None:
                mask = token_mask(kept[r][block], grid)
                up = mask.repeat_interleave(H // grid[0], 0).repeat_interleave(W // grid[1], 1)
                shown_img[~up] = 0.85 * torch.ones(3) + 0.15 * shown_img[~up]
                ax.set_title(f"block {block}: {int(mask.sum()) + 1}", fontsize=8)
            else:
                ax.set_title(f"image {indices[r]}" if len(indices) else "image", fontsize=8)
            ax.imshow(shown_img.numpy())
            if boxes is not None:
                x0, y0, x1, y1 = boxes[r].tolist()
                ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="red", lw=0.8))
            ax.axis("off")
    fig.suptitle(f"{title}\nkept tokens per ATS block (greyed: dropped)", fontsize=8)
    fig.tight_layout()
    return save(fig, path)
