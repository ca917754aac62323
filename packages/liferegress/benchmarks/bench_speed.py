"""CPU speed benchmark, DeiT-S geometry (random weights), all timings interleaved in one process.

1. Inference: dense DeiT-S vs Life Regression in hard mode (keep rate 0.7 -> 140/100/72 tokens), and the released
   code's pruned forward (``TimmVitAdapter``) when its checkout is given with ``--released PATH`` (it is imported
   from there at run time, never copied; it needs timm 0.5.4's ``Block.drop_path``, aliased to ``drop_path1``).
2. Training step (forward, backward, AdamW step; every parameter trainable): plain DeiT-S vs soft mode, plus soft
   mode with torch's unfused key-bias gradient (timm ``Attention`` instead of ``LifeRegressionAttention``) to show
   what the fused path saves.

Writes JSON (``--json``) and prints Markdown tables. Single-threaded by default (``--threads``), which is what is
stable on a shared CPU box; the ratios, not the absolute img/s, are the result.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import types
from pathlib import Path

import timm
import torch
from timm.layers import Attention
from vitbench.report import markdown_table, write_json
from vitbench.syncs import count_syncs
from vitbench.throughput import compare

import liferegress
from liferegress.flops import model_gmacs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--keep-rate", type=float, default=0.7)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 by default because on a shared 2-core machine multi-threaded timings "
                   "swing with the other jobs (0: torch's default)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10, help="inference repeats per model")
    p.add_argument("--train-repeats", type=int, default=5, help="training-step repeats per variant (0: skip)")
    p.add_argument("--released", default=os.environ.get("LIFEREGRESS_RELEASED"),
                   help="checkout of github.com/cjwcommuny/life-regression (skipped when absent)")
    p.add_argument("--json", default="runs/bench/liferegress_speed.json")
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
    """The released ``TimmVitAdapter`` in pruning-eval mode, or ``None`` when no checkout is given or found."""
    if path is None or not (Path(path) / "tv" / "models" / "timm_vit_adapter.py").is_file():
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense = timm.create_model(args.model, pretrained=False).eval()
    ours = liferegress.apply(copy.deepcopy(dense), keep_rate=args.keep_rate).eval()
    images = torch.randn(args.batch_size, 3, 224, 224)
    gflops = {"dense": model_gmacs(dense), "liferegress": model_gmacs(ours)}

    fns = {"dense": dense, "liferegress (hard)": ours}
    released = released_model(args.released, args.model, args.keep_rate)
    if released is not None:
        fns["released code (pruning eval)"] = released
    inference = compare(fns, images, baseline="dense", warmup=args.warmup, repeats=args.repeats)
    for row in inference:
        row["gflops"] = gflops["dense"] if row["name"] == "dense" else gflops["liferegress"]
        row["flops_ratio"] = gflops["dense"] / row["gflops"]
        row["syncs"] = count_syncs(fns[row["name"]], images)["total"]
    by_name = {r["name"]: r for r in inference}
    if released is not None:
        ratio = by_name["liferegress (hard)"]["img_s"] / by_name["released code (pruning eval)"]["img_s"]
        by_name["liferegress (hard)"]["vs_released"] = ratio

    training = []
    if args.train_repeats:
        targets = torch.randint(0, dense.num_classes, (args.batch_size,))
        plain = copy.deepcopy(dense).train()
        soft = liferegress.apply(copy.deepcopy(dense), keep_rate=args.keep_rate, mode="soft").train()
        unfused = copy.deepcopy(soft)
        for blk in unfused.blocks:
            blk.attn.__class__ = Attention
        steps = {"plain": train_step(plain, targets), "soft (fused key-bias grad)": train_step(soft, targets),
                 "soft (torch's unfused key-bias grad)": train_step(unfused, targets)}
        rows = compare(steps, images, baseline="plain", warmup=1, repeats=args.train_repeats, inference=False)
        training = [{"name": r["name"], "batch_size": r["batch_size"], "median_s": r["median_ms"] / 1e3,
                     "min_s": r["min_ms"] / 1e3, "ratio_vs_plain": 1 / r["speedup"]} for r in rows]

    print(markdown_table(inference, [c for c in ("name", "batch_size", "gflops", "flops_ratio", "median_ms", "img_s",
                                                 "speedup", "vs_released", "syncs") if any(c in r for r in inference)],
                         digits=3))
    if training:
        print()
        print(markdown_table(training, ["name", "batch_size", "median_s", "min_s", "ratio_vs_plain"], digits=3))
    write_json(args.json, {"args": vars(args), "inference": inference, "training": training,
                           "threads": torch.get_num_threads(), "torch": torch.__version__, "timm": timm.__version__,
                           "released_available": released is not None, "loadavg": os.getloadavg()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
