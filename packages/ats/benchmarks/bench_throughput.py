"""CPU throughput of DeiT-S + ATS against dense DeiT-S (eager and compiled), in one process (``nox -s bench``).

DeiT-S geometry with random weights whose attention is made peaked (q/k projections scaled), so that ATS keeps an
image-dependent number of tokens, as trained weights do. At every ``--batch-sizes`` (default 1 and 32) it reports the
speed-up over eager and over ``torch.compile``d dense DeiT-S, the ideal speed-up (dense GMACs / mean per-image GMACs
of the pool), their ratios and the host syncs of one forward (:mod:`vitbench.bench`). ``--compile all`` adds ATS
compiled between its host syncs (``ats.patch.compile_ats``). ``--released PATH`` also times the released ``ViT``
(adaptivetokensampling/ATS, imported from that checkout at run time, never copied; its configuration: ATS at blocks
3..11 with ``NUM_TOKENS`` 197, i.e. K = N, rho 1) on the same weights, run on the whole batch as it is run, and at
batch sizes above 1 also one image at a time (its padded batch couples the images; ours is batch-invariant, so the
per-image row is the like-for-like one); ``vs_released`` / ``vs_released_per_image`` give ours (rho 1) over it. No
weights or data are needed. About 4 minutes on two shared cores with the defaults (most of it compiling dense DeiT-S
once per batch size); writes JSON (``--json``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import sys
import types
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from vitbench import bench
from vitbench.cli import run
from vitbench.flops import ViTGeometry, vit_gmacs

import ats
from ats.backbones import geometry
from ats.flops import dense_gmacs, per_image_gmacs
from ats.patch import compile_ats


def ideal_speedup(model: torch.nn.Module, pool: torch.Tensor,
                  reference: torch.nn.Module | None = None) -> tuple[float, list[float]]:
    """Dense GMACs (of ``reference``, by default of ``model`` run dense) / mean per-image GMACs of ``pool`` (ATS is
    batch-invariant: one forward), and the mean output tokens of every block. Any backbone of
    :func:`ats.backbones.geometry` (a timm ViT, a CvT)."""
    with torch.inference_mode():
        model(pool)
    geom = geometry(model)
    tokens = model.record.token_counts()[1].double().mean(0)
    dense = dense_gmacs(geom if reference is None else geometry(reference))
    return dense / float(per_image_gmacs(geom, model.record).mean()), [round(float(t), 1) for t in tokens]


def counts_floor(dense: torch.nn.Module, tokens_out: list[float]) -> bench.Method:
    """Dense timm blocks cut to ATS's mean output token counts, without any sampling: what ATS would cost if
    scoring and selecting were free (full attention on the block's input, then the first ``n_out`` rows go on).
    Its ideal speed-up is its own GMACs ratio; ATS's measured / this row's measured speed-up is the share of time
    the sampling costs, this row's fraction of ideal what the small matrix products cost on this CPU."""
    counts = [round(t) for t in tokens_out]

    def forward(x: torch.Tensor) -> torch.Tensor:
        h = dense.norm_pre(dense._pos_embed(dense.patch_embed(x)))
        for blk, n_out in zip(dense.blocks, counts):
            h = h[:, :n_out] + blk.ls1(blk.attn(blk.norm1(h)))[:, :n_out]
            h = h + blk.ls2(blk.mlp(blk.norm2(h)))
        return dense.forward_head(dense.norm(h))

    n_in = [dense.patch_embed.num_patches + 1, *counts[:-1]]
    geom = ViTGeometry.from_model(dense)
    return bench.Method(forward, dense_gmacs(geom) / vit_gmacs(geom, list(zip(n_in, counts))))


def replayed(model: torch.nn.Module, pool: torch.Tensor, batch_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model`` (ATS-patched, eager or compiled; changed in place) with every stage's scoring and sampling replaced
    by a lookup of what it selected for the same batch of ``pool`` in a first pass: ATS's own code with free
    selection, so its gap to ATS is the whole cost of scoring and sampling, its gap to the ideal what the rest costs."""
    current, picks = [0], {}
    for i in model.record.config.stages:
        attn = model.blocks[i].attn

        def select(*args, block=i, sample=attn.select):
            key = (current[0], block)
            if key not in picks:
                picks[key] = sample(*args)
            return picks[key]

        attn.select = select

    def forward(x: torch.Tensor) -> torch.Tensor:
        current[0] = x.data_ptr()  # the batch of the pool (a view at its own offset)
        return model(x)

    with torch.inference_mode():
        for batch in pool.split(batch_size):
            forward(batch)
    return forward


RELEASED_VIT = "libs/models/transformers/vit.py"


def released_model(path: str | None, dense: torch.nn.Module) -> torch.nn.Module | None:
    """The released ``ViT`` in its configuration (ATS at blocks 3..11, ``NUM_TOKENS`` 197: K = N) carrying ``dense``'s
    weights, or ``None`` when no checkout is given. Only its model files are imported: the package ``__init__`` files
    (logging, fvcore's model registry) are replaced by empty packages and a no-op registry."""
    path = released_path(path)
    if path is None:
        return None
    if any(m == "libs" or m.startswith("libs.") for m in sys.modules):
        raise ValueError("a module named 'libs' is already imported; the released code needs that name")
    for name, folder in (("libs", path / "libs"), ("libs.models", path / "libs" / "models")):
        package = types.ModuleType(name)
        package.__path__ = [str(folder)]
        sys.modules[name] = package
    build = types.ModuleType("libs.models.build")
    build.MODEL_REGISTRY = types.SimpleNamespace(register=lambda: (lambda cls: cls))
    sys.modules["libs.models.build"] = build
    vit = importlib.import_module("libs.models.transformers.vit")
    depth, attn = len(dense.blocks), dense.blocks[0].attn
    if depth != 12 or dense.patch_embed.num_patches != 196:
        raise ValueError("the released configuration is that of a 12-block ViT on 14 x 14 patches (e.g. DeiT-S)")
    cfg = types.SimpleNamespace(VIT=types.SimpleNamespace(
        IMG_SIZE=dense.patch_embed.img_size[0], PATCH_SIZE=dense.patch_embed.patch_size[0], IN_CHANNELS=3,
        NUM_CLASSES=dense.num_classes, EMBED_DIM=dense.embed_dim, DEPTH=depth, NUM_HEADS=attn.num_heads,
        MLP_RATIO=dense.blocks[0].mlp.fc1.out_features / dense.embed_dim, QKV_BIAS=attn.qkv.bias is not None,
        QK_SCALE=None, REPRESENTATION_SIZE=None, DROP_RATE=0.0, ATTN_DROP_RATE=0.0, DROP_PATH_RATE=0.0,
        HYBRID_BACKBONE=None, NORM_LAYER=None, ATS_BLOCKS=list(range(3, 12)), NUM_TOKENS=[197] * depth,
        DROP_TOKENS=True))
    model = vit.ViT(cfg)
    missing, unexpected = model.load_state_dict(dense.state_dict(), strict=False)
    if unexpected or any(not k.endswith("attn.out_zero_mask") for k in missing):  # its zero buffers stay
        raise ValueError(f"the released ViT does not take these weights (missing {missing}, unexpected {unexpected})")
    return model.eval()


def released_path(path: str | None) -> Path | None:
    """The checked ``--released`` checkout (``None`` without one)."""
    return bench.released_path(path, RELEASED_VIT)


def released_callables(model: torch.nn.Module | None, batch_size: int) -> dict[str, Callable]:
    """The released model as it is run (the whole batch; it returns logits and policies), and one image at a time."""
    if model is None:
        return {}
    fns = {"released code": lambda x: model(x)[0]}
    if batch_size > 1:
        fns["released code, one image at a time"] = lambda x: [model(img[None])[0] for img in x]
    return fns


def measure(args: argparse.Namespace, cfg: bench.BenchConfig) -> list[dict]:
    """Rows at every batch size."""
    torch.manual_seed(cfg.seed)
    dense = bench.laid_out(bench.peaked(timm.create_model(args.model, pretrained=False), cfg.peak), cfg)
    models = {f"ats rho={rho:g}": ats.apply(copy.deepcopy(dense), rho=rho, mode=args.mode) for rho in args.rho}
    compiled = {n: compile_ats(copy.deepcopy(m)) for n, m in models.items()} if cfg.compile == "all" else {}
    dense_compiled = bench.compile_dense(dense) if cfg.compile != "none" else None
    released = bench.laid_out(released_model(args.released, dense), cfg)
    rows = []
    for b in cfg.batch_sizes:
        pool = bench.images(b, dense.patch_embed.img_size[0], cfg.seed)
        methods, tokens = {}, {}
        for name, model in models.items():
            ideal, tokens[name] = ideal_speedup(model, pool)
            methods[name] = bench.Method(model, ideal, compiled.get(name))
        if args.floor:
            first = next(iter(models))
            methods["dense blocks at ATS's counts, no sampling"] = counts_floor(dense, tokens[first])
            methods[f"ATS code, selections replayed ({first})"] = bench.Method(
                replayed(copy.deepcopy(models[first]), pool, b), methods[first].ideal,
                replayed(compile_ats(copy.deepcopy(models[first])), pool, b) if compiled else None)
        batch_rows = bench.compare_methods(dense, methods, pool, b, cfg, dense_compiled,
                                           released_callables(released, b))
        for key, name in (("vs_released", "released code"),
                          ("vs_released_per_image", "released code, one image at a time")):
            bench.speedups_over(batch_rows, name, key, "ats rho=1")
        for row in batch_rows:
            row["mean_tokens_out"] = tokens.get(row["name"].removesuffix(" (compiled)"))
        rows += batch_rows
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224",
                   help="timm ViT with a CLS token, random weights (default: deit_small_patch16_224)")
    p.add_argument("--rho", type=float, nargs="+", default=[1.0], help="ATS rho values to time (default: 1)")
    p.add_argument("--mode", choices=ats.MODES, default="official", help="ATS selection mode (default: official)")
    p.add_argument("--floor", action="store_true",
                   help="also time, for the first rho, dense blocks cut to its mean token counts without sampling, "
                   "and ATS with its selections replayed from a first pass (no scoring or sampling): they separate "
                   "the sampling's cost from that of the smaller matrix products (default: off)")
    bench.add_released_argument(p, "github.com/adaptivetokensampling/ATS", "ATS_RELEASED")
    bench.add_arguments(p, "runs/bench/ats.json")
    return p


def command(args: argparse.Namespace) -> int:
    if released_path(args.released) is not None and (1.0 not in args.rho or args.mode != "official"):
        raise ValueError("--released compares against ATS rho 1 in official mode: add 1 to --rho")
    cfg = bench.config(args, "ats")
    bench.report(measure(args, cfg), cfg, model=args.model, mode=args.mode)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
