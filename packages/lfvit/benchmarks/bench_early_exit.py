"""CPU throughput of LF-ViT early exit vs dense DeiT-S (same weights; eager and compiled), at the Table 2 operating
point (``nox -s bench``).

DeiT-S geometry (224 px, g 7, m 5), random weights with peaked attention (q/k scaled), fp32. eta is set per pool of
images so that 22 % of them reach the focus stage (the m 5 / eta 0.47 operating point of Table 2: 1.10 + 0.22 x 2.71
= 1.70 GFLOPs; ideal speed-up 4.61 / 1.70 = 2.7x); at batch 1 the pool is nine images, two of which reach the
focus stage. Every callable runs side by side in one process (:mod:`vitbench.bench`); ``--compile all`` adds the
model with its two stages compiled (``LFVisionTransformer.compile_stages``). About 4 minutes on two shared cores
with the defaults (mostly compiling dense DeiT-S once per batch size). Writes JSON (default
runs/bench/lfvit.json) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import sys

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from vitbench import bench
from vitbench.cli import run

import lfvit  # noqa: F401  (registers the models)
from lfvit.flops import dense_gflops, stage_flops
from lfvit.model import eta_for_share


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_early_exit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--focus-fraction", type=float, default=0.22,
                   help="share of the images reaching the focus stage (default: 0.22)")
    bench.add_arguments(p, "runs/bench/lfvit.json")
    return p


def _main(args: argparse.Namespace) -> int:
    if not 0.0 <= args.focus_fraction <= 1.0:
        raise ValueError("--focus-fraction must be in [0, 1]")
    cfg = bench.config(args)
    torch.manual_seed(cfg.seed)
    model = bench.peaked(timm.create_model("lfvit_deit_small_patch16_224"), cfg.peak)
    dense = VisionTransformer(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6).eval()
    dense.load_state_dict({k: v for k, v in model.state_dict().items() if k in dense.state_dict()})
    compiled = copy.deepcopy(model).compile_stages() if cfg.compile == "all" else None
    dense_compiled = bench.compile_dense(dense) if cfg.compile != "none" else None
    stages, dense_g = stage_flops(model), dense_gflops(model)
    rows, operating = [], []
    for b in cfg.batch_sizes:
        pool = bench.images(b, 224, cfg.seed)
        eta = eta_for_share(model, pool, args.focus_fraction)
        with torch.inference_mode():
            model.forward_early_exit(pool, eta)
        reached = model.last_record.exit_stage.float().mean().item()
        ideal = dense_g / stages.expected(reached)
        method = bench.Method(lambda t, eta=eta: model.forward_early_exit(t, eta), ideal,
                              None if compiled is None else lambda t, eta=eta: compiled.forward_early_exit(t, eta))
        rows += bench.compare_methods(dense, {"lfvit early exit": method}, pool, b, cfg, dense_compiled)
        operating.append({"batch_size": b, "eta": eta, "focus_fraction": reached,
                          "expected_gflops": stages.expected(reached), "ideal_speedup": ideal})
        print(f"batch {b}: {reached:.3f} of {len(pool)} images to focus (eta {eta:.6f}), "
              f"{stages.expected(reached):.3f} GFLOPs vs dense {dense_g:.3f}: ideal {ideal:.2f}x")
    bench.report("lfvit", rows, cfg, operating_points=operating, dense_gflops=dense_g)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), _main, argv)


if __name__ == "__main__":
    sys.exit(main())
