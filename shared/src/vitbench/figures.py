"""Figures every method draws the same way: accuracy vs GFLOPs from result rows (:mod:`vitbench.evaluation`)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save(fig, path: Path, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG (folders created) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def accuracy_vs_gflops(rows: list[dict], path: Path, title: str, unit: str = "image") -> Path:
    """Top-1 vs mean GFLOPs per ``unit`` (image, or clip for video): one curve per ``series``, each point labelled
    with its ``point`` (e.g. ``rho 0.87``), the dense model as a star (the paper's numbers are in the results table,
    not here: they are for another model and data set)."""
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    series: dict[str, list[dict]] = {}
    for row in rows:
        if row["top1"] is not None and row["gflops"] is not None:
            series.setdefault(row["series"], []).append(row)
    for name, pts in series.items():
        pts = sorted(pts, key=lambda r: r["gflops"])
        dense = all(p["method"] == "dense" for p in pts)
        style = dict(marker="*", markersize=12, linestyle="none", color="black") if dense else dict(marker="o")
        ax.plot([p["gflops"] for p in pts], [p["top1"] for p in pts], label=name, **style)
        for p in pts:
            if p["point"]:
                ax.annotate(p["point"], (p["gflops"], p["top1"]), textcoords="offset points", xytext=(4, 4),
                            fontsize=7)
    ax.set_xlabel(f"GFLOPs per {unit} (mean, 1 multiply-add = 1 FLOP)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return save(fig, path, dpi=120)
