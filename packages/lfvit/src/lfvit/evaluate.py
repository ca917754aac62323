"""``lfvit-eval``: LF-ViT's accuracy, expected GFLOPs, early-exit throughput, eta budget and region figures.

Rows (one timing run for all): the dense backbone (LF-ViT's shared weights at full resolution; timing reference),
the two-stage forward (every image through both stages, eta = 1: the localization / focus top-1, the eta budget
curve of Fig. 4 / Fig. 7 from its stored softmax outputs as released, region hits on data with boxes, the Fig. 6
region figure), and real early exit at each ``--eta`` (Table 2's operating points by default). ``--region-variants``
adds Table 6's region-selection variants. ``--flops-only``: per-stage GFLOPs, no data or weights needed. ``--model``
takes the backbone's name (``deit_small_patch16_224``) or the registered LF-ViT one (``lfvit_...``).
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from vitbench import evaluation as ev
from vitbench.cli import check_eval_input, renamed, run

from .checkpoint import load_lfvit_checkpoint
from .flops import dense_gflops, stage_flops
from .localization import REGION_MODES
from .model import (DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_REGION_MODE, DEFAULT_REGION_SIZE, LFVisionTransformer,
                    check_eta)
from .paper import PAPER_MODELS, paper_numbers

BUDGET_ETAS = tuple(round(0.01 * p, 2) for p in range(100))


@dataclass(frozen=True)
class LFEvalConfig:
    """LF-ViT's own flags; the common ones are :class:`vitbench.evaluation.EvalConfig`."""

    region_size: int = DEFAULT_REGION_SIZE
    alpha: float = DEFAULT_ALPHA
    beta: float = DEFAULT_BETA
    region_mode: str = DEFAULT_REGION_MODE
    eta: tuple[float, ...] = (0.47, 0.61, 0.76)
    variants: bool = False
    loss: str = "ce_kl"

    def __post_init__(self):
        for eta in self.eta:
            check_eta(eta)
        if self.region_mode not in REGION_MODES:
            raise ValueError(f"unknown --region-mode {self.region_mode!r}; choose from {REGION_MODES}")

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> LFEvalConfig:
        return ev.config_from_args(cls, argparse.Namespace(**vars(ns), variants=ns.region_variants))


def build_parser() -> argparse.ArgumentParser:
    d = LFEvalConfig()
    p = ev.build_parser("lfvit-eval", __doc__, "runs/lfvit-eval")
    g = p.add_argument_group("LF-ViT")
    g.add_argument("--region-size", type=int, default=d.region_size,
                   help="m, the side of the NGCA window (paper: 4, 5, 6; 8 at g 9; default: %(default)s)")
    g.add_argument("--alpha", type=float, default=d.alpha,
                   help="K = ceil(alpha m^2) coarse cells are refined (default: %(default)s)")
    g.add_argument("--beta", type=float, default=d.beta, help="GCA moving-average weight, Eq. 8 (default: %(default)s)")
    g.add_argument("--region-mode", default=d.region_mode, choices=REGION_MODES,
                   help="region selection, Table 6 (default: %(default)s)")
    g.add_argument("--eta", type=float, nargs="+", default=list(d.eta),
                   help="early-exit confidence thresholds in [0, 1], one row each (default: 0.47 0.61 0.76)")
    g.add_argument("--region-variants", action="store_true",
                   help="add Table 6's region-selection variants (default: off)")
    renamed(g, "--variants", "--region-variants")
    g.add_argument("--loss", default=d.loss, choices=("ce_kl", "ce_ce"),
                   help="the loss the checkpoint was trained with (picks Table 7's paper row; default: %(default)s)")
    return p


def lfvit_name(model: str) -> str:
    """The registered LF-ViT model for a backbone name (``deit_small_patch16_224`` -> ``lfvit_deit_...``)."""
    if model.startswith("lfvit_"):
        return model
    if f"lfvit_{model}" in timm.list_models("lfvit_*"):
        return f"lfvit_{model}"
    raise ValueError(f"no LF-ViT model for {model!r}; choose from {timm.list_models('lfvit_*')}")


