"""``lfvit-eval``: the paper's evaluation modes.

* ``anytime``: top-1 of the localization and focus stages (every image through both, eta = 1).
* ``budgeted``: eta sweep (exit after localization if max softmax >= eta) -> expected GFLOPs vs top-1 (Fig. 4)
  and images finishing / correct at each stage (Fig. 7), from the stored softmax outputs as released.
* ``regions``: Fig. 6-style visualisation of the chosen regions, and on data with boxes (the embedded digits)
  the region hit rate (window contains the box centre) next to the random-window baseline.
* ``variants``: Table 6 region-selection variants (negative NGCA, max GCA, min GCA, random).
* ``throughput``: real early exit at ``--eta`` vs the dense backbone vs the two-stage forward, timed in one run.
* ``--flops-only``: per-stage cumulative GFLOPs, no data or weights needed.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import timm
import torch

from .checkpoint import load_lfvit_checkpoint
from .flops import dense_gflops, stage_flops
from .localization import REGION_MODES
from .model import LFVisionTransformer, check_eta
from .paper import TABLES, paper_rows

MODES = ("anytime", "budgeted", "regions", "variants", "throughput")
DEFAULT_MODEL = "lfvit_vit_digits_patch8_112"
FLOPS_DEFAULT_MODEL = "lfvit_deit_small_patch16_224"
WEIGHTS_DIR = Path(__file__).parent / "weights"
EMBEDDED_WEIGHTS = WEIGHTS_DIR / "lfvit_vit_digits_patch8_112.safetensors"


@dataclass(frozen=True)
class EvalConfig:
    model: str = DEFAULT_MODEL
    data: str = "digits"
    checkpoint: str | None = None
    region_size: int = 5
    alpha: float = 0.88
    beta: float = 0.99
    region_mode: str = "ngca"
    modes: tuple[str, ...] = ("anytime", "budgeted", "regions", "throughput")
    eta: float = 0.47
    batch_size: int = 128
    limit: int | None = None
    num_workers: int = 2
    output_dir: str = "runs/lfvit_eval"
    json: str | None = None
    throughput_batch: int = 256
    warmup: int = 2
    repeats: int = 5
    num_visualise: int = 16
    seed: int = 0
    flops_only: bool = False
    device: str = "cpu"
    paper: tuple[str, ...] = ()
    loss: str = "ce_kl"
    etas: tuple[float, ...] = field(default_factory=lambda: tuple(round(0.01 * p, 2) for p in range(100)))

    def __post_init__(self):
        check_eta(self.eta)
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ValueError(f"unknown mode(s) {bad}; choose from {MODES}")
        if self.region_mode not in REGION_MODES:
            raise ValueError(f"unknown --region-mode {self.region_mode!r}; choose from {REGION_MODES}")
        for name in ("batch_size", "throughput_batch", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        bad = [t for t in self.paper if t not in TABLES]
        if bad:
            raise ValueError(f"unknown --paper table(s) {bad}; choose from {TABLES}")
        if self.limit is not None and self.limit < 1:
            raise ValueError("--limit must be >= 1")

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> EvalConfig:
        model = ns.model or (FLOPS_DEFAULT_MODEL if ns.flops_only else DEFAULT_MODEL)
        modes = tuple(m.strip() for m in ns.modes.split(",") if m.strip())
        return cls(model=model, data=ns.data, checkpoint=ns.checkpoint, region_size=ns.region_size,
                   alpha=ns.alpha, beta=ns.beta, region_mode=ns.region_mode, modes=modes, eta=ns.eta,
                   batch_size=ns.batch_size, limit=ns.limit, num_workers=ns.num_workers, output_dir=ns.output_dir,
                   json=ns.json, throughput_batch=ns.throughput_batch, warmup=ns.warmup, repeats=ns.repeats,
                   num_visualise=ns.num_visualise, seed=ns.seed, flops_only=ns.flops_only, device=ns.device,
                   paper=tuple(t.strip() for t in ns.paper.split(",") if t.strip()), loss=ns.loss)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lfvit-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help=f"registered LF-ViT (default: {DEFAULT_MODEL}; with --flops-only: {FLOPS_DEFAULT_MODEL}); "
                        "also lfvit_deit_small_patch16_288 (LF-ViT*, g 9)")
    p.add_argument("--data", default="digits", help="digits | imagefolder:PATH | hf:NAME[:CONFIG] | arrow:PATH")
    p.add_argument("--checkpoint", default=None,
                   help="LF-ViT weights, ours or the released layout (.pth {'model': ...} or .safetensors); "
                        "default for the embedded model: the shipped embedded weights")
    p.add_argument("--region-size", type=int, default=5,
                   help="m, the side of the NGCA window (paper: 4, 5, 6; 8 at g 9)")
    p.add_argument("--alpha", type=float, default=0.88, help="K = ceil(alpha m^2) coarse cells are refined")
    p.add_argument("--beta", type=float, default=0.99, help="GCA moving-average weight (Eq. 8)")
    p.add_argument("--region-mode", default="ngca", choices=REGION_MODES, help="region selection (Table 6)")
    p.add_argument("--modes", default="anytime,budgeted,regions,throughput",
                   help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--eta", type=float, default=0.47,
                   help="confidence threshold in [0, 1] for throughput and region visualisation")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N validation images")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--output-dir", default="runs/lfvit_eval", help="figures and results.json go here")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--throughput-batch", type=int, default=256, help="batch size for timing (paper: 1024)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up calls per model")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per model (median reported)")
    p.add_argument("--num-visualise", type=int, default=16, help="images in the region figure")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-region variant and baseline")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--paper", default="", help=f"comma-separated paper tables to print next to the measured "
                   f"numbers: {','.join(TABLES)} (ImageNet figures; needs the matching --modes)")
    p.add_argument("--loss", default="ce_kl", choices=("ce_kl", "ce_ce"),
                   help="the loss the checkpoint was trained with (labels the Table 7 row)")
    p.add_argument("--flops-only", action="store_true",
                   help="print per-stage cumulative GFLOPs and exit (no data or weights needed)")
    return p


def build_model(cfg: EvalConfig, load_weights: bool = True) -> LFVisionTransformer:
    """Create the LF-ViT of ``cfg`` and load its checkpoint (the shipped embedded weights by default)."""
    try:
        model = timm.create_model(cfg.model, region_size=cfg.region_size, alpha=cfg.alpha, beta=cfg.beta,
                                  region_mode=cfg.region_mode)
    except RuntimeError as e:
        raise ValueError(f"{e}; LF-ViT models: {timm.list_models('lfvit_*')}") from e
    if not isinstance(model, LFVisionTransformer):
        raise ValueError(f"{cfg.model} is not an LF-ViT model; choose from {timm.list_models('lfvit_*')}")
    if load_weights:
        path = cfg.checkpoint
        if path is None:
            if cfg.model != DEFAULT_MODEL:
                raise ValueError(f"--checkpoint is required for {cfg.model} (no hosted LF-ViT weights)")
            if not EMBEDDED_WEIGHTS.is_file():
                raise FileNotFoundError(
                    f"the embedded LF-ViT weights are not installed ({EMBEDDED_WEIGHTS}); train them with "
                    "`lfvit-train` (see the lfvit README) or pass --checkpoint PATH")
            path = EMBEDDED_WEIGHTS
        load_lfvit_checkpoint(model, path)
    return model.eval()


def flops_table(name: str, model: LFVisionTransformer) -> dict:
    """Per-stage GFLOPs of ``model`` and of its dense backbone."""
    s = stage_flops(model)
    return {"model": name, "g": model.grid, "m": model.region_size, "alpha": model.alpha,
            "K": model.num_cells, "focus_tokens": s.focus_tokens, "location_gflops": s.location,
            "cumulative_gflops": s.cumulative, "dense_gflops": dense_gflops(model)}


@torch.inference_mode()
def collect(model: LFVisionTransformer, loader, device: torch.device, desc: str = "eval") -> dict:
    """Two-stage forward over a loader: softmax of both stages, labels, indices and the per-image records."""
    from tqdm.auto import tqdm

    out: dict[str, list] = {k: [] for k in ("p_loc", "p_focus", "labels", "index", "window", "cells", "gca")}
    for images, labels, index in tqdm(loader, desc=desc, leave=False):
        z = model(images.to(device))
        rec = model.last_record
        out["p_loc"].append(z.location.float().softmax(-1).cpu())
        out["p_focus"].append(z.focus.float().softmax(-1).cpu())
        out["labels"].append(labels)
        out["index"].append(index)
        out["window"].append(rec.window.cpu())
        out["cells"].append(rec.cells.cpu())
        out["gca"].append(rec.gca.cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def anytime(res: dict) -> dict:
    """Top-1 (%) of each stage with every image through both stages."""
    y = res["labels"]
    return {"location_top1": 100 * (res["p_loc"].argmax(-1) == y).float().mean().item(),
            "focus_top1": 100 * (res["p_focus"].argmax(-1) == y).float().mean().item(), "n": len(y)}


def budgeted(res: dict, flops, etas) -> list[dict]:
    """Eta sweep as released (``dynamic_evaluate``): expected GFLOPs, top-1 and per-stage counts."""
    y = res["labels"]
    conf, pred_l = res["p_loc"].max(-1)
    pred_f = res["p_focus"].argmax(-1)
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


def region_hits(res: dict, boxes: torch.Tensor, model: LFVisionTransformer) -> dict:
    """Share of images whose chosen window contains the box centre, and the random-window expectation."""
    cell_px = model.patch_embed.patch_size[0] * 2
    g, m = model.grid, model.region_size
    cx = ((boxes[:, 0] + boxes[:, 2]) / 2 / cell_px).floor().long().clamp(0, g - 1)
    cy = ((boxes[:, 1] + boxes[:, 3]) / 2 / cell_px).floor().long().clamp(0, g - 1)
    r0, c0 = res["window"][:, 0], res["window"][:, 1]
    hit = (cy >= r0) & (cy < r0 + m) & (cx >= c0) & (cx < c0 + m)
    span = g - m + 1

    def covering(c):  # number of window offsets along one axis that contain coordinate c
        return (torch.minimum(c, torch.tensor(span - 1)) - torch.clamp(c - m + 1, min=0) + 1).float()

    random = (covering(cy) * covering(cx) / (span * span)).mean().item()
    return {"hit_rate": 100 * hit.float().mean().item(), "random_window_hit_rate": 100 * random,
            "n": int(len(hit)), "cell_px": cell_px}


def plot_budget(rows: list[dict], dense: float, path: Path, title: str) -> Path:
    """Fig. 4 (top-1 vs expected GFLOPs) and Fig. 7 (images / correct images per stage vs eta) as one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot([r["gflops"] for r in rows], [r["top1"] for r in rows], ".-", label="LF-ViT (eta 0.00-0.99)")
    a.axvline(dense, color="grey", ls="--", label=f"dense backbone {dense:.2f} G")
    a.set_xlabel("expected GFLOPs / image")
    a.set_ylabel("top-1 (%)")
    a.set_title(title)
    a.legend()
    etas = [r["eta"] for r in rows]
    b.plot(etas, [r["n_location"] for r in rows], label="finish at localization")
    b.plot(etas, [r["correct_location"] for r in rows], "--", label="... correct")
    b.plot(etas, [r["n_focus"] for r in rows], label="finish at focus")
    b.plot(etas, [r["correct_focus"] for r in rows], "--", label="... correct")
    b.set_xlabel("eta")
    b.set_ylabel("images")
    b.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_regions(dataset, res: dict, model: LFVisionTransformer, eta: float, n: int, path: Path) -> Path | None:
    """Fig. 6: correctly recognised focus-stage images with the chosen region and its refined cells."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    y = res["labels"]
    focus = (res["p_loc"].max(-1).values < eta) & (res["p_focus"].argmax(-1) == y)
    rows = focus.nonzero()[:, 0][:n].tolist()
    if not rows:
        return None
    cell = model.patch_embed.patch_size[0] * 2
    size = model.patch_embed.img_size[0]
    cols = min(4, len(rows))
    nrows = (len(rows) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3 * cols, 3 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, rows):
        img = dataset.image(int(res["index"][i])).convert("RGB").resize((size, size))
        ax.imshow(np.asarray(img))
        shade = np.full((model.grid, model.grid), 0.6)  # grey out the cells not refined at full resolution
        for c in res["cells"][i].tolist():
            shade[c // model.grid, c % model.grid] = 0.0
        overlay = np.zeros((model.grid, model.grid, 4))
        overlay[..., :3], overlay[..., 3] = 0.5, shade
        ax.imshow(overlay, extent=(0, size, size, 0), interpolation="nearest", zorder=2)
        r0, c0 = res["window"][i].tolist()
        ax.add_patch(patches.Rectangle((c0 * cell, r0 * cell), model.region_size * cell, model.region_size * cell,
                                       fill=False, ec="red", lw=2, zorder=3))
        ax.set_title(f"label {int(y[i])}, p_l {res['p_loc'][i].max():.2f}", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def dense_backbone(model: LFVisionTransformer) -> torch.nn.Module:
    """The dense ViT with LF-ViT's shared weights and fine positional table (the backbone it accelerates)."""
    from timm.models.vision_transformer import VisionTransformer

    dense = VisionTransformer(img_size=model.patch_embed.img_size, patch_size=model.patch_embed.patch_size,
                              embed_dim=model.embed_dim, depth=len(model.blocks),
                              num_heads=model.blocks[0].attn.num_heads, num_classes=model.num_classes,
                              qkv_bias=model.blocks[0].attn.qkv.bias is not None)
    own = dense.state_dict()
    dense.load_state_dict({k: v for k, v in model.state_dict().items() if k in own})
    return dense.eval().to(next(model.parameters()).device)


