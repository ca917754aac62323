"""FLOPs in the papers' convention: one multiply-add = one FLOP (so these are GMACs).

The analytic count follows fvcore, which produced the papers' figures: linear/conv/matmul MACs, LayerNorm at
5 per element (``layernorm=False`` drops it), softmax, GELU and additions free. Adaptive models give a token count
per block (per image), and report the mean of per-image counts. ``flop_counter_gmacs`` cross-checks any forward with
``torch.utils.flop_counter.FlopCounterMode`` (which counts 2 FLOPs per MAC and no LayerNorm). It runs the forward with
the math attention backend, so ``q k^T`` and ``A V`` show up as matrix products on every torch version (the fused CPU
kernel has no FLOP formula on some versions, which silently dropped attention from the count).

Models that are not plain ViTs (no patch grid: e.g. a convolutional backbone a ``vitbench.models`` plugin registers,
see :mod:`vitbench.models`) count themselves through the analytic-count protocol :data:`OWN_COUNT`: a method
``gmacs(self, img_size: int | None = None, layernorm: bool = True) -> float``, GMACs of one image at ``img_size`` px
(square; ``None``: the model's own size) in the papers' convention. ``layernorm=True`` counts the normalisation
layers at fvcore's costs (LayerNorm 5 per element, eval-mode BatchNorm 2); ``layernorm=False`` counts NO
normalisation at all (neither LayerNorm nor BatchNorm) and must then equal ``FlopCounterMode / 2``, which is what the
cross-check of ``vitbench-flops`` compares. A size the model cannot take raises ``ValueError``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from timm.data import resolve_model_data_config
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .cli import check_writable_file, run
from .models import create_model, is_model
from .outputs import check_own_json, has_keys
from .report import markdown_table, write_json

LN_PER_ELEMENT = 5
OWN_COUNT = "gmacs"  # the analytic-count protocol: model.gmacs(img_size=None, layernorm=True) -> GMACs per image


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

    def gmacs(self, tokens_per_block: Sequence | None = None, layernorm: bool = True) -> float:
        """:func:`vit_gmacs` of this geometry (token-reduction methods count any backbone geometry this way)."""
        return vit_gmacs(self, tokens_per_block, layernorm)


def patch_embed_macs(geom: ViTGeometry, num_patches: int | None = None) -> float:
    n = geom.num_patches if num_patches is None else num_patches
    return n * geom.patch_size**2 * geom.in_chans * geom.dim


def head_macs(geom: ViTGeometry) -> float:
    return geom.dim * geom.num_classes


def blocks_macs(dim: int, tokens_per_block: Sequence, mlp_ratio: float = 4.0,
                layernorm: bool = True) -> tuple[float, int | None]:
    """``(MACs, tokens out of the last block)`` of plain transformer blocks at the given token counts: each ``n``, or
    ``(n_in, n_out[, n_query])`` for a block that shrinks the sequence (see :func:`block_macs`)."""
    macs, n_last = 0.0, None
    for c in tokens_per_block:
        n_in, n_out, *rest = c if isinstance(c, (tuple, list)) else (c, c)
        macs += block_macs(dim, n_in, n_out, rest[0] if rest else n_in, mlp_ratio, layernorm)
        n_last = n_out
    return macs, n_last


def vit_macs(geom: ViTGeometry, tokens_per_block: Sequence | None = None, layernorm: bool = True) -> float:
    """MACs of one image through a ViT. ``tokens_per_block[i]`` is block i's token count, or a tuple
    ``(n_in, n_out[, n_query])`` for blocks that shrink the sequence (see :func:`block_macs`); default dense."""
    counts = [geom.num_tokens] * geom.depth if tokens_per_block is None else list(tokens_per_block)
    if len(counts) != geom.depth:
        raise ValueError(f"need {geom.depth} token counts, got {len(counts)}")
    blocks, n_last = blocks_macs(geom.dim, counts, geom.mlp_ratio, layernorm)
    macs = patch_embed_macs(geom) + head_macs(geom) + blocks
    if layernorm:
        macs += layernorm_macs(geom.num_tokens if n_last is None else n_last, geom.dim)  # final norm
    return macs


def vit_gmacs(geom: ViTGeometry, tokens_per_block: Sequence | None = None, layernorm: bool = True) -> float:
    """:func:`vit_macs` in G (the papers' "GFLOPs")."""
    return vit_macs(geom, tokens_per_block, layernorm) / 1e9


CROSS_CHECK_COUNTS = ("torch FlopCounterMode / 2: convolution, linear and matrix-product MACs, attention included "
                      "(math attention backend); no LayerNorm, BatchNorm, softmax or GELU")


def flop_counter_gmacs(fn: Callable, inputs: torch.Tensor) -> float:
    """Per-image GMACs of ``fn(inputs)`` measured by ``FlopCounterMode`` (total / 2 / batch); see
    ``CROSS_CHECK_COUNTS``. Attention runs on the math backend so that it is counted on every torch version."""
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn(inputs)
    return counter.get_total_flops() / 2 / inputs.shape[0] / 1e9


def has_own_count(model: torch.nn.Module) -> bool:
    """Whether ``model`` counts its own FLOPs (the :data:`OWN_COUNT` protocol, see the module docstring)."""
    return callable(getattr(model, OWN_COUNT, None))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vitbench-flops",
        description="GFLOPs (= GMACs, the papers' convention) of a timm ViT, or of a model with its own analytic "
        "count (a gmacs(img_size, layernorm) method, e.g. CvT from a vitbench.models plugin): fvcore's "
        "conventions, cross-checked against torch's FlopCounterMode.",
    )
    p.add_argument("--model", default="deit_small_patch16_224",
                   help="timm model name (models of the installed vitbench.models plugins included)")
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's)")
    p.add_argument("--no-layernorm", action="store_true",
                   help="do not count LayerNorm (5 MACs per element; for a model with its own count: no norm layers)")
    p.add_argument("--no-cross-check", action="store_true", help="skip the FlopCounterMode measurement")
    p.add_argument("--json", default=None, help="write the result to this JSON file (default: none)")
    return p