def build_model(cfg: ev.EvalConfig, opts: LFEvalConfig) -> LFVisionTransformer:
    """The LF-ViT of ``cfg.model`` with ``--checkpoint`` (either layout) or, for the embedded model, its shipped
    weights."""
    name = lfvit_name(cfg.model)
    embedded = name == "lfvit_vit_digits_patch8_112" and cfg.checkpoint is None and cfg.num_classes is None
    if not (cfg.checkpoint or embedded or cfg.flops_only):
        raise ValueError(f"--checkpoint PATH is required for {name} (there are no hosted LF-ViT weights)")
    kwargs = {k: v for k, v in (("num_classes", cfg.num_classes), ("img_size", cfg.img_size)) if v is not None}
    model = timm.create_model(name, pretrained=cfg.pretrained or (embedded and not cfg.flops_only),
                              region_size=opts.region_size, alpha=opts.alpha, beta=opts.beta,
                              region_mode=opts.region_mode, **kwargs)
    ev.check_img_size(model, cfg.img_size)
    if cfg.checkpoint and not cfg.flops_only:
        load_lfvit_checkpoint(model, cfg.checkpoint)
    return model.eval()


def anytime(p_loc: torch.Tensor, p_focus: torch.Tensor, y: torch.Tensor) -> dict:
    """Top-1 (%) of each stage with every image through both stages."""
    return {"location_top1": 100 * (p_loc.argmax(-1) == y).float().mean().item(),
            "focus_top1": 100 * (p_focus.argmax(-1) == y).float().mean().item()}


def budgeted(p_loc: torch.Tensor, p_focus: torch.Tensor, y: torch.Tensor, flops, etas) -> list[dict]:
    """Eta sweep as released (``dynamic_evaluate``): expected GFLOPs, top-1 and per-stage counts."""
    conf, pred_l = p_loc.max(-1)
    pred_f = p_focus.argmax(-1)
    rows = []
    for eta in etas:
        exit_ = conf >= eta
        pred = torch.where(exit_, pred_l, pred_f)
        frac = 1.0 - exit_.float().mean().item()
        rows.append({"eta": eta, "top1": 100 * (pred == y).float().mean().item(), "gflops": flops.expected(frac),
                     "focus_fraction": frac, "n_location": int(exit_.sum()), "n_focus": int((~exit_).sum()),
                     "correct_location": int(((pred_l == y) & exit_).sum()),
                     "correct_focus": int(((pred_f == y) & ~exit_).sum())})
    return rows


def region_hits(window: torch.Tensor, boxes: torch.Tensor, model: LFVisionTransformer) -> dict:
    """Share of images whose chosen window contains the box centre, and the random-window expectation."""
    cell_px = model.patch_embed.patch_size[0] * 2
    g, m = model.grid, model.region_size
    cx = ((boxes[:, 0] + boxes[:, 2]) / 2 / cell_px).floor().long().clamp(0, g - 1)
    cy = ((boxes[:, 1] + boxes[:, 3]) / 2 / cell_px).floor().long().clamp(0, g - 1)
    r0, c0 = window[:, 0], window[:, 1]
    hit = (cy >= r0) & (cy < r0 + m) & (cx >= c0) & (cx < c0 + m)
    span = g - m + 1

    def covering(c):  # number of window offsets along one axis that contain coordinate c
        return (torch.minimum(c, torch.tensor(span - 1)) - torch.clamp(c - m + 1, min=0) + 1).float()

    random = (covering(cy) * covering(cx) / (span * span)).mean().item()
    return {"hit_rate": 100 * hit.float().mean().item(), "random_window_hit_rate": 100 * random}


def plot_budget(rows: list[dict], dense: float, path: Path, title: str) -> Path:
    """Fig. 4 (top-1 vs expected GFLOPs) and Fig. 7 (images / correct images per stage vs eta) as one PNG."""
    # matplotlib (also behind vitbench.figures) only when a figure is drawn: evaluating needs no plotting stack
    from vitbench.figures import save

    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot([r["gflops"] for r in rows], [r["top1"] for r in rows], ".-", label="LF-ViT early exit (eta 0.00-0.99)")
    a.axvline(dense, color="grey", ls="--", label=f"dense backbone {dense:.3g} G")
    a.set_xlabel("expected GFLOPs per image")
    a.set_ylabel("top-1 (%)")
    a.set_title("accuracy vs compute (Fig. 4)", fontsize=9)
    a.legend(fontsize=8)
    etas = [r["eta"] for r in rows]
    b.plot(etas, [r["n_location"] for r in rows], label="finish at localization")
    b.plot(etas, [r["correct_location"] for r in rows], "--", label="... of them correct")
    b.plot(etas, [r["n_focus"] for r in rows], label="finish at focus")
    b.plot(etas, [r["correct_focus"] for r in rows], "--", label="... of them correct")
    b.set_xlabel("eta (exit after localization when max softmax >= eta)")
    b.set_ylabel("images")
    b.set_title("images per exit stage (Fig. 7)", fontsize=9)
    b.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save(fig, path, dpi=120)


