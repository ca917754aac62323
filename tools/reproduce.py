"""Side by side on the embedded default: ATS, LF-ViT and Life-Regression on the same validation set, with the same
FLOPs counter (``vitbench.flops``) and the same timer (``vitbench.throughput.compare``, all models in one run).

Runs each package's own evaluation (``ats-eval``, ``lfvit-eval``, ``liferegress-eval``) with a sweep, then times
the dense backbone and the three methods on the same batch of validation images, and writes

* ``docs/figures/``: one accuracy-vs-GFLOPs plot with the three curves, EViT and EViT + ATS as the static-pruning
  baseline (``ats-eval --baselines evit``) and the dense point, plus each package's
  figures (ATS kept tokens, LF-ViT regions and eta budget, Life-Regression life maps);
* the generated section of ``docs/RESULTS.md`` (between the ``embedded`` markers), with the commands.

Usage: ``nox -s reproduce`` (or ``python tools/reproduce.py`` with the three packages installed).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ATS_RHO = ("1.0", "0.95", "0.9", "0.87", "0.8", "0.72", "0.6", "0.5")
LR_RHO = ("0.9", "0.8", "0.7", "0.6", "0.5")
BEGIN, END = "<!-- embedded:begin -->", "<!-- embedded:end -->"


def threads_text(threads: int) -> str:
    """``1 thread`` / ``2 threads``."""
    return f"{threads} thread{'s' * (threads != 1)}"


def run_evaluations(work: Path, limit: int | None) -> dict:
    """The three packages' own CLIs, in this process; returns their JSON results (the schema of
    ``vitbench.evaluation``)."""
    from ats.evaluate import main as ats_eval
    from lfvit.evaluate import main as lfvit_eval
    from liferegress.evaluate import main as liferegress_eval

    lim = ["--limit", str(limit)] if limit else []
    commands = {
        "ats": (ats_eval, ["--rho", *ATS_RHO, "--no-throughput", *lim]),
        "ats_late": (ats_eval, ["--stages", "7-11", "--rho", "1", "0.87", "0.72", "--baselines", "evit",
                                "--no-throughput", *lim]),
        "lfvit": (lfvit_eval, ["--no-throughput", "--visualize", *map(str, range(8)), *lim]),
        "liferegress": (liferegress_eval, ["--rho", *LR_RHO, "--no-throughput", *lim]),
    }
    results = {}
    for name, (main, args) in commands.items():
        command = f"{name.split('_')[0]}-eval " + " ".join(args)
        args = [*args, "--output-dir", str(work / name), "--json", str(work / f"{name}.json")]
        print(f"\n$ {command} {' '.join(args[-4:])}", flush=True)
        start = time.perf_counter()
        if main(args):
            raise SystemExit(f"{name}-eval failed")
        results[name] = json.loads((work / f"{name}.json").read_text())
        results[name].update(wall_s=time.perf_counter() - start, command=command)
    return results


def _rows(res: dict, method: str) -> list[dict]:
    return [r for r in res["rows"] if r["method"] == method]


def ats_rows(res: dict, key: str = "ats", weights: str = "given") -> list[dict]:
    """ATS rows of one evaluation on the given weights (not fine-tuned) or on the shipped ``"fine-tuned"`` ones."""
    return [r for r in _rows(res[key], "ats") if r["setting"]["weights"] == weights]


def lfvit_two_stage(res: dict) -> dict:
    """LF-ViT's row with every image through both stages: it carries the eta budget curve."""
    return next(r for r in _rows(res["lfvit"], "lfvit") if "budget" in r["extra"])


