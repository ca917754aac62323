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


MIN_TOP1_SPAN = 2.0  # percentage points: a few images' difference must not fill the whole axis
LABEL_OFFSETS = ((4, 4), (4, -10), (4, 14), (4, -20), (-40, 4), (-40, -10))  # points, tried in turn


def label_offsets(points: list[tuple[float, float]], spans: tuple[float, float], near: float = 0.05
                  ) -> list[tuple[int, int]]:
    """An offset (in points) for the label of each ``(x, y)``: the first of :data:`LABEL_OFFSETS` that no earlier label
    within ``near`` of the axes (``spans`` = the x and y ranges) uses, so labels of coinciding points do not overlap."""
    placed: list[tuple[float, float, tuple[int, int]]] = []
    out = []
    for x, y in points:
        taken = {o for px, py, o in placed if abs(px - x) <= near * spans[0] and abs(py - y) <= near * spans[1]}
        offset = next((o for o in LABEL_OFFSETS if o not in taken), LABEL_OFFSETS[len(taken) % len(LABEL_OFFSETS)])
        placed.append((x, y, offset))
        out.append(offset)
    return out


def widen(lo: float, hi: float, span: float) -> tuple[float, float]:
    """``(lo, hi)`` widened about its centre to at least ``span``."""
    if hi - lo >= span:
        return lo, hi
    mid = (lo + hi) / 2
    return mid - span / 2, mid + span / 2


def accuracy_vs_gflops(rows: list[dict], path: Path, title: str, unit: str = "image") -> Path:
    """Top-1 vs mean GFLOPs per ``unit`` (image, or clip for video): one curve per ``series``, each point labelled
    with its ``point`` (e.g. ``rho 0.87``; labels of coinciding points moved apart), the dense model as a star (the
    paper's numbers are in the results table, not here: they are for another model and data set); the top-1 axis
    spans at least :data:`MIN_TOP1_SPAN` points."""
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    series: dict[str, list[dict]] = {}
    for row in rows:
        if row["top1"] is not None and row["gflops"] is not None:
            series.setdefault(row["series"], []).append(row)
    labelled = []
    for name, pts in series.items():
        pts = sorted(pts, key=lambda r: r["gflops"])
        dense = all(p["method"] == "dense" for p in pts)
        style = dict(marker="*", markersize=12, linestyle="none", color="black") if dense else dict(marker="o")
        ax.plot([p["gflops"] for p in pts], [p["top1"] for p in pts], label=name, **style)
        labelled += [p for p in pts if p["point"]]
    ax.set_ylim(*widen(*ax.get_ylim(), MIN_TOP1_SPAN))
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    xy = [(p["gflops"], p["top1"]) for p in labelled]
    for p, offset in zip(labelled, label_offsets(xy, (x1 - x0, y1 - y0))):
        ax.annotate(p["point"], (p["gflops"], p["top1"]), textcoords="offset points", xytext=offset, fontsize=7)
    ax.set_xlabel(f"GFLOPs per {unit} (mean, 1 multiply-add = 1 FLOP)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return save(fig, path, dpi=120)
