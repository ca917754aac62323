"""CPU throughput of video ATS (X-ViT, TimeSformer) against the dense video models (eager and compiled), in one
process (``nox -s bench``).

Two geometries, random weights with peaked attention (q/k projections scaled, ``--peak``) so that ATS keeps a
clip-dependent number of tokens, as trained weights do: the embedded one (``xvit_digits_patch8_64`` and
``timesformer_digits_patch8_64``: 8 frames of 64 px, patch 8, width 64) at every ``--batch-sizes`` (default 1 and
8 clips), and the paper's X-ViT-B/16 (``xvit_base_patch16_224_8f``: 8 frames of 224 px) at batch 1 (``--no-paper``
skips it). ATS runs at the paper's blocks (X-ViT 3..11, TimeSformer 3..5) with rho 1 (``--rho``) on compacted
tokens (:mod:`ats.video.compact`). Every row gives GMACs per clip (ATS: the mean over the timed pool), the ideal
speed-up over dense (GMACs ratio), the measured one over eager and over compiled dense, their ratios and the host
syncs of one forward (:mod:`vitbench.bench`). ``--compile dense`` (default) adds dense compiled, ``--compile all``
also ATS compiled (:func:`ats.video.compile_ats`). At batch 1 the pool holds :data:`vitbench.bench.MIN_IMAGES`
clips of the embedded geometry and ``--paper-clips`` of the paper's. No weights or data are needed. About 5 minutes
on two shared cores with the defaults (most of it the paper geometry and compiling); writes JSON (``--json``) and
prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy

import timm
import torch
from vitbench import bench
from vitbench.cli import run

from ats import video
from ats.video.flops import VideoGeometry, clip_gmacs, recorded_gmacs

EMBEDDED = ("xvit_digits_patch8_64", "timesformer_digits_patch8_64")
PAPER = "xvit_base_patch16_224_8f"


def build(name: str, cfg: bench.BenchConfig) -> torch.nn.Module:
    """``name`` with random weights (seed ``cfg.seed``), every block's q/k scaled by ``cfg.peak`` (also the temporal
    attention's), in ``cfg.weight_layout``, eval mode."""
    torch.manual_seed(cfg.seed)
    return bench.laid_out(bench.peaked(timm.create_model(name), cfg.peak), cfg)


def shipped(cfg: bench.BenchConfig) -> torch.nn.Module:
    """The embedded X-ViT with its shipped dense weights, in ``cfg.weight_layout``, eval mode."""
    from ats.video.evaluate import WEIGHTS  # deferred: only --shipped reads the weights

    model = video.load_video_checkpoint(timm.create_model(EMBEDDED[0]), str(WEIGHTS))
    return bench.laid_out(model.eval(), cfg)


def clips(model: torch.nn.Module, count: int, seed: int, real: bool = False) -> torch.Tensor:
    """``count`` clips ``[count, 3, T, H, W]`` for ``model``: random, or (``real``) the first moving-digits
    validation clips' centre views."""
    if real:
        from vitbench.video import MOVING_DIGITS_SAMPLING, build_video_dataset  # deferred: only --shipped

        val = build_video_dataset("moving-digits", "val", MOVING_DIGITS_SAMPLING)
        return torch.stack([val[i % len(val)][0][1] for i in range(count)])
    size = model.patch_embed.img_size
    return torch.randn(count, 3, model.num_frames, *size, generator=torch.Generator().manual_seed(seed + 1))


def ideal(model: torch.nn.Module, pool: torch.Tensor) -> tuple[float, float]:
    """(dense GMACs per clip / ATS's mean GMACs per clip on ``pool``, that mean); one forward (batch-invariant)."""
    with torch.inference_mode():
        model(pool)
    dense = float(clip_gmacs(VideoGeometry.from_model(model))[0])
    mean = float(recorded_gmacs(model).mean())
    return dense / mean, mean


def measure_model(name: str, batch_sizes, pool_sizes, args: argparse.Namespace, cfg: bench.BenchConfig,
                  real: bool = False) -> list[dict]:
    """Dense, ATS (and compiled forms) of ``name`` at every batch size, ``pool_sizes[b]`` clips per timed round
    (``real``: the shipped weights on moving-digits clips)."""
    dense = shipped(cfg) if real else build(name, cfg)
    model = video.apply(copy.deepcopy(dense), rho=args.rho, mode=args.mode)
    label = f"{name} (shipped weights, moving-digits)" if real else name
    ats_name = f"{label} + ATS rho={args.rho:g}"
    compiled = video.compile_ats(copy.deepcopy(model)) if cfg.compile == "all" else None
    dense_compiled = bench.compile_dense(dense) if cfg.compile != "none" else None
    dense_gmacs = float(clip_gmacs(VideoGeometry.from_model(dense))[0])
    rows = []
    for b in batch_sizes:
        pool = clips(dense, pool_sizes(b), cfg.seed, real)
        ratio, gmacs = ideal(model, pool)
        methods = {ats_name: bench.Method(model, ratio, compiled)}
        batch_rows = bench.compare_methods(dense, methods, pool, b, cfg, dense_compiled)
        for row in batch_rows:
            row["model"] = label
            row["gmacs"] = gmacs if row["name"].startswith(ats_name) else dense_gmacs
            if row["name"].startswith("dense"):
                row["name"] = f"{label} {row['name']}"
        rows += batch_rows
    return rows


def measure(args: argparse.Namespace, cfg: bench.BenchConfig) -> list[dict]:
    rows = []
    for name in EMBEDDED:
        rows += measure_model(name, cfg.batch_sizes, bench.pool_size, args, cfg)
    if args.shipped:
        rows += measure_model(EMBEDDED[0], cfg.batch_sizes, bench.pool_size, args, cfg, real=True)
    if not args.no_paper:
        rows += measure_model(PAPER, (1,), lambda b: max(args.paper_clips, 1), args, cfg)
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_video", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rho", type=float, default=1.0, help="ATS rho (default: 1)")
    p.add_argument("--mode", choices=("official", "paper"), default="official",
                   help="ATS selection mode (default: official)")
    p.add_argument("--no-paper", action="store_true",
                   help=f"skip the paper geometry ({PAPER}, batch 1; default: timed)")
    p.add_argument("--shipped", action="store_true",
                   help=f"also time {EMBEDDED[0]} with its shipped weights on moving-digits validation clips (centre "
                   "views; default: off)")
    p.add_argument("--paper-clips", type=int, default=3,
                   help="clips per timed round at the paper geometry, at least 1 (default: 3; a forward takes seconds "
                   "on CPU)")
    bench.add_arguments(p, "runs/bench/ats_video.json", batch_sizes=(1, 8), repeats=5)
    return p


def command(args: argparse.Namespace) -> int:
    cfg = bench.config(args, "ats-video")
    bench.report(measure(args, cfg), cfg, rho=args.rho, mode=args.mode)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
