"""CPU throughput of DeiT-S + ATS against dense DeiT-S (eager and compiled), in one process (``nox -s bench``).

DeiT-S geometry with random weights whose attention is made peaked (q/k projections scaled), so that ATS keeps an
image-dependent number of tokens, as trained weights do. At every ``--batch-sizes`` (default 1 and 32) it reports the
speed-up over eager and over ``torch.compile``d dense DeiT-S, the ideal speed-up (dense GMACs / mean per-image GMACs
of the pool), their ratios and the host syncs of one forward (:mod:`vitbench.bench`). ``--compile all`` adds ATS
compiled between its host syncs (``ats.patch.compile_ats``). No weights or data are needed. About 4 minutes on two
shared cores with the defaults (most of it compiling dense DeiT-S once per batch size); writes JSON (``--json``)
and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import timm
import torch
from vitbench import bench
from vitbench.cli import run
from vitbench.flops import ViTGeometry, vit_gmacs

import ats
from ats.flops import dense_gmacs, per_image_gmacs
from ats.patch import compile_ats


def ideal_speedup(model: torch.nn.Module, pool: torch.Tensor) -> tuple[float, list[float]]:
    """Dense GMACs / mean per-image GMACs of ``pool`` (ATS is batch-invariant: one forward), and the mean output
    tokens of every block."""
    with torch.inference_mode():
        model(pool)
    geom = ViTGeometry.from_model(model)
    tokens = model.ats_info.token_counts()[1].double().mean(0)
    return dense_gmacs(geom) / float(per_image_gmacs(geom, model.ats_info).mean()), [round(float(t), 1)
                                                                                     for t in tokens]


def counts_floor(dense: torch.nn.Module, tokens_out: list[float]) -> bench.Method:
    """Dense timm blocks cut to ATS's mean output token counts, without any sampling: what ATS would cost if
    scoring and selecting were free (full attention on the block's input, then the first ``n_out`` rows go on).
    Its ideal speed-up is its own GMACs ratio; ATS's measured / this row's measured speed-up is the share of time
    the sampling costs, this row's fraction of ideal what the small matrix products cost on this CPU."""
    counts = [round(t) for t in tokens_out]

    def forward(x: torch.Tensor) -> torch.Tensor:
        h = dense.norm_pre(dense._pos_embed(dense.patch_embed(x)))
        for blk, n_out in zip(dense.blocks, counts):
            h = h[:, :n_out] + blk.ls1(blk.attn(blk.norm1(h)))[:, :n_out]
            h = h + blk.ls2(blk.mlp(blk.norm2(h)))
        return dense.forward_head(dense.norm(h))

    n_in = [dense.patch_embed.num_patches + 1, *counts[:-1]]
    geom = ViTGeometry.from_model(dense)
    return bench.Method(forward, dense_gmacs(geom) / vit_gmacs(geom, list(zip(n_in, counts))))


def measure(args: argparse.Namespace, cfg: bench.BenchConfig,
            extra: Callable[[torch.nn.Module], dict] | None = None) -> list[dict]:
    """Rows at every batch size; ``extra(dense_model)`` may add callables (e.g. the released code)."""
    torch.manual_seed(cfg.seed)
    dense = bench.peaked(timm.create_model(args.model, pretrained=False), cfg.peak)
    models = {f"ats rho={rho:g}": ats.apply(copy.deepcopy(dense), rho=rho, mode=args.mode) for rho in args.rho}
    compiled = {n: compile_ats(copy.deepcopy(m)) for n, m in models.items()} if cfg.compile == "all" else {}
    dense_compiled = bench.compile_dense(dense) if cfg.compile != "none" else None
    rows = []
    for b in cfg.batch_sizes:
        pool = bench.images(b, dense.patch_embed.img_size[0], cfg.seed)
        methods, tokens = {}, {}
        for name, model in models.items():
            ideal, tokens[name] = ideal_speedup(model, pool)
            methods[name] = bench.Method(model, ideal, compiled.get(name))
        if args.floor:
            methods["dense blocks at ATS's counts, no sampling"] = counts_floor(dense, tokens[next(iter(models))])
        batch_rows = bench.compare_methods(dense, methods, pool, b, cfg, dense_compiled,
                                           extra(dense) if extra else None)
        for row in batch_rows:
            row["mean_tokens_out"] = tokens.get(row["name"].removesuffix(" (compiled)"))
        rows += batch_rows
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224",
                   help="timm ViT with a CLS token, random weights (default: deit_small_patch16_224)")
    p.add_argument("--rho", type=float, nargs="+", default=[1.0], help="ATS rho values to time (default: 1)")
    p.add_argument("--mode", choices=ats.MODES, default="official", help="ATS selection mode (default: official)")
    p.add_argument("--floor", action="store_true",
                   help="also time dense blocks cut to the first rho's mean token counts without sampling, which "
                   "separates the sampling's cost from that of the smaller matrix products (default: off)")
    bench.add_arguments(p, "runs/bench/ats.json")
    return p


def _main(args: argparse.Namespace) -> int:
    cfg = bench.config(args)
    bench.report("ats", measure(args, cfg), cfg, model=args.model, mode=args.mode)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
