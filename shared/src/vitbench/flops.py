"""FLOPs in the papers' convention: one multiply-add = one FLOP (so these are GMACs).

The analytic count follows fvcore, which produced the papers' figures: linear/conv/matmul MACs, LayerNorm at
5 per element (``layernorm=False`` drops it), softmax, GELU and additions free. Adaptive models give a token count
per block (per image), and report the mean of per-image counts. ``flop_counter_gmacs`` cross-checks any forward with
``torch.utils.flop_counter.FlopCounterMode`` (which counts 2 FLOPs per MAC and no LayerNorm). It runs the forward with
the math attention backend, so ``q k^T`` and ``A V`` show up as matrix products on every torch version (the fused CPU
kernel has no FLOP formula on some versions, which silently dropped attention from the count).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from . import models  # noqa: F401  (registers the embedded backbone)
from .cli import check_writable_file, run
from .report import markdown_table, write_json

LN_PER_ELEMENT = 5


def linear_macs(n: float, d_in: float, d_out: float) -> float:
    """``n`` rows through a ``d_in -> d_out`` linear layer."""
    return n * d_in * d_out


def layernorm_macs(n: float, dim: float) -> float:
    """fvcore's LayerNorm cost: 5 per element."""
    return LN_PER_ELEMENT * n * dim


def block_macs(dim: int, n_in: float, n_out: float | None = None, n_query: float | None = None,
               mlp_ratio: float = 4.0, layernorm: bool = True) -> float:
    """One pre-norm transformer block: LN + qkv on ``n_in`` tokens, ``QK^T`` for ``n_query`` query rows
    (default ``n_in``), ``A V``, proj, LN and MLP on the ``n_out`` rows the block outputs (default ``n_in``).
    Dense: ``12 n C^2 + 2 n^2 C`` (+ LayerNorms)."""
    n_out = n_in if n_out is None else n_out
    n_query = n_in if n_query is None else n_query
    macs = (
        linear_macs(n_in, dim, 3 * dim)  # qkv
        + n_query * n_in * dim  # Q K^T
        + n_out * n_in * dim  # A V
        + linear_macs(n_out, dim, dim)  # proj
        + 2 * linear_macs(n_out, dim, mlp_ratio * dim)  # MLP
    )
    if layernorm:
        macs += layernorm_macs(n_in, dim) + layernorm_macs(n_out, dim)
    return macs


@dataclass(frozen=True)
class ViTGeometry:
    """What the FLOPs of a plain ViT depend on."""

    dim: int
    depth: int
    mlp_ratio: float
    patch_size: int
    in_chans: int
    num_classes: int
    grid: tuple[int, int]
    num_prefix_tokens: int = 1

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_prefix_tokens

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> ViTGeometry:
        """Read the geometry of a timm ``VisionTransformer`` (or anything with the same attributes)."""
        pe = model.patch_embed
        patch = pe.patch_size[0] if isinstance(pe.patch_size, (tuple, list)) else pe.patch_size
        mlp = model.blocks[0].mlp
        return cls(
            dim=model.embed_dim,
            depth=len(model.blocks),
            mlp_ratio=mlp.fc1.out_features / model.embed_dim,
            patch_size=int(patch),
            in_chans=pe.proj.in_channels,
            num_classes=model.num_classes,
            grid=tuple(int(g) for g in pe.grid_size),
            num_prefix_tokens=getattr(model, "num_prefix_tokens", 1),
        )

    def at_grid(self, grid: tuple[int, int]) -> ViTGeometry:
        return ViTGeometry(**{**asdict(self), "grid": tuple(grid)})


def patch_embed_macs(geom: ViTGeometry, num_patches: int | None = None) -> float:
    n = geom.num_patches if num_patches is None else num_patches
    return n * geom.patch_size**2 * geom.in_chans * geom.dim


def head_macs(geom: ViTGeometry) -> float:
    return geom.dim * geom.num_classes


