"""``ats-diagnose``: why ATS keeps so few tokens on a backbone, measured block by block.

For each model (the embedded backbone, and the shipped ATS fine-tuned weights when present) it measures on the
validation images with ground-truth object boxes:

* per block, the norms of the residual-stream tokens entering it on the object (digit) and on the background, the
  share of high-norm background tokens (norm > ``--outlier-factor`` x the image's median patch norm, the pattern
  of ViTs without registers) and the CLS attention they receive;
* per block, the CLS attention mass (head mean, Eq. 1's row 0) on the object's patches, on the background and on
  the CLS itself, next to the object's share of the patches, and the effective number of attended tokens
  ``exp(entropy)`` (how peaked the row is; inverse transform sampling of the score CDF, Eqs. 4-5, lands on few
  distinct tokens when it is peaked);
* the accuracy when, after the dense block ``--block`` (ATS's first stage, 3), only a subset of the tokens goes on
  (the CLS always does) and the remaining blocks run dense on it: the object's tokens (ground-truth box), ATS's
  kept tokens (single stage at K = N, exactly ATS's block output), the top-K tokens by ATS's score (Eq. 3) and
  random tokens of the same count as either, the background tokens, and the released multi-stage configuration.

Writes ``ats_diag.json`` and three PNG figures (``ats_diag_norms.png``, ``ats_diag_cls_attention.png``,
``ats_diag_keep.png``) to ``--output-dir`` and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import vitbench
from torch import Tensor
from tqdm.auto import tqdm
from vitbench.cli import check_writable, run
from vitbench.engine import resolve_input
from vitbench.figures import save  # sets the Agg backend before pyplot is imported
from vitbench.localization import on_box
from vitbench.patching import qkv_heads
from vitbench.report import markdown_table, write_json

import matplotlib.pyplot as plt  # noqa: E402  (after vitbench.figures)

from . import patch, sampling
from .options import SHIPPED

FINETUNED_WEIGHTS = SHIPPED[0].path  # fine-tuned at the released placement, blocks 3..11


# ----------------------------------------------------------------------------------------------- pure functions
def patch_masks(boxes: Tensor, grid: tuple[int, int], img_size: int) -> Tensor:
    """``[B, P]`` bool: patch ``p`` (token ``p + 1``) has its centre inside the image's box."""
    every = torch.arange(1, grid[0] * grid[1] + 1, device=boxes.device).expand(boxes.shape[0], -1)
    return on_box(every, boxes, grid, img_size)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """``[B]`` mean of ``values`` ``[B, P]`` over ``mask``; NaN where the mask is empty."""
    return (values * mask).sum(-1) / mask.sum(-1).to(values.dtype)


def effective_tokens(row: Tensor) -> Tensor:
    """``exp(entropy)`` of attention rows ``[..., N]`` summing to 1: N for a uniform row, 1 for a one-hot row."""
    p = row.clamp(min=0)
    return torch.exp(-(p * p.clamp(min=1e-30).log()).sum(-1))


def high_norm(norms: Tensor, factor: float) -> Tensor:
    """``[B, P]`` bool: patch tokens whose norm exceeds ``factor`` x the image's median patch norm."""
    return norms > factor * norms.median(-1, keepdim=True).values


def positions_from_mask(keep: Tensor) -> Tensor:
    """Patch mask ``[B, P]`` -> token positions ``[B, 1 + max count]``: the CLS (0), then the kept patch tokens in
    token order, -1 padded."""
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices  # kept patches first, token order
    count = keep.sum(-1)
    width = int(count.max()) if keep.numel() else 0
    picks = torch.where(torch.arange(width, device=keep.device) < count[:, None], order[:, :width] + 1, -1)
    return torch.cat([picks.new_zeros(keep.shape[0], 1), picks], 1)


def top_count_mask(scores: Tensor, count: Tensor) -> Tensor:
    """``[B, P]`` bool: each image's ``count[b]`` highest-scoring patches."""
    rank = torch.sort(scores, dim=-1, descending=True, stable=True).indices.argsort(-1)
    return rank < count[:, None]