def throughput(model: LFVisionTransformer, images: torch.Tensor, eta: float, warmup: int, repeats: int) -> dict:
    """Real early exit vs dense backbone vs two-stage forward, interleaved in one process (model only)."""
    from vitbench.throughput import compare

    dense = dense_backbone(model)
    fns = {"dense": dense, f"lfvit_early_exit_eta{eta:g}": lambda x: model.forward_early_exit(x, eta),
           "lfvit_two_stage": model}
    with torch.inference_mode():
        rows = compare(fns, images, baseline="dense", warmup=warmup, repeats=repeats)
        model.forward_early_exit(images, eta)
    focus = model.last_record.exit_stage.float().mean().item()
    return {"rows": rows, "batch": images.shape[0], "focus_fraction": focus, "device": str(images.device),
            "dtype": str(images.dtype)}


def run(cfg: EvalConfig) -> dict:
    """Evaluate per ``cfg``; returns the JSON-able results (also written to ``output_dir/results.json``)."""
    from vitbench.data import build_eval_loader, data_defaults
    from vitbench.report import markdown_table, write_json

    out = Path(cfg.output_dir)
    model = build_model(cfg, load_weights=not cfg.flops_only)
    flops = stage_flops(model)
    result: dict = {"config": asdict(cfg), "flops": flops_table(cfg.model, model)}
    print(markdown_table([result["flops"]], digits=3))
    if cfg.flops_only:
        return result
    device = torch.device(cfg.device)
    model.to(device)
    dd = data_defaults(cfg.data)
    if dd.num_classes != model.num_classes and cfg.data == "digits":
        raise ValueError(f"{cfg.model} has {model.num_classes} classes, digits has {dd.num_classes}")
    size = model.patch_embed.img_size[0]
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    loader = build_eval_loader(cfg.data, size, mean, std, batch_size=cfg.batch_size, crop_pct=dd.crop_pct,
                               num_workers=cfg.num_workers, limit=cfg.limit)
    dataset = loader.dataset
    need_pass = any(m in cfg.modes for m in ("anytime", "budgeted", "regions"))
    res = collect(model, loader, device) if need_pass else None
    if "anytime" in cfg.modes:
        result["anytime"] = anytime(res)
        print("\nAnytime (every image through both stages):\n" + markdown_table([result["anytime"]]))
    if "budgeted" in cfg.modes:
        rows = budgeted(res, flops, cfg.etas)
        result["budgeted"] = rows
        result["budget_figure"] = str(plot_budget(rows, dense_gflops(model), out / "budgeted.png", cfg.model))
        shown = [r for r in rows if round(r["eta"] * 100) % 10 == 0 or r["eta"] == cfg.eta]
        print(f"\nBudgeted (eta sweep; figure {result['budget_figure']}):\n" + markdown_table(
            shown, ["eta", "top1", "gflops", "focus_fraction", "n_location", "n_focus"], digits=3))
    if "regions" in cfg.modes:
        boxes = dataset.boxes_for(res["index"], size)
        if boxes is not None:
            result["region_hits"] = region_hits(res, boxes, model)
            print("\nRegion hit rate (window contains the box centre):\n" + markdown_table([result["region_hits"]]))
        fig = plot_regions(dataset, res, model, cfg.eta, cfg.num_visualise, out / "regions.png")
        result["region_figure"] = str(fig) if fig else None
    if "variants" in cfg.modes:
        rows = []
        for mode in REGION_MODES:
            model.set_lf_options(region_mode=mode)
            model.region_generator = torch.Generator().manual_seed(cfg.seed)
            r = collect(model, loader, device, desc=mode)
            row = {"variant": mode, **anytime(r)}
            boxes = dataset.boxes_for(r["index"], size)
            if boxes is not None:
                row["hit_rate"] = region_hits(r, boxes, model)["hit_rate"]
            rows.append(row)
        model.set_lf_options(region_mode=cfg.region_mode)
        model.region_generator = None
        result["variants"] = rows
        print("\nRegion-selection variants (Table 6, no early exit):\n" + markdown_table(rows))
    if "throughput" in cfg.modes:
        images = torch.cat([b[0] for _, b in zip(range(-(-cfg.throughput_batch // cfg.batch_size)), loader)])
        images = images.repeat(-(-cfg.throughput_batch // len(images)), 1, 1, 1)[:cfg.throughput_batch].to(device)
        result["throughput"] = throughput(model, images, cfg.eta, cfg.warmup, cfg.repeats)
        print(f"\nThroughput (batch {cfg.throughput_batch}, {device}, fp32, eta {cfg.eta}, "
              f"{100 * result['throughput']['focus_fraction']:.1f}% reach focus):\n"
              + markdown_table(result["throughput"]["rows"]))
    for table in cfg.paper:
        rows = paper_rows(table, result, model.region_size, model.grid, model.alpha, model.beta, cfg.loss)
        result.setdefault("paper", {})[table] = rows
        print(f"\nPaper {table} vs measured ({cfg.data}):\n" + (markdown_table(rows) if rows else
              f"(no {table} row for g {model.grid}, m {model.region_size})"))
    write_json(out / "results.json", result)
    return result


def main(argv: list[str] | None = None) -> int:
    from vitbench.report import write_json

    ns = build_parser().parse_args(argv)
    try:
        cfg = EvalConfig.from_args(ns)
        result = run(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"lfvit-eval: error: {e}", file=sys.stderr)
        return 2
    if cfg.json:
        write_json(cfg.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
