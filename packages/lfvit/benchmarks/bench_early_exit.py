"""CPU throughput of LF-ViT early exit vs dense DeiT-S (same weights; eager and compiled), at the Table 2 operating
point (``nox -s bench``).

DeiT-S geometry (224 px, g 7, m 5), random weights with peaked attention (q/k scaled), fp32. eta is set per pool of
images so that 22 % of them reach the focus stage (the m 5 / eta 0.47 operating point of Table 2: 1.10 + 0.22 x 2.71
= 1.70 GFLOPs; ideal speed-up 4.61 / 1.70 = 2.7x); at batch 1 the pool is nine images, two of which reach the
focus stage. Every callable runs side by side in one process (:mod:`vitbench.bench`); ``--compile all`` adds the
model with its two stages compiled (``LFVisionTransformer.compile_stages``). ``--released PATH`` also times the
released ``forward_early_exit`` (edgeai1/LF-ViT, imported from that checkout at run time, never copied) on the same
weights and eta, given the 224-px batch and making its own 112-px copy as its evaluation script does (ours includes
the downsampling too); ``vs_released`` gives ours over it, and the largest logit difference between the two is
printed. About 4 minutes on two shared cores with the defaults (mostly compiling dense DeiT-S once per batch size).
Writes JSON (default runs/bench/lfvit.json) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from vitbench import bench
from vitbench.cli import run

import lfvit  # noqa: F401  (registers the models)
from lfvit.checkpoint import to_official
from lfvit.flops import dense_gflops, stage_flops
from lfvit.model import LFVisionTransformer, eta_for_share

RELEASED_MODEL = "deit/models_deit.py"


def _import(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def released_model(path: str | None, model: LFVisionTransformer) -> torch.nn.Module | None:
    """The released ``LFVisionTransformer`` (``lf_deit_small``) carrying ``model``'s weights, or ``None`` without a
    checkout. Only its model file and the ``utils.py`` it imports are loaded, under private names: its
    ``register_model`` is a no-op, and the installed timm stands in for its vendored timm 0.4.5."""
    path = bench.released_path(path, RELEASED_MODEL)
    if path is None:
        return None
    options = (model.embed_dim, len(model.blocks), model.grid, model.region_size, model.alpha, model.beta,
               model.gca_start, model.region_mode)
    if options != (384, 12, 7, 5, 0.88, 0.99, 3, "ngca"):
        raise ValueError("the released lf_deit_small is DeiT-S at 224 px with m 5, alpha 0.88, beta 0.99, the GCA "
                         "from block 3 and N-GCA windows")
    registry = types.ModuleType("timm.models.registry")
    registry.register_model = lambda fn: fn
    saved = {name: sys.modules.get(name) for name in ("utils", "timm.models.registry")}
    try:
        sys.modules["utils"] = _import("_lfvit_released_utils", path / "utils.py")
        sys.modules["timm.models.registry"] = registry
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # timm.models.layers is a deprecated alias
            released = _import("_lfvit_released_models", path / RELEASED_MODEL)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    net = released.lf_deit_small(img_size_list=[112, 224], num_classes=model.num_classes)
    net.load_state_dict(to_official(model.state_dict()))
    return net.eval()


@contextlib.contextmanager
def cuda_moves_ignored() -> Iterator[None]:
    """``Tensor.cuda()`` and ``Tensor.to(<cuda device>)`` return the tensor itself: the released forward moves its
    constants to CUDA unconditionally, which a CPU run must skip."""
    cuda, to = torch.Tensor.cuda, torch.Tensor.to

    def to_unless_cuda(self, *args, **kwargs):
        target = args[0] if args else kwargs.get("device")
        if isinstance(target, (str, torch.device)) and torch.device(target).type == "cuda":
            return self
        return to(self, *args, **kwargs)

    torch.Tensor.cuda, torch.Tensor.to = (lambda self, *args, **kwargs: self), to_unless_cuda
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.Tensor.to = cuda, to


def released_early_exit(net: torch.nn.Module, eta: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """The released ``forward_early_exit`` as its evaluation script calls it: the 112-px copy (bilinear,
    ``align_corners=True``) and the 224-px image; returns the final logits."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        low = torch.nn.functional.interpolate(x, (112, 112), mode="bilinear", align_corners=True)
        with contextlib.nullcontext() if x.is_cuda else cuda_moves_ignored():
            return net.forward_early_exit([low, x], eta)[0]

    return forward


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_early_exit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--focus-fraction", type=float, default=0.22,
                   help="share of the images reaching the focus stage (default: 0.22)")
    bench.add_released_argument(p, "github.com/edgeai1/LF-ViT", "LFVIT_RELEASED")
    bench.add_arguments(p, "runs/bench/lfvit.json")
    return p