def vit_macs(geom: ViTGeometry, tokens_per_block: Sequence | None = None, layernorm: bool = True) -> float:
    """MACs of one image through a ViT. ``tokens_per_block[i]`` is block i's token count, or a tuple
    ``(n_in, n_out[, n_query])`` for blocks that shrink the sequence (see :func:`block_macs`); default dense."""
    counts = [geom.num_tokens] * geom.depth if tokens_per_block is None else list(tokens_per_block)
    if len(counts) != geom.depth:
        raise ValueError(f"need {geom.depth} token counts, got {len(counts)}")
    macs = patch_embed_macs(geom) + head_macs(geom)
    n_last = geom.num_tokens
    for c in counts:
        if isinstance(c, (tuple, list)):
            n_in, n_out, *rest = c
            n_query = rest[0] if rest else n_in
        else:
            n_in = n_out = n_query = c
        macs += block_macs(geom.dim, n_in, n_out, n_query, geom.mlp_ratio, layernorm)
        n_last = n_out
    if layernorm:
        macs += layernorm_macs(n_last, geom.dim)  # final norm
    return macs


def vit_gmacs(geom: ViTGeometry, tokens_per_block: Sequence | None = None, layernorm: bool = True) -> float:
    """:func:`vit_macs` in G (the papers' "GFLOPs")."""
    return vit_macs(geom, tokens_per_block, layernorm) / 1e9


CROSS_CHECK_COUNTS = ("torch FlopCounterMode / 2: convolution, linear and matrix-product MACs, attention included "
                      "(math attention backend); no LayerNorm, softmax or GELU")


def flop_counter_gmacs(fn: Callable, inputs: torch.Tensor) -> float:
    """Per-image GMACs of ``fn(inputs)`` measured by ``FlopCounterMode`` (total / 2 / batch); see
    ``CROSS_CHECK_COUNTS``. Attention runs on the math backend so that it is counted on every torch version."""
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn(inputs)
    return counter.get_total_flops() / 2 / inputs.shape[0] / 1e9


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vitbench-flops",
        description="GFLOPs (= GMACs, the papers' convention) of a timm ViT: analytic count with fvcore's "
        "conventions, cross-checked against torch's FlopCounterMode.",
    )
    p.add_argument("--model", default="deit_small_patch16_224", help="timm model name")
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's)")
    p.add_argument("--no-layernorm", action="store_true", help="do not count LayerNorm (5 MACs per element)")
    p.add_argument("--no-cross-check", action="store_true", help="skip the FlopCounterMode measurement")
    p.add_argument("--json", default=None, help="write the result to this JSON file (default: none)")
    return p


def create_vit(name: str, img_size: int | None = None) -> torch.nn.Module:
    """A randomly initialised timm ViT in eval mode; ``ValueError`` for an unknown name, a model without a patch grid
    or an ``img_size`` that is not a positive multiple of the patch size."""

    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r} (see timm.list_models())")
    if img_size is not None and img_size < 1:
        raise ValueError(f"--img-size must be positive, got {img_size}")
    kwargs = {"img_size": img_size} if img_size else {}
    try:
        model = timm.create_model(name, pretrained=False, **kwargs).eval()
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"cannot build {name!r} with {kwargs or 'its defaults'}: {e}") from None
    if not (hasattr(model, "patch_embed") and hasattr(model, "blocks") and hasattr(model, "embed_dim")):
        raise ValueError(f"{name!r} is not a ViT with a patch grid")
    patch = model.patch_embed.patch_size
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    if img_size is not None and img_size % patch:
        raise ValueError(f"--img-size {img_size} is not a multiple of {name}'s patch size {patch}")
    return model


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), command, argv)


def command(args: argparse.Namespace) -> int:
    if args.json:
        check_writable_file(args.json)
    model = create_vit(args.model, args.img_size)
    geom = ViTGeometry.from_model(model)
    size = geom.grid[0] * geom.patch_size
    result = {"model": args.model, "img_size": size, "tokens": geom.num_tokens,
              "gmacs": vit_gmacs(geom, layernorm=not args.no_layernorm), "layernorm": not args.no_layernorm}
    if not args.no_cross_check:
        measured = flop_counter_gmacs(model, torch.randn(1, geom.in_chans, size, size))
        analytic = vit_gmacs(geom, layernorm=False)
        result.update(flop_counter_gmacs=measured, analytic_without_layernorm=analytic,
                      cross_check_difference=measured / analytic - 1, cross_check_counts=CROSS_CHECK_COUNTS)
    print(markdown_table([result], [c for c in ("model", "img_size", "tokens", "gmacs", "flop_counter_gmacs")
                                    if c in result], digits=3))
    if not args.no_cross_check:
        print(f"flop_counter_gmacs = {CROSS_CHECK_COUNTS}; analytic count without LayerNorm "
              f"{result['analytic_without_layernorm']:.3f}, difference {100 * result['cross_check_difference']:+.2f} %")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
