"""CPU throughput of CvT-13 + ATS against dense CvT-13 (eager and compiled), in one process (``nox -s bench``).

``cvt_13_224`` (224 px) with random weights, built twice on the same seed: the paper's dense model (``dw_bn``
projections everywhere) and the model ATS runs on (a ``linear`` stage 3, App. E.2), whose stage-3 q/k projections
are scaled (``--peak``, as :mod:`bench_throughput` does for DeiT-S) so that attention is peaked and ATS (rho 1, stage-3
blocks 0..8) keeps an image-dependent number of tokens, as trained weights do. At every ``--batch-sizes`` (default 1
and 32) it times, interleaved, dense ``dw_bn`` CvT (the baseline), dense ``linear`` stage 3 and ATS, and reports for
each its GMACs per image (:func:`ats.backbones.geometry`; ATS: the mean over the timed pool), the ideal speed-up over
dense ``dw_bn`` (GMACs ratio) beside the measured one, and the host syncs of one forward (:mod:`vitbench.bench`).
``--compile dense`` adds both dense models ``torch.compile``d, ``--compile all`` also ATS compiled between its host
syncs (``ats.patch.compile_ats``). No weights or data are needed. About 2 minutes on two shared cores with the
defaults (no compiling; ``--compile dense`` adds some 4 minutes of compiling); writes JSON (``--json``) and prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import copy

import timm
import torch
from bench_throughput import ideal_speedup
from vitbench import bench
from vitbench.cli import run

import ats
from ats.backbones import geometry
from ats.flops import dense_gmacs
from ats.patch import compile_ats

LINEAR = "dense, linear stage 3"


def peaked_cvt(model: torch.nn.Module, peak: float) -> torch.nn.Module:
    """Stage 3's q and k projections scaled by ``peak`` (in place, eval mode): :func:`vitbench.bench.peaked` for a
    ``linear`` stage 3 (timm blocks, packed ``qkv``), ``proj_q`` / ``proj_k`` for a ``dw_bn`` one."""
    if model.projection == "linear":
        return bench.peaked(model, peak)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.proj_q.weight *= peak
            blk.attn.proj_k.weight *= peak
    return model.eval()


def build(name: str, cfg: bench.BenchConfig, **kwargs) -> torch.nn.Module:
    """``name`` with random weights (seed ``cfg.seed``), peaked stage 3, in ``cfg.weight_layout``."""
    torch.manual_seed(cfg.seed)
    return bench.laid_out(peaked_cvt(timm.create_model(name, pretrained=False, **kwargs), cfg.peak), cfg)


def measure(args: argparse.Namespace, cfg: bench.BenchConfig) -> list[dict]:
    """Rows at every batch size."""
    dense = build(args.model, cfg)
    linear = build(args.model, cfg, projection="linear")
    model = ats.apply(copy.deepcopy(linear), rho=args.rho, mode=args.mode)
    ats_name = f"ats rho={args.rho:g}"
    compiled = compile_ats(copy.deepcopy(model)) if cfg.compile == "all" else None
    dense_compiled = bench.compile_dense(dense) if cfg.compile != "none" else None
    linear_compiled = bench.compile_dense(linear) if cfg.compile != "none" else None
    gmacs = {"dense": dense_gmacs(geometry(dense)), LINEAR: dense_gmacs(geometry(linear))}
    rows = []
    for b in cfg.batch_sizes:
        pool = bench.images(b, dense.img_size, cfg.seed)
        ideal, tokens = ideal_speedup(model, pool, reference=dense)
        gmacs[ats_name] = gmacs["dense"] / ideal
        methods = {LINEAR: bench.Method(linear, gmacs["dense"] / gmacs[LINEAR])}
        if linear_compiled is not None:  # a dense model: compiled whenever dense is
            methods[f"{LINEAR} (compiled)"] = bench.Method(linear_compiled, methods[LINEAR].ideal)
        methods[ats_name] = bench.Method(model, ideal, compiled)
        batch_rows = bench.compare_methods(dense, methods, pool, b, cfg, dense_compiled)
        for row in batch_rows:
            base = row["name"].removesuffix(" (compiled)")
            row["gmacs"] = gmacs[base]
            row["mean_tokens_out"] = tokens if base == ats_name else None
        rows += batch_rows
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_cvt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cvt_13_224", choices=sorted(ats.backbones.cvt.CVT_MODELS),
                   help="CvT, random weights (default: cvt_13_224)")
    p.add_argument("--rho", type=float, default=1.0, help="ATS rho (default: 1)")
    p.add_argument("--mode", choices=ats.MODES, default="official", help="ATS selection mode (default: official)")
    # a CvT-13 forward takes ~0.15 s per image on one core: no compiling and few repeats unless asked
    bench.add_arguments(p, "runs/bench/ats_cvt.json", compile="none", repeats=3)
    return p


def command(args: argparse.Namespace) -> int:
    cfg = bench.config(args, "ats-cvt")
    bench.report(measure(args, cfg), cfg, model=args.model, mode=args.mode, rho=args.rho)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