def operating_points(res: dict) -> dict:
    """The setting of each method that the side-by-side table and the timing use: ATS in the released configuration
    (blocks 3..11, K = N, i.e. rho 1) off the shelf, and fine-tuned at rho 1 in blocks 3..11 and 7..11, LF-ViT at
    the cheapest eta within 0.5 point of its own two-stage accuracy (the paper's operating points trade no accuracy
    for compute), Life-Regression at rho 0.7 (the paper's setting)."""
    dense = _rows(res["ats"], "dense")[0]
    ats = next(r for r in ats_rows(res) if r["setting"].get("rho") == 1.0)
    ft = next(r for r in ats_rows(res, weights="fine-tuned") if r["setting"].get("rho") == 1.0)
    ft_late = next(r for r in ats_rows(res, "ats_late", "fine-tuned") if r["setting"].get("rho") == 1.0)
    two = lfvit_two_stage(res)
    budget = two["extra"]["budget"]
    full = max(dense["top1"], two["extra"]["focus_top1"])
    close = [r for r in budget if r["top1"] >= full - 0.5]
    lf = min(close, key=lambda r: r["gflops"]) if close else max(budget, key=lambda r: r["top1"])
    lr = next(r for r in _rows(res["liferegress"], "liferegress") if r["setting"]["keep_rate"] == 0.7)
    return {"dense": dense, "ats": ats, "ats_ft": ft, "ats_ft_late": ft_late, "lfvit": lf, "liferegress": lr}


def time_side_by_side(points: dict, batch: int, repeats: int) -> list[dict]:
    """Dense backbone, ATS, LF-ViT early exit and Life-Regression (hard) on one batch of validation images."""
    import ats
    import vitbench
    from ats.options import SHIPPED
    from ats.paper import LATE
    from lfvit.evaluate import LFEvalConfig
    from lfvit.evaluate import build_model as build_lfvit
    from liferegress.evaluate import LifeEvalConfig, build_models
    from vitbench.evaluation import EvalConfig
    from vitbench.throughput import compare

    dense = vitbench.create_model("vit_digits_patch8_112", pretrained=True).eval()
    size = dense.patch_embed.img_size[0]
    cfg = dense.pretrained_cfg
    loader = vitbench.build_eval_loader("digits", size, cfg["mean"], cfg["std"], batch_size=batch, crop_pct=1.0,
                                        num_workers=0)
    images = next(iter(loader))[0]
    patched = ats.apply(copy.deepcopy(dense), rho=1.0)
    shipped = next(w.path for w in SHIPPED if w.stages == LATE)
    late = ats.apply(vitbench.create_model("vit_digits_patch8_112", checkpoint=str(shipped)).eval(), stages=LATE,
                     rho=1.0)
    lf = build_lfvit(EvalConfig(), LFEvalConfig())
    eta = points["lfvit"]["eta"]
    _, lr_models = build_models(EvalConfig(), LifeEvalConfig(keep_rate=(0.7,)))
    names = {"dense": "dense", "ats": "ATS rho=1", "ats_ft_late": "ATS fine-tuned 7-11 rho=1",
             "lfvit": f"LF-ViT eta={eta:g}", "liferegress": "Life-Regression rho=0.7"}
    fns = {names["dense"]: dense, names["ats"]: patched, names["ats_ft_late"]: late,
           names["lfvit"]: lambda x: lf.forward_early_exit(x, eta), names["liferegress"]: lr_models[0.7]}
    with torch.inference_mode():
        rows = compare(fns, images, baseline="dense", warmup=2, repeats=repeats)
    gflops = {names[k]: p["gflops"] for k, p in points.items() if k in names}
    for row in rows:
        row.update(batch=images.shape[0], threads=torch.get_num_threads(),
                   ideal=gflops["dense"] / gflops[row["name"]])
    return rows