def random_count_mask(shape: tuple[int, int], count: Tensor, generator: torch.Generator) -> Tensor:
    """``[B, P]`` bool: ``count[b]`` patches per image drawn uniformly without replacement."""
    return top_count_mask(torch.rand(shape, generator=generator).to(count.device), count)


def _qkv(attn_module, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v ``[B, H, N, d]`` of a timm ``Attention`` for its normalised input ``h`` ``[B, N, C]``."""
    return qkv_heads(attn_module, attn_module.qkv(h))


def ats_scores(attn_module, h: Tensor) -> Tensor:
    """ATS's released-code significance score (Eq. 3) of every patch token, ``[B, P]``, from a block's normalised
    input ``h`` ``[B, N, C]`` (the same functions the ATS block uses)."""
    B, N, _ = h.shape
    q, k, v = _qkv(attn_module, h)
    n = torch.full((B,), N, dtype=torch.long, device=h.device)
    attn = sampling.cls_attention(q[:, :, :1], k, attn_module.scale, n, sampling.OFFICIAL_EPS)
    return sampling.significance_scores(attn[..., 1:], sampling.value_norms(v)[:, 1:], n - 1)


def cls_attention_row(attn_module, h: Tensor) -> Tensor:
    """Head-mean attention row of the CLS query, ``[B, N]`` (standard softmax, Eq. 1)."""
    q, k, _ = _qkv(attn_module, h)
    return ((q[:, :, :1] @ k.transpose(-2, -1)) * attn_module.scale).softmax(-1).mean(1).squeeze(-2)


# ----------------------------------------------------------------------------------------------- model passes
def finish(model, x: Tensor, positions: Tensor | None = None, start: int = 0) -> Tensor:
    """Run blocks ``start..`` on ``x`` restricted to ``positions`` (``[B, K]``, -1 padded, CLS first) and return the
    logits. Padded tokens are masked as keys, so each image sees only its own kept tokens."""
    mask = None
    if positions is not None:
        x = x.gather(1, positions.clamp(min=0)[..., None].expand(-1, -1, x.shape[-1]))
        mask = (positions >= 0)[:, None, None, :]
    for blk in model.blocks[start:]:
        x = blk(x, attn_mask=mask)
    return model.forward_head(model.norm(x))


@dataclass
class BlockStats:
    """Per-image measurements of one block's input tokens, each ``[B]``."""

    norm_object: Tensor
    norm_background: Tensor
    norm_cls: Tensor
    high_norm_background: Tensor
    high_norm_mass: Tensor
    mass_object: Tensor
    mass_background: Tensor
    mass_cls: Tensor
    effective: Tensor


def block_stats(x: Tensor, row: Tensor, on_object: Tensor, outlier_factor: float) -> BlockStats:
    """Norms and CLS-attention split of one block's input ``x`` ``[B, N, C]`` given its CLS row ``[B, N]``."""
    norms = x[:, 1:].norm(dim=-1)
    background = ~on_object
    outliers = high_norm(norms, outlier_factor) & background
    patches = row[:, 1:]
    return BlockStats(
        norm_object=masked_mean(norms, on_object), norm_background=masked_mean(norms, background),
        norm_cls=x[:, 0].norm(dim=-1), high_norm_background=outliers.float().mean(-1),
        high_norm_mass=(patches * outliers).sum(-1), mass_object=(patches * on_object).sum(-1),
        mass_background=(patches * background).sum(-1), mass_cls=row[:, 0], effective=effective_tokens(row),
    )


KEEP_SETS = ("object", "top-K (object count)", "random (object count)", "ATS", "top-K (ATS count)",
             "random (ATS count)", "background")


def keep_masks(on_object: Tensor, ats_kept: Tensor, scores: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
    """The patch subsets of the keep-only experiment, each ``[B, P]`` bool: the object's patches, ATS's (from its
    kept original indices ``[B, K]``, -1 padded), top-K / random of the same counts, and the background."""
    P = on_object.shape[1]
    ats = torch.zeros_like(on_object)
    rows, cols = (ats_kept > 0).nonzero(as_tuple=True)
    ats[rows, ats_kept[rows, cols] - 1] = True
    n_obj, n_ats = on_object.sum(-1), ats.sum(-1)
    shape = (on_object.shape[0], P)
    return {
        "object": on_object, "top-K (object count)": top_count_mask(scores, n_obj),
        "random (object count)": random_count_mask(shape, n_obj, generator),
        "ATS": ats, "top-K (ATS count)": top_count_mask(scores, n_ats),
        "random (ATS count)": random_count_mask(shape, n_ats, generator), "background": ~on_object,
    }


# ----------------------------------------------------------------------------------------------- CLI
@dataclass(frozen=True)
class DiagnoseConfig:
    data: str = "digits"
    model: str = "vit_digits_patch8_112"
    weights: tuple[str, ...] = ()
    block: int = 3
    outlier_factor: float = 2.0
    batch_size: int = 100
    limit: int | None = None
    seed: int = 0
    output_dir: str = "runs/ats_diagnose"
    cpu: bool = False

    def __post_init__(self):
        if self.block < 0:
            raise ValueError(f"--block must be >= 0, got {self.block}")
        if self.outlier_factor <= 1:
            raise ValueError(f"--outlier-factor must be > 1, got {self.outlier_factor}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        for w in self.weights:
            if w != "pretrained" and not Path(w).is_file():
                raise FileNotFoundError(f"--checkpoint {w} does not exist")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ats-diagnose", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits", help="dataset with object boxes (default: digits)")
    p.add_argument("--model", default="vit_digits_patch8_112", help="timm model name (default: %(default)s)")
    p.add_argument("--pretrained", action="store_true", help="diagnose the model's pretrained weights")
    p.add_argument("--checkpoint", nargs="+", default=[], metavar="PATH",
                   help="diagnose these .safetensors/.pth weights (default, with neither option: the pretrained "
                        "backbone and the shipped ATS fine-tuned weights when installed)")
    p.add_argument("--block", type=int, default=3,
                   help="dense block after which only a subset of tokens goes on (default: 3, ATS's first stage)")
    p.add_argument("--outlier-factor", type=float, default=2.0,
                   help="a high-norm token has norm > this x its image's median patch norm (default: 2)")
    p.add_argument("--batch-size", type=int, default=100, help="default: 100")
    p.add_argument("--limit", type=int, default=None, help="first N validation images (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random token subsets (default: 0)")
    p.add_argument("--output-dir", default="runs/ats_diagnose", help="JSON and figures (default: %(default)s)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is present")
    return p


def config_from_args(ns: argparse.Namespace) -> DiagnoseConfig:
    weights = (("pretrained",) if ns.pretrained else ()) + tuple(ns.checkpoint)
    if not weights:
        weights = ("pretrained",) + ((str(FINETUNED_WEIGHTS),) if FINETUNED_WEIGHTS.is_file() else ())
    return DiagnoseConfig(ns.data, ns.model, weights, ns.block, ns.outlier_factor, ns.batch_size, ns.limit,
                          ns.seed, ns.output_dir, ns.cpu)


def weights_label(weights: str) -> str:
    if weights == "pretrained":
        return "backbone"
    return "ATS fine-tuned" if Path(weights).resolve() == FINETUNED_WEIGHTS.resolve() else Path(weights).name


def _hits(logits: Tensor, labels: Tensor) -> int:
    return int((logits.argmax(-1) == labels).sum())


def diagnose_model(model, loader, cfg: DiagnoseConfig, img_size: int, device) -> dict:
    """All measurements for one model over ``loader`` (see the module docstring)."""
    depth = len(model.blocks)
    if not 0 <= cfg.block < depth - 1:
        raise ValueError(f"--block {cfg.block} must leave at least one block after it ({depth} blocks)")
    grid = tuple(model.patch_embed.grid_size)
    # multi-stage ATS from ``block`` on; its first stage is exactly single-stage ATS at ``block`` (K = N)
    multi = patch.apply(copy.deepcopy(model), stages=range(cfg.block, depth), rho=1.0)
    generator = torch.Generator().manual_seed(cfg.seed)
    stats: list[list[BlockStats]] = []
    correct = dict.fromkeys(("dense", *KEEP_SETS, "ATS multi-stage"), 0)
    counts = {name: [] for name in KEEP_SETS}
    total = 0
    with torch.inference_mode():
        for images, labels, index in tqdm(loader, desc="diagnose", leave=False, file=sys.stderr):
            images, labels = images.to(device), labels.to(device)
            on_object = patch_masks(loader.dataset.boxes_for(index, img_size), grid, img_size).to(device)
            x = patch.embed(model, images)
            per_block = []
            for i, blk in enumerate(model.blocks):
                h = blk.norm1(x)
                per_block.append(block_stats(x, cls_attention_row(blk.attn, h), on_object, cfg.outlier_factor))
                if i == cfg.block:
                    scores = ats_scores(blk.attn, h)
                x = blk(x)
                if i == cfg.block:
                    after = x
            stats.append(per_block)
            correct["dense"] += _hits(model.forward_head(model.norm(x)), labels)
            correct["ATS multi-stage"] += _hits(multi(images), labels)
            masks = keep_masks(on_object, multi.record.kept[cfg.block], scores, generator)
            for name, mask in masks.items():
                correct[name] += _hits(finish(model, after, positions_from_mask(mask), cfg.block + 1), labels)
                counts[name].append(mask.sum(-1).float().cpu() + 1)
            total += len(labels)
    by_block = [{f: float(torch.cat([getattr(b[i], f) for b in stats]).nanmean())
                 for f in BlockStats.__dataclass_fields__} for i in range(depth)]
    keep = [{"tokens": name, "top1": 100.0 * correct[name] / total,
             "kept_tokens": float(torch.cat(counts[name]).mean()) if name in counts else None}
            for name in correct]
    return {"blocks": by_block, "keep": keep, "images": total}


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), command, argv)