def build(name: str, **kwargs) -> torch.nn.Module:
    """``name`` randomly initialised, in eval mode; ``ValueError`` when it cannot be built with ``kwargs``."""
    try:
        return create_model(name, pretrained=False, **kwargs).eval()
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"cannot build {name!r} with {kwargs or 'its defaults'}: {e}") from None


def create_flops_model(name: str, img_size: int | None = None) -> torch.nn.Module:
    """What ``vitbench-flops`` counts: a model with its own count (:func:`has_own_count`, built at its defaults: the
    size goes to its ``gmacs``), else a ViT as :func:`create_vit` builds it. ``ValueError`` for an unknown name."""
    check_name_and_size(name, img_size)
    model = build(name)
    if has_own_count(model):
        return model
    return check_vit(build(name, img_size=img_size) if img_size else model, name, img_size)


def create_vit(name: str, img_size: int | None = None) -> torch.nn.Module:
    """A randomly initialised timm ViT in eval mode; ``ValueError`` for an unknown name, a model without a patch grid
    or an ``img_size`` that is not a positive multiple of the patch size."""
    check_name_and_size(name, img_size)
    return check_vit(build(name, **({"img_size": img_size} if img_size else {})), name, img_size)


def check_name_and_size(name: str, img_size: int | None) -> None:
    if not is_model(name):
        raise ValueError(f"unknown timm model {name!r} (see timm.list_models() and the vitbench.models plugins)")
    if img_size is not None and img_size < 1:
        raise ValueError(f"--img-size must be positive, got {img_size}")


def check_vit(model: torch.nn.Module, name: str, img_size: int | None) -> torch.nn.Module:
    """``model`` when it is a ViT with a patch grid that divides ``img_size``, else ``ValueError``."""
    if not (hasattr(model, "patch_embed") and hasattr(model, "blocks") and hasattr(model, "embed_dim")):
        raise ValueError(f"{name!r} is not a ViT with a patch grid and has no {OWN_COUNT}() count of its own")
    patch = model.patch_embed.patch_size
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    if img_size is not None and img_size % patch:
        raise ValueError(f"--img-size {img_size} is not a multiple of {name}'s patch size {patch}")
    return model


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), command, argv)


def vit_result(model: torch.nn.Module, args: argparse.Namespace) -> dict:
    """The ViT path: :func:`vit_gmacs` of the model's geometry, cross-checked without LayerNorm."""
    geom = ViTGeometry.from_model(model)
    size = geom.grid[0] * geom.patch_size
    result = {"model": args.model, "img_size": size, "tokens": geom.num_tokens,
              "counted_by": "vitbench.flops.vit_gmacs", "gmacs": vit_gmacs(geom, layernorm=not args.no_layernorm),
              "layernorm": not args.no_layernorm}
    if not args.no_cross_check:
        measured = flop_counter_gmacs(model, torch.randn(1, geom.in_chans, size, size))
        result.update(cross_check(measured, vit_gmacs(geom, layernorm=False)))
    return result


def own_result(model: torch.nn.Module, args: argparse.Namespace) -> dict:
    """The :data:`OWN_COUNT` path: ``model.gmacs`` at ``--img-size`` (default: the model's input size), cross-checked
    with ``layernorm=False`` (no norm layers at all) against ``FlopCounterMode``; no ``tokens`` field."""
    chans, height, _ = resolve_model_data_config(model)["input_size"]
    size = args.img_size or height
    count = getattr(model, OWN_COUNT)
    result = {"model": args.model, "img_size": size, "counted_by": f"{type(model).__name__}.{OWN_COUNT}",
              "gmacs": float(count(size, layernorm=not args.no_layernorm)), "layernorm": not args.no_layernorm}
    if not args.no_cross_check:
        try:
            measured = flop_counter_gmacs(model, torch.randn(1, chans, size, size))
        except RuntimeError as e:
            raise ValueError(f"{args.model} does not run at --img-size {size}: {str(e)[:200]}") from None
        result.update(cross_check(measured, float(count(size, layernorm=False))))
    return result


def cross_check(measured: float, analytic: float) -> dict:
    """The JSON fields of the cross-check: ``analytic_without_layernorm`` is the analytic count without any norm
    layer (LayerNorm, and BatchNorm for a model with its own count)."""
    return dict(flop_counter_gmacs=measured, analytic_without_layernorm=analytic,
                cross_check_difference=measured / analytic - 1, cross_check_counts=CROSS_CHECK_COUNTS)


# What every --json of vitbench-flops holds: an existing file without these keys is another command's and never
# replaced.
OWN_JSON = has_keys("model", "img_size", "counted_by", "gmacs", "layernorm")


def command(args: argparse.Namespace) -> int:
    if args.json:
        check_writable_file(args.json)
        check_own_json(args.json, OWN_JSON)
    model = create_flops_model(args.model, args.img_size)
    result = (own_result if has_own_count(model) else vit_result)(model, args)
    print(markdown_table([result], [c for c in ("model", "img_size", "tokens", "gmacs", "flop_counter_gmacs")
                                    if c in result], digits=3))
    if not args.no_cross_check:
        norms = "norms" if has_own_count(model) else "LayerNorm"
        print(f"flop_counter_gmacs = {CROSS_CHECK_COUNTS}; analytic count ({result['counted_by']}) without {norms} "
              f"{result['analytic_without_layernorm']:.3f}, difference {100 * result['cross_check_difference']:+.2f} %")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