def plot(res: dict, path: Path) -> Path:
    from vitbench.figures import save

    import matplotlib.pyplot as plt

    dense = _rows(res["ats"], "dense")[0]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for key, weights, style, label in (("ats", "given", "o-", "ATS blocks 3..11 (rho sweep, no fine-tuning)"),
                                       ("ats", "fine-tuned", "o--", "ATS blocks 3..11, fine-tuned"),
                                       ("ats_late", "given", "^-", "ATS blocks 7..11, no fine-tuning"),
                                       ("ats_late", "fine-tuned", "^--", "ATS blocks 7..11, fine-tuned")):
        a = sorted(ats_rows(res, key, weights), key=lambda r: r["gflops"])
        ax.plot([r["gflops"] for r in a], [r["top1"] for r in a], style, label=label)
    for method, style, label in (("evit", "D", "EViT keep 0.7 (static pruning; off the shelf, fine-tuned)"),
                                 ("evit_ats", "P", "EViT + ATS (Table A.5 K; off the shelf, fine-tuned)")):
        e = _rows(res["ats_late"], method)  # ats-eval --baselines evit
        ax.plot([r["gflops"] for r in e], [r["top1"] for r in e], style, linestyle="none", label=label)
    lf = sorted(lfvit_two_stage(res)["extra"]["budget"], key=lambda r: r["gflops"])
    ax.plot([r["gflops"] for r in lf], [r["top1"] for r in lf], "-", label="LF-ViT (eta sweep)")
    lr = sorted(_rows(res["liferegress"], "liferegress"), key=lambda r: r["gflops"])
    ax.plot([r["gflops"] for r in lr], [r["top1"] for r in lr], "s-", label="Life-Regression (rho sweep)")
    ax.plot([dense["gflops"]], [dense["top1"]], "k*", markersize=12, label="dense backbone")
    ax.set_xlabel("mean GFLOPs per image (GMACs)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"vit_digits_patch8_112, embedded digits ({dense['images']} validation images): accuracy vs compute",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return save(fig, path, dpi=120)


def _collect_figures(res: dict, points: dict, figures: Path) -> list[str]:
    """Copy the figures the rows name into ``figures/`` under stable names."""
    smallest = min(_rows(res["liferegress"], "liferegress"), key=lambda r: r["setting"]["keep_rate"])
    two = lfvit_two_stage(res)
    wanted = [(points["ats"], "tokens", "ats_tokens_rho1.png"),
              (points["ats"], "histogram", "ats_token_histogram_rho1.png"),
              (two, "regions", "lfvit_regions.png"), (two, "budget", "lfvit_budgeted.png"),
              (smallest, "life_maps", f"liferegress_life_maps_rho{smallest['setting']['keep_rate']:g}.png")]
    copied = []
    for row, kind, dst in wanted:
        src = row["figures"].get(kind)
        if src:
            shutil.copyfile(src, figures / dst)
            copied.append(dst)
    return copied


def _f(x, digits=1):
    return "–" if x is None else f"{x:.{digits}f}"


def load_text(load: list[float] | None) -> str:
    """``load average 1.2 / 1.0 / 0.9 (1, 5, 15 min) on 2 cores`` for the report (``load average unknown``)."""
    if load is None:
        return "load average unknown"
    return f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1, 5, 15 min) on {os.cpu_count()} cores"


