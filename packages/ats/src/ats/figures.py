"""The paper's figures as PNG: kept-token histograms (Fig. 6) and kept tokens on images (Figs. 2/7); the
accuracy-vs-GFLOPs sweep (Figs. 4/5) is :func:`vitbench.figures.accuracy_vs_gflops`."""

from __future__ import annotations

from pathlib import Path
from collections.abc import Sequence

import torch
from vitbench.figures import save  # sets the Agg backend before pyplot is imported

import matplotlib.pyplot as plt


def token_histograms(counts: torch.Tensor, stages: Sequence[int], path: Path, title: str) -> Path:
    """Fig. 6: per ATS stage, the histogram over images of the number of tokens it keeps (CLS included), drawn
    as one heat map (a row per stage, a column per token count, colour = share of the images)."""
    values = counts[:, list(stages)].long()
    lo, hi = int(values.min()), int(values.max())
    hist = torch.stack([torch.bincount(v - lo, minlength=hi - lo + 1) for v in values.T]).double()
    hist = 100.0 * hist / len(values)
    fig, ax = plt.subplots(figsize=(7.0, 0.35 * len(stages) + 1.6))
    im = ax.imshow(hist.numpy(), aspect="auto", cmap="viridis", interpolation="nearest",
                   extent=(lo - 0.5, hi + 0.5, len(stages) - 0.5, -0.5))
    ax.set_yticks(range(len(stages)), [f"block {b}" for b in stages], fontsize=8)
    ax.set_xlabel("tokens kept (CLS included)", fontsize=8)
    mean = values.double().mean(0)
    ax.plot(mean.numpy(), range(len(stages)), "w.", markersize=5, label="mean")
    ax.legend(loc="lower right", fontsize=7)
    fig.colorbar(im, ax=ax, label="% of images", pad=0.02)
    ax.set_title(f"{title}\nper ATS block: images by number of tokens kept", fontsize=9)
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
    the block counts the kept tokens, CLS included; red: the ground-truth digit box). The panels are tiled into
    one picture, so the figure draws a single image."""
    mean = torch.tensor(mean)[:, None, None]
    std = torch.tensor(std)[:, None, None]
    shown = [stages[0], *stages[1:-1:2], stages[-1]] if len(stages) > 5 else list(stages)
    H, W = images.shape[-2:]
    gap_x, gap_y = W // 8, H // 4  # white space between panels, room for each panel's caption
    rows, cols = len(images), len(shown) + 1
    canvas = torch.ones(rows * (H + gap_y), cols * (W + gap_x) - gap_x, 3)
    fig, ax = plt.subplots(figsize=(1.5 * cols, 1.6 * rows + 0.5))
    for r, image in enumerate(images):
        rgb = (image * std + mean).clamp(0, 1).permute(1, 2, 0)
        top = r * (H + gap_y) + gap_y
        for c, block in enumerate([None, *shown]):
            left = c * (W + gap_x)
            panel = rgb.clone()
            if block is not None:
                mask = token_mask(kept[r][block], grid)
                up = mask.repeat_interleave(H // grid[0], 0).repeat_interleave(W // grid[1], 1)
                panel[~up] = 0.85 + 0.15 * panel[~up]
                caption = f"block {block}: {int(mask.sum()) + 1}"
            else:
                caption = f"image {indices[r]}" if len(indices) else "image"
            canvas[top:top + H, left:left + W] = panel
            ax.text(left + W / 2, top - 2, caption, ha="center", va="bottom", fontsize=7)
            if boxes is not None:
                x0, y0, x1, y1 = boxes[r].tolist()
                ax.add_patch(plt.Rectangle((left + x0, top + y0), x1 - x0, y1 - y0, fill=False, color="red",
                                           lw=0.8))
    ax.imshow(canvas.numpy(), interpolation="nearest")
    ax.axis("off")
    ax.set_title(f"{title}\nkept tokens per ATS block (greyed: dropped)", fontsize=8)
    return save(fig, path)
