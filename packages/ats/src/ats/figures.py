"""The paper's figures as PNG: kept-token histograms (Fig. 6), kept tokens on images (Figs. 2/7),
accuracy vs GFLOPs (Figs. 4/5)."""

from __future__ import annotations

from pathlib import Path
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


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
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def token_mask(kept: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``[H, W]`` bool map of the patch tokens among ``kept`` original indices (0 = CLS is ignored)."""
    mask = torch.zeros(grid[0] * grid[1], dtype=torch.bool)
    patches = kept[kept > 0] - 1
    mask[patches] = True
    return mask.view(*grid)


def kept_tokens(images: torch.Tensor, mean, std, kept: list[dict], stages: Sequence[int], grid: tuple[int, int],
                path: Path, boxes: torch.Tensor | None = None, indices: Sequence[int] = ()) -> Path:
    """Figs. 2/7: each image, then the tokens each ATS stage keeps (dropped patches greyed out)."""
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
    fig.tight_layout()
    return _save(fig, path)


def accuracy_vs_gflops(rows: list[dict], path: Path) -> Path:
    """Figs. 4/5: top-1 vs mean GFLOPs, one line per series, the dense model as a star."""
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    series: dict[str, list[dict]] = {}
    for row in rows:
        series.setdefault(row.get("series", row["name"]), []).append(row)
    for name, pts in series.items():
        pts = sorted(pts, key=lambda r: r["gflops"])
        style = dict(marker="*", markersize=12, linestyle="none") if name == "dense" else dict(marker="o")
        ax.plot([p["gflops"] for p in pts], [p["top1"] for p in pts], label=name, **style)
        paper = [p for p in pts if p.get("paper_top1") is not None and p.get("paper_gflops") is not None]
        if paper:
            ax.plot([p["paper_gflops"] for p in paper], [p["paper_top1"] for p in paper], marker="x",
                    linestyle="none", color="grey", label=f"paper: {name}")
    ax.set_xlabel("GFLOPs (mean per image)")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)
