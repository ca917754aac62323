"""CPU throughput of LF-ViT early exit vs dense DeiT-S (same weights), at the Table 2 operating point.

DeiT-S geometry (224 px, g 7, m 5), random weights, fp32. eta is set per batch so that 22 % of the images reach
the focus stage (the m 5 / eta 0.47 operating point of Table 2: 1.10 + 0.22 x 2.71 = 1.70 GFLOPs; ideal
speedup 4.61 / 1.70 = 2.7x). All callables are timed interleaved in one process (vitbench.throughput.compare).
Writes JSON (default runs/bench/lfvit_early_exit.json) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import lfvit  # noqa: F401  (registers the models)
from lfvit.flops import dense_gflops, stage_flops
from vitbench.report import markdown_table, write_json
from vitbench.syncs import count_syncs
from vitbench.throughput import compare


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=32, help="images per call (paper: 1024 on an A100)")
    p.add_argument("--focus-fraction", type=float, default=0.22, help="share of images reaching the focus stage")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on a shared, oversubscribed CPU every multi-threaded op "
                        "waits for descheduled OpenMP workers, which charges small ops like large ones)")
    p.add_argument("--json", default="runs/bench/lfvit_early_exit.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0.0 <= args.focus_fraction <= 1.0 or args.batch_size < 1:
        raise SystemExit("need 0 <= --focus-fraction <= 1 and --batch-size >= 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model("lfvit_deit_small_patch16_224").eval()
    dense = VisionTransformer(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6).eval()
    dense.load_state_dict({k: v for k, v in model.state_dict().items() if k in dense.state_dict()})
    x = torch.randn(args.batch_size, 3, 224, 224)
    with torch.inference_mode():
        conf = model(x).location.softmax(-1).amax(-1)
    n_focus = round(args.focus_fraction * args.batch_size)
    c = conf.sort().values  # conf < eta -> focus; eta midway between two images' confidences (no boundary ties)
    eta = 1.0 if n_focus >= args.batch_size else c[0].item() / 2 if n_focus == 0 else (
        (c[n_focus - 1] + c[n_focus]) / 2).item()
    fns = {"deit_s_dense": dense, "lfvit_early_exit": lambda t: model.forward_early_exit(t, eta),
           "lfvit_two_stage": model}
    rows = compare(fns, x, baseline="deit_s_dense", warmup=args.warmup, repeats=args.repeats)
    for row in rows:
        row["syncs"] = count_syncs(fns[row["name"]], x)["total"]
    cpu_rows = (compare(fns, x, baseline="deit_s_dense", warmup=args.warmup, repeats=args.repeats, clock="thread")
                if args.threads == 1 else [])
    with torch.inference_mode():
        model.forward_early_exit(x, eta)
    reached = model.last_record.exit_stage.float().mean().item()
    s = stage_flops(model)
    result = {"rows": rows, "cpu_time_rows": cpu_rows, "batch_size": args.batch_size, "focus_fraction": reached,
              "eta": eta,
              "threads": torch.get_num_threads(), "dtype": "float32",
              "expected_gflops": s.expected(reached), "dense_gflops": dense_gflops(model),
              "ideal_speedup": dense_gflops(model) / s.expected(reached)}
    print("wall clock (median):\n" + markdown_table(rows, ["name", "batch_size", "median_ms", "img_s", "speedup",
                                                            "syncs"]))
    if cpu_rows:
        print("\nthread CPU time (median):\n" + markdown_table(cpu_rows, ["name", "batch_size", "median_ms", "img_s",
                                                                         "speedup"]))
    print(f"\nfocus fraction {reached:.3f} (eta {eta:.6f}), expected {result['expected_gflops']:.3f} GFLOPs vs "
          f"dense {result['dense_gflops']:.3f}: ideal speedup {result['ideal_speedup']:.2f}x; "
          f"{result['threads']} threads, fp32, CPU")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
