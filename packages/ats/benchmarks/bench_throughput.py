"""CPU throughput of DeiT-S + ATS against dense DeiT-S, in one process (``nox -s bench``).

DeiT-S geometry with random weights whose attention is made peaked (q/k projections scaled), so that ATS keeps
an image-dependent number of tokens, as trained weights do. Reports img/s, the measured speed-up over dense
DeiT-S (eager, and ``torch.compile``d with ``--compiled-dense``), the ideal speed-up (dense GMACs / mean per-image
GMACs of the batch), their ratio and the host syncs of one forward, at every ``--batch-sizes``. No weights or data
are needed. Writes JSON (``--json``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import platform
from dataclasses import asdict, dataclass
from collections.abc import Callable

import timm
import torch
from vitbench.flops import ViTGeometry
from vitbench.report import markdown_table, write_json
from vitbench.syncs import count_syncs
from vitbench.throughput import compare

import ats
from ats.flops import dense_gmacs, per_image_gmacs


@dataclass(frozen=True)
class BenchConfig:
    model: str = "deit_small_patch16_224"
    batch_sizes: tuple[int, ...] = (1, 32)
    peak: float = 4.0
    rhos: tuple[float, ...] = (1.0, 0.87)
    mode: str = "official"
    warmup: int = 2
    repeats: int = 7
    threads: int | None = 1
    seed: int = 0
    compiled_dense: bool = False
    json: str = "runs/bench/ats_throughput.json"


def peaked_model(name: str, peak: float, seed: int) -> torch.nn.Module:
    """Random-init timm model whose q and k projections are scaled by ``peak`` (logits by ``peak**2``)."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False).eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight[: 2 * blk.attn.attn_dim] *= peak
    return model


def build_models(cfg: BenchConfig, batch_size: int) -> tuple[dict[str, torch.nn.Module], torch.Tensor]:
    dense = peaked_model(cfg.model, cfg.peak, cfg.seed)
    models = {"dense": dense}
    for rho in cfg.rhos:
        models[f"ats rho={rho:g}"] = ats.apply(copy.deepcopy(dense), rho=rho, mode=cfg.mode)
    torch.manual_seed(cfg.seed + 1)
    return models, torch.randn(batch_size, 3, *dense.patch_embed.img_size)


def run(cfg: BenchConfig, extra: Callable[[torch.nn.Module], dict] | None = None) -> dict:
    """Time the dense model and the ATS models side by side; ``extra(dense_model)`` may add more callables."""
    if cfg.threads:  # 0 or None: keep torch's default
        torch.set_num_threads(cfg.threads)
    rows = []
    for batch_size in cfg.batch_sizes:
        rows += run_batch(cfg, batch_size, extra)
    return {"config": asdict(cfg), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "timm": timm.__version__, "cpu": platform.processor() or platform.machine(), "rows": rows}


def run_batch(cfg: BenchConfig, batch_size: int, extra: Callable[[torch.nn.Module], dict] | None) -> list[dict]:
    models, x = build_models(cfg, batch_size)
    geom = ViTGeometry.from_model(models["dense"])
    dense = dense_gmacs(geom)
    rows_extra = {}
    with torch.inference_mode():
        for name, model in models.items():
            if name != "dense":
                model(x)
                g = per_image_gmacs(geom, model.ats_info)
                tokens = model.ats_info.token_counts()[1].double().mean(0)
                rows_extra[name] = {"gmacs": float(g.mean()), "ideal_speedup": dense / float(g.mean()),
                                    "mean_tokens_out": [round(float(t), 1) for t in tokens]}
    fns = {name: model for name, model in models.items()}
    if cfg.compiled_dense:
        fns["dense (compiled)"] = torch.compile(models["dense"], fullgraph=True)
    fns.update(extra(models["dense"]) if extra else {})
    rows = compare(fns, x, baseline="dense", warmup=cfg.warmup, repeats=cfg.repeats)
    compiled = {r["name"]: r["img_s"] for r in rows}.get("dense (compiled)")
    for row in rows:
        row.update(rows_extra.get(row["name"], {"gmacs": dense if row["name"] == "dense" else None}))
        row["syncs"] = count_syncs(fns[row["name"]], x)["total"]
        if "ideal_speedup" in row:
            row["fraction_of_ideal"] = row["speedup"] / row["ideal_speedup"]
            if compiled:
                row["speedup_vs_compiled"] = row["img_s"] / compiled
                row["fraction_of_ideal_vs_compiled"] = row["speedup_vs_compiled"] / row["ideal_speedup"]
    return rows


def build_parser() -> argparse.ArgumentParser:
    d = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=d.model, help="timm ViT with a CLS token (random weights)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=list(d.batch_sizes),
                   help="batch sizes, each timed on its own (default: 1 32)")
    p.add_argument("--compiled-dense", action="store_true",
                   help="also time torch.compile(dense, fullgraph=True) and give ratios against it (default: off)")
    p.add_argument("--peak", type=float, default=d.peak, help="scale of the q/k projections")
    p.add_argument("--rho", type=float, nargs="+", default=list(d.rhos), help="ATS rho values to time")
    p.add_argument("--mode", choices=ats.MODES, default=d.mode)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (0: torch's default). One thread "
                   "keeps timings stable on a shared 2-core machine, where small ops stall on busy cores")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--json", default=d.json, help="where to write the results")
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if min(ns.batch_sizes) < 1 or ns.repeats < 1 or ns.peak <= 0:
        raise SystemExit("--batch-sizes, --repeats and --peak must be positive")
    cfg = BenchConfig(ns.model, tuple(ns.batch_sizes), ns.peak, tuple(ns.rho), ns.mode, ns.warmup, ns.repeats,
                      ns.threads, ns.seed, ns.compiled_dense, ns.json)
    result = run(cfg)
    write_json(cfg.json, result)
    print(markdown_table(result["rows"], ["name", "batch_size", "median_ms", "img_s", "speedup", "gmacs",
                                          "ideal_speedup", "fraction_of_ideal", "speedup_vs_compiled",
                                          "fraction_of_ideal_vs_compiled", "syncs"], digits=3))
    print(f"{result['threads']} threads, torch {result['torch']}, timm {result['timm']}; JSON: {cfg.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