def report(res: dict, points: dict, timing: list[dict], figures: list[str], env: str) -> str:
    dense = points["dense"]
    d1, dg = dense["top1"], dense["gflops"]
    ats, lf, lr = points["ats"], points["lfvit"], points["liferegress"]
    lr_dense = _rows(res["liferegress"], "dense")[0]
    two = lfvit_two_stage(res)
    lf_full, hits, anytime = two["gflops"], two["extra"], two["extra"]
    lines = [
        BEGIN,
        "## Side by side on the embedded default (`nox -s reproduce`)",
        "",
        f"Generated by `nox -s reproduce` ({env}). Same validation set (embedded digits, {dense['images']} images),",
        "same FLOPs counter (`vitbench.flops`), one timer run for all models (`vitbench.throughput.compare`).",
        "",
        "| method | setting | top-1 | Δ vs dense | GFLOPs | GFLOPs saved | target |",
        "|---|---|---|---|---|---|---|",
        f"| dense backbone `vit_digits_patch8_112` | – | {d1:.2f} | – | {dg:.4f} | – | ≥ 90 % top-1 |",
        f"| ATS, no fine-tuning | blocks 3..11, K = N (rho 1) | {ats['top1']:.2f} | {ats['top1'] - d1:+.2f} | "
        f"{ats['gflops']:.4f} | {100 * (1 - ats['gflops'] / dg):.1f} % | reported (paper: −0.6 pt, 35 % saved) |",
        *(f"| ATS, shipped fine-tuned weights | {where} | {r['top1']:.2f} | {r['top1'] - d1:+.2f} | "
          f"{r['gflops']:.4f} | {100 * (1 - r['gflops'] / dg):.1f} % | {target} |"
          for r, where, target in ((points["ats_ft"], "blocks 3..11, rho 1 (released placement)", "–"),
                                   (points["ats_ft_late"], "blocks 7..11, rho 1 (the paper's GFLOPs share)",
                                    "≥ 30 % saved within 1.0 pt"))),
        f"| LF-ViT (m 5, early exit) | eta {lf['eta']:g} ({100 * lf['focus_fraction']:.1f} % reach focus) | "
        f"{lf['top1']:.2f} | {lf['top1'] - d1:+.2f} | {lf['gflops']:.4f} | {100 * (1 - lf['gflops'] / dg):.1f} % | "
        "≥ 50 % saved within 0.5 pt |",
        f"| Life-Regression (hard pruning) | rho 0.7, blocks 4/7/10 | {lr['top1']:.2f} | {lr['top1'] - d1:+.2f} | "
        f"{lr['gflops']:.4f} | {100 * (1 - lr['gflops'] / dg):.1f} % | within 1.0 pt |",
        "",
        "Each method's own reference: LF-ViT every image through both stages (anytime) "
        f"{_f(anytime['location_top1'], 2)} after localization / "
        f"{_f(anytime['focus_top1'], 2)} after focus, at {lf_full:.4f} GFLOPs "
        "(LF-ViT is trained on, not just applied to, the backbone, so it can beat it); Life-Regression's backbone "
        f"after its two stages, unpruned: {lr_dense['top1']:.2f}. The LF-ViT row uses the cheapest eta within 0.5 "
        "point of LF-ViT's two-stage accuracy.",
        "",
        "### Accuracy vs GFLOPs",
        "",
        "![accuracy vs GFLOPs](figures/accuracy_vs_gflops.png)",
        "",
        "| ATS rho | top-1 | GFLOPs | fine-tuned top-1 |  | LF-ViT eta | top-1 | GFLOPs | reach focus |  | "
        "Life-Regression rho | top-1 | "
        "GFLOPs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    a_rows = ats_rows(res)
    tuned = {r["setting"]["rho"]: r for r in ats_rows(res, weights="fine-tuned")}
    lf_rows = [r for r in two["extra"]["budget"] if round(r["eta"] * 100) % 10 == 0 or r == lf]
    lr_rows = _rows(res["liferegress"], "liferegress")
    for i in range(max(len(a_rows), len(lf_rows), len(lr_rows))):
        a = a_rows[i] if i < len(a_rows) else None
        f = lf_rows[i] if i < len(lf_rows) else None
        r = lr_rows[i] if i < len(lr_rows) else None
        lines.append(" | ".join([
            "", f"{a['setting']['rho']:g}" if a else "", _f(a and a["top1"], 2), _f(a and a["gflops"], 4),
            _f(a and tuned.get(a["setting"]["rho"], {}).get("top1"), 2), "",
            f"{f['eta']:g}" if f else "", _f(f and f["top1"], 2), _f(f and f["gflops"], 4),
            f"{100 * f['focus_fraction']:.1f} %" if f else "", "", f"{r['setting']['keep_rate']:g}" if r else "",
            _f(r and r["top1"], 2), _f(r and r["gflops"], 4), ""]).strip())
    lines += [
        "",
        f"### Throughput, one run (batch {timing[0]['batch']} validation images, {timing[0]['device']}, fp32, "
        f"{threads_text(timing[0]['threads'])}, median of repeats, {load_text(timing[0].get('load_average'))})",
        "",
        "| model | img/s | speedup vs dense (ratio of median times) | min-max of per-repeat ratios | ideal (GFLOPs "
        "ratio) |",
        "|---|---|---|---|---|",
    ]
    for row in timing:
        lo, hi = row["speedup_spread"]
        lines.append(f"| {row['name']} | {row['img_s']:.0f} | {row['speedup']:.2f}x | {lo:.2f}-{hi:.2f}x | "
                     f"{row['ideal']:.2f}x |")
    lines += [
        "",
        "The ATS and LF-ViT ideals use the mean GFLOPs over the whole validation set; the timed batch is its first "
        f"{timing[0]['batch']} images.",
        "",
        "### Localization against the ground-truth digit boxes",
        "",
        "| method | measure | measured | random baseline |",
        "|---|---|---|---|",
        f"| LF-ViT | chosen m x m window contains the box centre | {_f(hits.get('hit_rate'))} % | "
        f"{_f(hits.get('random_window_hit_rate'))} % (uniform window) |",
        f"| ATS rho 1 | share of tokens kept by block 11 that lie on the digit | {_f(ats['extra'].get('on_object'))} % "
        f"| {_f(ats['extra'].get('on_object_random'))} % (uniform tokens) |",
        f"| Life-Regression rho 0.7 | share of the longest-lived tokens (kept after block 10) on the digit | "
        f"{_f(lr['extra'].get('kept_in_box'))} % | {_f(lr['extra'].get('all_in_box'))} % (uniform tokens) |",
        "",
        "A token is on the digit when its patch centre lies in the box; LF-ViT's hit uses the box centre's coarse "
        "cell.",
        "",
        "### Commands and wall time (one process ran them all)",
        "",
    ]
    lines += [f"- `{res[n]['command']}`: {res[n]['wall_s']:.0f} s" for n in ("ats", "ats_late", "lfvit", "liferegress")]
    lines += ["", "Figures: " + ", ".join(f"[{f}](figures/{f})" for f in ["accuracy_vs_gflops.png", *figures]), END]
    return "\n".join(lines) + "\n"


def write_section(results_md: Path, section: str) -> None:
    text = results_md.read_text() if results_md.is_file() else "# Results\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section.rstrip("\n") + rest.split(END, 1)[1]
    else:
        marker = "\n## "
        cut = text.find(marker, text.find(marker) + 1) if text.count(marker) > 1 else len(text)
        text = text[:cut].rstrip("\n") + "\n\n" + section + text[cut:]
    tmp = results_md.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(results_md)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--docs", default=str(ROOT / "docs"), help="writes DOCS/RESULTS.md's section and DOCS/figures/")
    p.add_argument("--work-dir", default=str(ROOT / "runs" / "reproduce"), help="raw outputs of the three evaluations")
    p.add_argument("--limit", type=int, default=None, help="first N validation images only (quick check)")
    p.add_argument("--timing-batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    work, docs = Path(args.work_dir), Path(args.docs)
    work.mkdir(parents=True, exist_ok=True)
    res = run_evaluations(work, args.limit)
    points = operating_points(res)
    timing = time_side_by_side(points, args.timing_batch, args.repeats)
    figures_dir = docs / "figures"
    plot(res, figures_dir / "accuracy_vs_gflops.png")
    figures = _collect_figures(res, points, figures_dir)
    env = res["ats"]["environment"]
    env = f"torch {env['torch']}, timm {env['timm']}, device {env['device']}, {threads_text(env['threads'])}"
    section = report(res, points, timing, figures, env)
    write_section(docs / "RESULTS.md", section)
    (work / "side_by_side.json").write_text(json.dumps({"points": points, "timing": timing}, indent=2))
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
