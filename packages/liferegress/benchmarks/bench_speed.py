"""CPU speed benchmark, DeiT-S geometry (random weights, peaked attention), all timings interleaved in one process.

1. Inference (:mod:`vitbench.bench`, at every ``--batch-sizes``, default 1 and 32): dense DeiT-S (eager and
   ``torch.compile``d) vs Life Regression in hard mode (keep rate 0.7 -> 140/100/72 tokens; ``--compile all`` adds it
   compiled as one graph), and the released code's pruned forward (``TimmVitAdapter``) when its checkout is given
   with ``--released PATH`` (it is imported from there at run time, never copied; it needs timm 0.5.4's
   ``Block.drop_path``, aliased to ``drop_path1``; ``--compile all`` adds it compiled the same way, which it allows
   without a graph break). ``vs_released``: ours over the released code eager, as it is run;
   ``vs_released_compiled``: ours over the released code compiled.
2. Training step (``--train-repeats N``; forward, backward, AdamW step; every parameter trainable; at the largest
   batch size): plain DeiT-S vs soft mode, plus soft mode with torch's unfused key-bias gradient (timm ``Attention``
   instead of ``LifeRegressionAttention``) to show what the fused path saves.

Writes JSON (``--json``) and prints Markdown tables. Single-threaded by default (``--threads``), which is what is
stable on a shared CPU box; the ratios, not the absolute img/s, are the result. About 4 minutes on two shared cores
with the defaults (mostly compiling dense DeiT-S once per batch size).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import types

import timm
import torch
from timm.layers import Attention
from vitbench import bench
from vitbench.cli import renamed, run
from vitbench.report import markdown_table
from vitbench.throughput import compare

import liferegress
from liferegress.flops import model_gmacs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224", help="timm ViT (default: deit_small_patch16_224)")
    p.add_argument("--rho", type=float, default=0.7, help="keep rate rho of the hard-mode schedule (default: 0.7)")
    renamed(p, "--keep-rate", "--rho")
    p.add_argument("--train-repeats", type=int, default=0,
                   help="training-step repeats per variant at the largest batch size (default: 0, skipped)")
    bench.add_released_argument(p, "github.com/cjwcommuny/life-regression", "LIFEREGRESS_RELEASED")
    bench.add_arguments(p, "runs/bench/liferegress.json")
    return p


def _stub_modules() -> None:
    """The released model code imports Lightning/transformers/torchmetrics names that its forward never uses."""
    stubs = {
        "pytorch_lightning": {"LightningModule": torch.nn.Module},
        "pytorch_lightning.profiler": {"PassThroughProfiler": type(
            "PassThroughProfiler", (), {"profile": lambda self, name: contextlib.nullcontext()})},
        "transformers": {},
        "torchmetrics": {"Metric": object},
    }
    for name, attrs in stubs.items():
        try:
            __import__(name)
        except ImportError:
            module = types.ModuleType(name)
            module.__dict__.update(attrs)
            sys.modules[name] = module


def released_model(path: str | None, model: str, keep_rate: float) -> torch.nn.Module | None:
    """The released ``TimmVitAdapter`` in pruning-eval mode, or ``None`` when no checkout is given."""
    path = bench.released_path(path, "tv/models/timm_vit_adapter.py")
    if path is None:
        return None
    _stub_modules()
    sys.path.insert(0, str(path))
    from tv.common import get_num_patches_reserved
    from tv.models.timm_vit_adapter import TimmVitAdapter

    cfg = dict(layer_indices=(4, 7, 10), hard_mask_training=False, pruning_eval=True,
               num_patches_reserved=get_num_patches_reserved(keep_rate), temperature=1.5)
    adapter = TimmVitAdapter(num_patches=197, model_name=model, mask_patches_config=cfg)
    for blk in adapter.model.blocks:
        blk.drop_path = blk.drop_path1
    return adapter.eval()


def train_step(model: torch.nn.Module, targets: torch.Tensor):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.05)

    def step(images: torch.Tensor):
        loss = torch.nn.functional.cross_entropy(model(images), targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def command(args: argparse.Namespace) -> int:
    if args.train_repeats < 0:
        raise ValueError("--train-repeats must be >= 0")
    cfg = bench.config(args, "liferegress")
    torch.manual_seed(cfg.seed)
    dense = bench.laid_out(bench.peaked(timm.create_model(args.model, pretrained=False), cfg.peak), cfg)
    ours = liferegress.apply(copy.deepcopy(dense), keep_rate=args.rho).eval()
    ideal = model_gmacs(dense) / model_gmacs(ours)
    compiled = bench.compile_dense(copy.deepcopy(ours)) if cfg.compile == "all" else None
    dense_compiled = bench.compile_dense(dense) if cfg.compile != "none" else None
    released = bench.laid_out(released_model(args.released, args.model, args.rho), cfg)
    extra = {} if released is None else {"released code (pruning eval)": released}
    if released is not None and cfg.compile == "all":
        extra["released code (pruning eval) (compiled)"] = bench.compile_dense(copy.deepcopy(released))
    rows = []
    for b in cfg.batch_sizes:
        pool = bench.images(b, dense.patch_embed.img_size[0], cfg.seed)
        batch_rows = bench.compare_methods(dense, {"liferegress (hard)": bench.Method(ours, ideal, compiled)}, pool,
                                           b, cfg, dense_compiled, extra)
        for key, name in (("vs_released", "released code (pruning eval)"),
                          ("vs_released_compiled", "released code (pruning eval) (compiled)")):
            bench.speedups_over(batch_rows, name, key, "liferegress (hard)")
        rows += batch_rows

    training = []
    if args.train_repeats:
        images = bench.images(max(cfg.batch_sizes), dense.patch_embed.img_size[0], cfg.seed)[: max(cfg.batch_sizes)]
        targets = torch.randint(0, dense.num_classes, (images.shape[0],))
        plain = copy.deepcopy(dense).train()
        soft = liferegress.apply(copy.deepcopy(dense), keep_rate=args.rho, mode="soft").train()
        unfused = copy.deepcopy(soft)
        for blk in unfused.blocks:
            blk.attn.__class__ = Attention
        steps = {"plain": train_step(plain, targets), "soft (fused key-bias grad)": train_step(soft, targets),
                 "soft (torch's unfused key-bias grad)": train_step(unfused, targets)}
        train_rows = compare(steps, images, baseline="plain", warmup=1, repeats=args.train_repeats, clock=cfg.clock,
                             inference=False)
        training = [{"name": r["name"], "batch_size": r["batch_size"], "median_s": r["median_ms"] / 1e3,
                     "min_s": r["min_ms"] / 1e3, "ratio_vs_plain": 1 / r["speedup"]} for r in train_rows]

    bench.report(rows, cfg, training=training, released_available=released is not None,
                 gflops={"dense": model_gmacs(dense), "liferegress": model_gmacs(ours)})
    if training:
        print()
        print(markdown_table(training, ["name", "batch_size", "median_s", "min_s", "ratio_vs_plain"], digits=3))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