def command(args: argparse.Namespace) -> int:
    if not 0.0 <= args.focus_fraction <= 1.0:
        raise ValueError("--focus-fraction must be in [0, 1]")
    cfg = bench.config(args, "lfvit")
    torch.manual_seed(cfg.seed)
    model = bench.laid_out(bench.peaked(timm.create_model("lfvit_deit_small_patch16_224"), cfg.peak), cfg)
    dense = bench.laid_out(VisionTransformer(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6).eval(),
                           cfg)
    dense.load_state_dict({k: v for k, v in model.state_dict().items() if k in dense.state_dict()})
    released = bench.laid_out(released_model(args.released, model), cfg)
    compiled = copy.deepcopy(model).compile_stages() if cfg.compile == "all" else None
    dense_compiled = bench.compile_dense(dense) if cfg.compile != "none" else None
    stages, dense_g = stage_flops(model), dense_gflops(model)
    rows, operating = [], []
    for b in cfg.batch_sizes:
        pool = bench.images(b, 224, cfg.seed)
        eta = eta_for_share(model, pool, args.focus_fraction)
        with torch.inference_mode():
            logits = model.forward_early_exit(pool, eta)  # batch-invariant: the pool's answer at any batch size
        reached = model.record.exit_stage.float().mean().item()
        ideal = dense_g / stages.expected(reached)
        method = bench.Method(lambda t, eta=eta: model.forward_early_exit(t, eta), ideal,
                              None if compiled is None else lambda t, eta=eta: compiled.forward_early_exit(t, eta))
        point = {"batch_size": b, "eta": eta, "focus_fraction": reached,
                 "expected_gflops": stages.expected(reached), "ideal_speedup": ideal}
        extra, against = {}, ""
        if released is not None and not model.record.exit_stage.view(-1, b).any(1).all():
            print(f"batch {b}: the released code is not timed: some batch sends no image to the focus stage, "
                  "where its forward_early_exit fails (torch.stack of an empty list in block_information)")
        elif released is not None:
            extra["released code"] = released_early_exit(released, eta)
            with torch.inference_mode():
                theirs = torch.cat([extra["released code"](t) for t in pool.split(b)])
            point["max_abs_logit_diff_vs_released"] = (logits - theirs).abs().max().item()
            against = f"; logits vs the released code: max abs diff {point['max_abs_logit_diff_vs_released']:.1e}"
        batch_rows = bench.compare_methods(dense, {"lfvit early exit": method}, pool, b, cfg, dense_compiled, extra)
        bench.speedups_over(batch_rows, "released code", "vs_released", "lfvit early exit")
        rows += batch_rows
        operating.append(point)
        print(f"batch {b}: {reached:.3f} of {len(pool)} images to focus (eta {eta:.6f}), "
              f"{stages.expected(reached):.3f} GFLOPs vs dense {dense_g:.3f}: ideal {ideal:.2f}x{against}")
    bench.report(rows, cfg, operating_points=operating, dense_gflops=dense_g)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), command, argv)


if __name__ == "__main__":
    sys.exit(main())
