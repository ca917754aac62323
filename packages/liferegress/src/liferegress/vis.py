"""Life maps (Fig. 4): predicted lives on the patch grid and the patches kept at each drop layer."""

from __future__ import annotations

from pathlib import Path

import torch


def plot_life_maps(
    images: torch.Tensor,
    lives: torch.Tensor,
    kept: tuple[torch.Tensor, ...],
    grid: tuple[int, int],
    t_base: int,
    depth: int,
    drop_layers: tuple[int, ...],
    path: str | Path,
    titles: list[str] | None = None,
    title: str = "",
) -> Path:
    """One row per image: the input, its lives (clamped to [t_base, T] for display only, values in the cells) and,
    per drop layer, the input with the dropped patches darkened. ``images`` (B, 3, H, W) in [0, 1]; ``lives``
    (B, 1 + gh*gw); ``kept`` original token indices per drop layer."""
    # matplotlib (also behind vitbench.figures) only when a figure is drawn: importing liferegress needs no plotting
    from vitbench.figures import save

    import matplotlib.pyplot as plt

    gh, gw = grid
    b = images.shape[0]
    cols = 2 + len(kept)
    # the life panel is drawn 2.5x as wide as the others, so that its per-cell numbers are legible at normal size
    fig, axes = plt.subplots(b, cols, figsize=(2.2 * (cols + 1.5), 4.2 * b), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 2.5] + [1] * len(kept)})
    h, w = images.shape[-2:]
    ph, pw = h // gh, w // gw
    for i in range(b):
        img = images[i].permute(1, 2, 0).clamp(0, 1).cpu().numpy()
        axes[i, 0].imshow(img)
        axes[i, 0].set_title(titles[i] if titles else "input", fontsize=8)
        life = lives[i, 1:].clamp(t_base, depth).reshape(gh, gw).cpu()
        levels = depth - t_base + 1  # one colour per whole block
        shown = axes[i, 1].imshow(life.numpy(), cmap=plt.get_cmap("viridis", levels), vmin=t_base - 0.5,
                                  vmax=depth + 0.5)
        bar = fig.colorbar(shown, ax=axes[i, 1], fraction=0.046, pad=0.04, label="predicted life (block)")
        bar.set_ticks(range(t_base, depth + 1))
        axes[i, 1].set_title(f"life (clamped {t_base}-{depth})", fontsize=8)
        if gh * gw <= 256:
            for r in range(gh):
                for c in range(gw):
                    v = life[r, c].item()
                    axes[i, 1].text(c, r, f"{v:.0f}", ha="center", va="center", fontsize=7 if gw <= 14 else 5,
                                    color="black" if v > (t_base + depth) / 2 else "white")
        for k, (idx, layer) in enumerate(zip(kept, drop_layers)):
            mask = torch.zeros(gh * gw)
            patches = idx[i][idx[i] > 0] - 1
            mask[patches.cpu()] = 1.0
            shade = mask.reshape(gh, gw).repeat_interleave(ph, 0).repeat_interleave(pw, 1)
            shade = (0.25 + 0.75 * shade).numpy()[..., None]
            axes[i, 2 + k].imshow(img[: gh * ph, : gw * pw] * shade)
            axes[i, 2 + k].set_title(f"kept from block {layer}: {len(patches)} patches", fontsize=8)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{title}\nlife = the block after which a patch is dropped; darkened: patches dropped by then",
                 fontsize=8)
    fig.tight_layout()
    return save(fig, Path(path), dpi=150)