def plot_regions(dataset, record: dict, order: list[int], model: LFVisionTransformer, path: Path,
                 title: str) -> Path:
    """Fig. 6: images with the chosen m x m window and the coarse cells refined at full resolution."""
    # matplotlib (also behind vitbench.figures) only when a figure is drawn
    from vitbench.figures import save

    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    cell = model.patch_embed.patch_size[0] * 2
    size = model.patch_embed.img_size[0]
    cols = min(4, len(order))
    nrows = -(-len(order) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3 * cols, 3 * nrows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (i, row) in zip(axes.flat, order):
        img = dataset.image(i).convert("RGB").resize((size, size))
        ax.imshow(np.asarray(img))
        shade = np.full((model.grid, model.grid), 0.6)
        for c in record["cells"][row].tolist():
            shade[c // model.grid, c % model.grid] = 0.0
        overlay = np.zeros((model.grid, model.grid, 4))
        overlay[..., :3], overlay[..., 3] = 0.5, shade
        ax.imshow(overlay, extent=(0, size, size, 0), interpolation="nearest", zorder=2)
        r0, c0 = record["window"][row].tolist()
        ax.add_patch(patches.Rectangle((c0 * cell, r0 * cell), model.region_size * cell, model.region_size * cell,
                                       fill=False, ec="red", lw=2, zorder=3))
        ax.set_title(f"#{i}: label {int(record['labels'][row])}, p_l {record['p_loc'][row].max():.2f}", fontsize=8)
    handles = [patches.Patch(fill=False, ec="red", lw=2, label=f"chosen {model.region_size}x{model.region_size} "
                             "window (NGCA argmax)"),
               patches.Patch(color=(0.5, 0.5, 0.5, 0.6), label="coarse cell not refined (reused at half resolution)"),
               patches.Patch(fill=False, ec="black", label=f"clear: the {model.num_cells} refined cells")]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle(f"{title}\np_l = localization-stage confidence (max softmax); the image exits early when "
                 "p_l >= eta", fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return save(fig, path)


def dense_backbone(model: LFVisionTransformer) -> torch.nn.Module:
    """The dense ViT with LF-ViT's shared weights and fine positional table (the backbone it accelerates)."""
    dense = VisionTransformer(img_size=model.patch_embed.img_size, patch_size=model.patch_embed.patch_size,
                              embed_dim=model.embed_dim, depth=len(model.blocks),
                              num_heads=model.blocks[0].attn.num_heads, num_classes=model.num_classes,
                              qkv_bias=model.blocks[0].attn.qkv.bias is not None)
    own = dense.state_dict()
    dense.load_state_dict({k: v for k, v in model.state_dict().items() if k in own})
    return dense.eval()


def _two_stage(cfg, model, loader, spec, series, point, params, paper, main: bool) -> ev.Setting:
    """Every image through both stages: logits of the focus stage; on ``main`` the budget curve and figures."""
    flops = stage_flops(model)
    rec: dict[str, list] = {k: [] for k in ("p_loc", "p_focus", "labels", "index", "window", "cells")}

    def step(images, labels, index):
        z = model(images)
        r = model.record
        for key, value in (("p_loc", z.location.float().softmax(-1)), ("p_focus", z.focus.float().softmax(-1)),
                           ("labels", labels), ("index", index), ("window", r.window), ("cells", r.cells)):
            rec[key].append(value.cpu())
        return z.focus, torch.tensor(flops.cumulative)

    def finish(row: dict, out_dir: Path) -> None:
        r = {k: torch.cat(v) for k, v in rec.items()}
        row["extra"].update(anytime(r["p_loc"], r["p_focus"], r["labels"]), focus_fraction=1.0)
        boxes = spec.boxes(loader.dataset, r["index"])
        if boxes is not None:
            row["extra"].update(region_hits(r["window"], boxes, model))
        if not main:
            return
        row["extra"]["budget"] = budgeted(r["p_loc"], r["p_focus"], r["labels"], flops, BUDGET_ETAS)
        title = (f"LF-ViT {cfg.model} (m {model.region_size}, alpha {model.alpha:g}), {cfg.data} "
                 f"({row['images']} images)")
        row["figures"]["budget"] = str(plot_budget(row["extra"]["budget"], dense_gflops(model),
                                                   out_dir / "budgeted.png", title))
        where = {int(i): j for j, i in enumerate(r["index"].tolist())}
        order = [(i, where[i]) for i in cfg.visualize if i in where]
        if order:
            row["figures"]["regions"] = str(plot_regions(loader.dataset, r, order, model, out_dir / "regions.png",
                                                         title))

    return ev.Setting("lfvit", series, point, params, model, step=step if loader else None, gflops=flops.cumulative,
                      finish=finish if loader else None, paper=paper,
                      extra={"location_gflops": flops.location, "focus_tokens": flops.focus_tokens})


def _early_exit(model, eta: float, params: dict, paper: dict) -> ev.Setting:
    """Real early exit at ``eta``: per-image GFLOPs from the stage each image finished at."""
    flops = stage_flops(model)
    counts = {"n_location": 0, "n_focus": 0, "correct_location": 0, "correct_focus": 0}

    def forward(x):
        return model.forward_early_exit(x, eta)

    def step(images, labels, index):
        logits = forward(images)
        go = model.record.exit_stage.bool()
        right = logits.argmax(-1) == labels
        counts["n_focus"] += int(go.sum())
        counts["n_location"] += int((~go).sum())
        counts["correct_focus"] += int((right & go).sum())
        counts["correct_location"] += int((right & ~go).sum())
        return logits, flops.location + go.double() * flops.focus

    def finish(row: dict, out_dir: Path) -> None:
        row["extra"].update(counts, focus_fraction=counts["n_focus"] / row["images"])

    return ev.Setting("lfvit", "LF-ViT early exit", f"eta {eta:g}", {**params, "eta": eta}, model, step=step,
                      gflops=flops.cumulative, timed=forward, finish=finish, paper=paper)


def build_settings(cfg, opts, model, loader, spec) -> list[ev.Setting]:
    params = {"m": model.region_size, "alpha": model.alpha, "beta": model.beta, "region_mode": opts.region_mode}
    g = model.grid

    def paper(**kw):  # the paper's numbers beside its own models at their own resolution only
        if lfvit_name(cfg.model) not in PAPER_MODELS or cfg.img_size is not None:
            return {}
        return paper_numbers(g, model.region_size, alpha=model.alpha, beta=model.beta, loss=opts.loss, **kw)

    dense = dense_backbone(model)
    settings = [ev.Setting("dense", "dense", "backbone (timing reference)", {}, dense, gflops=dense_gflops(model),
                           paper=paper(dense=True), evaluate=False),
                _two_stage(cfg, model, loader, spec, "LF-ViT two-stage", "eta 1", {**params, "eta": 1.0},
                           paper(region_mode=opts.region_mode), main=True)]
    if loader is not None:
        settings += [_early_exit(model, eta, params, paper(eta=eta)) for eta in opts.eta]
    if opts.variants:
        for mode in REGION_MODES:
            variant = copy.deepcopy(model)
            variant.set_lf_options(region_mode=mode)
            variant.region_generator = torch.Generator().manual_seed(cfg.seed)
            settings.append(_two_stage(cfg, variant, loader, spec, "LF-ViT region selection", mode,
                                       {**params, "region_mode": mode, "eta": 1.0}, paper(region_mode=mode),
                                       main=False))
    return settings


def command(args: argparse.Namespace) -> int:
    cfg, opts = ev.EvalConfig.from_args(args), LFEvalConfig.from_args(args)
    ev.prepare_outputs(cfg)
    model = build_model(cfg, opts)
    ev.harness(cfg, opts, model, lambda loader, spec: build_settings(cfg, opts, model, loader, spec),
           figure_patterns=("budgeted.png", "regions.png"))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), command, argv, check=check_input)


def check_input(args: argparse.Namespace) -> None:
    """``--img-size`` against the LF-ViT of ``--model`` (parse time, before any work)."""
    check_eval_input(args, lfvit_name(args.model))


if __name__ == "__main__":
    raise SystemExit(main())