def command(ns: argparse.Namespace) -> int:
    cfg = config_from_args(ns)
    out_dir = check_writable(cfg.output_dir)
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu")
    results = {"config": {**cfg.__dict__, "weights": list(cfg.weights)}, "models": {}}
    loader = None
    for weights in cfg.weights:
        model = vitbench.create_model(cfg.model, pretrained=weights == "pretrained",
                                      checkpoint=None if weights == "pretrained" else weights).eval().to(device)
        patch.check_structure(model)
        img_size, mean, std, dd = resolve_input(model, cfg.data)
        if loader is None:
            loader = vitbench.build_eval_loader(cfg.data, img_size, mean, std, batch_size=cfg.batch_size,
                                                crop_pct=dd.crop_pct, num_workers=0, limit=cfg.limit)
            boxes = loader.dataset.boxes_for(range(len(loader.dataset)), img_size)
            if boxes is None:
                raise ValueError(f"--data {cfg.data} has no object boxes; the diagnosis needs them")
            grid = tuple(model.patch_embed.grid_size)
            results["object_patch_share"] = 100.0 * float(patch_masks(boxes, grid, img_size).float().mean())
        label = weights_label(weights)
        results["models"][label] = {"weights": weights, **diagnose_model(model, loader, cfg, img_size, device)}
    _report(results, out_dir)
    write_json(out_dir / "ats_diag.json", results)
    print(f"results: {out_dir / 'ats_diag.json'}")
    return 0


