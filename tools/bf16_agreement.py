"""bf16 autocast against fp32 on the embedded digits validation set, with the shipped weights (CPU, no data needed).

For the dense backbone and the three methods (ATS rho 1 on the backbone, LF-ViT early exit at ``--eta``,
Life-Regression rho 0.7): top-1 agreement of bf16 with fp32, each precision's top-1 accuracy, the largest logit
difference, and the share of images whose selection is identical: ATS's kept tokens of every stage (sets and order),
LF-ViT's exit stage and window, Life-Regression's kept patches of every pruning layer (and the largest difference of
the predicted lives); for ATS and Life-Regression also the share of images whose kept set (order ignored) is identical
at every stage, and the share of (image, stage) pairs with an identical kept set. Both precisions run the same
models on the same batches (:func:`gpu_check.run_methods`).

    python tools/bf16_agreement.py --json runs/bf16_agreement.json
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bf16_agreement", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eta", type=float, default=0.61, help="LF-ViT early-exit threshold (default: 0.61)")
    p.add_argument("--limit", type=int, default=None, help="first N validation images (default: all 2000)")
    p.add_argument("--batch-size", type=int, default=100, help="images per forward (default: 100)")
    p.add_argument("--json", default="runs/bf16_agreement.json", help="where to write (default: %(default)s)")
    return p


def embedded_models() -> dict[str, torch.nn.Module]:
    """The shipped embedded weights: backbone, ATS rho 1 on it, LF-ViT, Life-Regression rho 0.7."""
    import ats
    import vitbench
    from lfvit.evaluate import LFEvalConfig
    from lfvit.evaluate import build_model as build_lfvit
    from liferegress.evaluate import LifeEvalConfig, build_models
    from vitbench.evaluation import EvalConfig

    dense = vitbench.create_model("vit_digits_patch8_112", pretrained=True).eval()
    _, lr = build_models(EvalConfig(), LifeEvalConfig(keep_rate=(0.7,)))
    return {"dense": dense, "ats": ats.apply(copy.deepcopy(dense), rho=1.0),
            "lfvit": build_lfvit(EvalConfig(), LFEvalConfig()).eval(), "liferegress": lr[0.7].eval()}


def command(args: argparse.Namespace) -> int:
    from gpu_check import run_methods
    from lfvit.model import check_eta
    from vitbench import build_eval_loader
    from vitbench.cli import check_writable_file
    from vitbench.report import markdown_table, write_json

    check_eta(args.eta)
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise ValueError("--batch-size and --limit must be >= 1")
    check_writable_file(args.json)
    models = embedded_models()
    cfg = models["dense"].pretrained_cfg
    loader = build_eval_loader("digits", models["dense"].patch_embed.img_size[0], cfg["mean"], cfg["std"],
                               batch_size=args.batch_size, crop_pct=1.0, num_workers=0, limit=args.limit)
    totals: dict[str, dict] = {}
    for images, labels, _ in loader:
        ref = run_methods(models, images, args.eta, "cpu", "fp32")
        got = run_methods(models, images, args.eta, "cpu", "bf16")
        for name in ref:
            a, b = ref[name], got[name]
            t = totals.setdefault(name, {"method": name, "images": 0, "agree": 0, "top1_fp32": 0, "top1_bf16": 0,
                                         "logits_max_diff": 0.0, "same_selection": 0, "lives_max_diff": None})
            pa, pb = a["logits"].argmax(-1), b["logits"].argmax(-1)
            t["images"] += len(labels)
            t["agree"] += int((pa == pb).sum())
            t["top1_fp32"] += int((pa == labels).sum())
            t["top1_bf16"] += int((pb == labels).sum())
            t["logits_max_diff"] = max(t["logits_max_diff"], float((a["logits"] - b["logits"]).abs().max()))
            if a["selection"] is not None:
                t["same_selection"] += sum(x == y for x, y in zip(a["selection"], b["selection"]))
                if name != "lfvit":  # per stage / pruning layer: kept sets, order ignored
                    same = [set(u) == set(v) for x, y in zip(a["selection"], b["selection"]) for u, v in zip(x, y)]
                    t["stage_sets"] = t.get("stage_sets", 0) + sum(same)
                    t["stages"] = t.get("stages", 0) + len(same)
                    t["image_sets"] = t.get("image_sets", 0) + sum(
                        all(set(u) == set(v) for u, v in zip(x, y)) for x, y in zip(a["selection"], b["selection"]))
            if a["lives"] is not None:
                t["lives_max_diff"] = max(t["lives_max_diff"] or 0.0, float((a["lives"] - b["lives"]).abs().max()))
    rows = []
    for name, t in totals.items():
        n = t["images"]
        rows.append({"method": name, "images": n, "top1_agreement": t["agree"] / n,
                     "top1_fp32": 100 * t["top1_fp32"] / n, "top1_bf16": 100 * t["top1_bf16"] / n,
                     "logits_max_diff": t["logits_max_diff"],
                     "identical_selection": None if name == "dense" else t["same_selection"] / n,
                     "identical_sets_all_stages": t["image_sets"] / n if "stages" in t else None,
                     "identical_sets_per_stage": t["stage_sets"] / t["stages"] if "stages" in t else None,
                     "lives_max_diff": t["lives_max_diff"]})
    print(markdown_table(rows, ["method", "images", "top1_agreement", "top1_fp32", "top1_bf16", "logits_max_diff",
                                "identical_selection", "identical_sets_all_stages", "identical_sets_per_stage",
                                "lives_max_diff"], digits=4))
    write_json(args.json, {"rows": rows, "eta": args.eta, "threads": torch.get_num_threads(),
                           "torch": torch.__version__, "device": "cpu", "dtype": "bf16 autocast vs fp32"})
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; LF-ViT eta {args.eta:g}; "
          f"JSON: {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from vitbench.cli import run

    return run(build_parser(), command, argv)


if __name__ == "__main__":
    sys.exit(main())