BLOCK_COLUMNS = ["block", "norm_object", "norm_background", "norm_cls", "high_norm_background", "high_norm_mass",
                 "mass_object", "mass_background", "mass_cls", "effective"]


def _report(results: dict, out_dir: Path) -> None:
    for label, res in results["models"].items():
        print(f"\n{label}: per block (input tokens), {res['images']} images, object = "
              f"{results['object_patch_share']:.1f} % of the patches")
        rows = [{"block": i, **b} for i, b in enumerate(res["blocks"])]
        print(markdown_table(rows, BLOCK_COLUMNS, digits=3))
        print(f"\n{label}: only these tokens continue after block {results['config']['block']}")
        print(markdown_table(res["keep"], ["tokens", "kept_tokens", "top1"], digits=2))
    for path in plot_diagnosis(results, out_dir):
        print(f"figure: {path}")


def plot_diagnosis(results: dict, out_dir: Path) -> list[Path]:
    """The three figures: token norms, CLS-attention split and peakedness per block, keep-only accuracy."""
    models = results["models"]
    styles = ["-", "--", ":", "-."]
    paths = []

    def keep(fig, name):
        fig.tight_layout()
        paths.append(save(fig, out_dir / name))

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.6))
    for style, (label, res) in zip(styles, models.items()):
        blocks = range(len(res["blocks"]))
        col = {f: [b[f] for b in res["blocks"]] for f in BLOCK_COLUMNS[1:]}
        ax.plot(blocks, col["norm_object"], style, color="tab:green", label=f"{label}: object tokens")
        ax.plot(blocks, col["norm_background"], style, color="tab:gray", label=f"{label}: background tokens")
        ax.plot(blocks, col["norm_cls"], style, color="tab:red", label=f"{label}: CLS")
        bx.plot(blocks, [100 * v for v in col["high_norm_background"]], style, color="tab:purple",
                label=f"{label}: share of patch tokens")
        bx.plot(blocks, [100 * v for v in col["high_norm_mass"]], style, color="tab:orange",
                label=f"{label}: CLS attention they get")
    ax.set(xlabel="block (input tokens)", ylabel="mean L2 norm", title="token norms")
    bx.set(xlabel="block (input tokens)", ylabel="%",
           title=f"high-norm background tokens (> {results['config']['outlier_factor']:g} x median)")
    for a in (ax, bx):
        a.legend(fontsize=7)
        a.grid(alpha=0.3)
    fig.suptitle("Residual-stream token norms per block", fontsize=10)
    keep(fig, "ats_diag_norms.png")

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.6))
    for style, (label, res) in zip(styles, models.items()):
        blocks = range(len(res["blocks"]))
        ax.plot(blocks, [100 * b["mass_object"] for b in res["blocks"]], style, color="tab:green",
                label=f"{label}: object")
        ax.plot(blocks, [100 * b["mass_background"] for b in res["blocks"]], style, color="tab:gray",
                label=f"{label}: background")
        ax.plot(blocks, [100 * b["mass_cls"] for b in res["blocks"]], style, color="tab:red", label=f"{label}: CLS")
        bx.plot(blocks, [b["effective"] for b in res["blocks"]], style, color="tab:blue", label=label)
    ax.axhline(results["object_patch_share"], color="tab:green", lw=0.8, alpha=0.5,
               label="object's share of the patches")
    ax.set(xlabel="block", ylabel="% of the CLS row", title="CLS attention mass (head mean)")
    bx.set(xlabel="block", ylabel="exp(entropy) of the CLS row", title="effective number of attended tokens",
           yscale="log")
    for a in (ax, bx):
        a.legend(fontsize=7)
        a.grid(alpha=0.3)
    fig.suptitle("Where the CLS token looks, per block", fontsize=10)
    keep(fig, "ats_diag_cls_attention.png")

    names = [row["tokens"] for row in next(iter(models.values()))["keep"]]
    fig, ax = plt.subplots(figsize=(10, 3.8))
    width = 0.8 / len(models)
    for j, (label, res) in enumerate(models.items()):
        xs = [i + (j - (len(models) - 1) / 2) * width for i in range(len(names))]
        bars = ax.bar(xs, [row["top1"] for row in res["keep"]], width, label=label)
        for bar, row in zip(bars, res["keep"]):
            text = f"{row['top1']:.1f}" + (f"\n{row['kept_tokens']:.0f} tok" if row["kept_tokens"] else "")
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.5, text, ha="center", fontsize=6)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set(ylabel="top-1 (%)", ylim=(0, 105),
           title=f"Accuracy when only these tokens continue after block {results['config']['block']}")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    keep(fig, "ats_diag_keep.png")
    return paths
