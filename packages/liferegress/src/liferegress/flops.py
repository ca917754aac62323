"""GFLOPs (= GMACs, the papers' convention) of a Life Regression model in hard mode.

Blocks run on the schedule's token counts (the same for every image, so the per-image mean is this number), plus
the life predictor once: non-affine LayerNorm on all tokens, every patch projected by ``W`` (N D^2) and dotted with
[CLS] (N D). fvcore conventions through ``vitbench.flops`` (LayerNorm 5 per element, switchable).
"""

from __future__ import annotations

from torch import nn
from vitbench.flops import ViTGeometry, layernorm_macs, linear_macs, vit_macs

from .patch import LifeRegressionConfig

__all__ = ["predictor_macs", "liferegress_gmacs", "model_gmacs"]


def predictor_macs(geom: ViTGeometry, layernorm: bool = True) -> float:
    """MACs of the life regression module (Eqs. 1-2) for one image."""
    n_patches = geom.num_tokens - 1
    macs = linear_macs(n_patches, geom.dim, geom.dim) + n_patches * geom.dim
    return macs + (layernorm_macs(geom.num_tokens, geom.dim) if layernorm else 0.0)


def liferegress_gmacs(geom: ViTGeometry, cfg: LifeRegressionConfig | None, layernorm: bool = True) -> float:
    """GMACs of one image through the hard-pruned model (``cfg=None``: the unpruned backbone)."""
    if cfg is None:
        return vit_macs(geom, layernorm=layernorm) / 1e9
    if cfg.num_tokens != geom.num_tokens or cfg.depth != geom.depth:
        raise ValueError(f"schedule for {cfg.num_tokens} tokens / depth {cfg.depth} does not fit {geom}")
    return (vit_macs(geom, cfg.tokens_per_block, layernorm) + predictor_macs(geom, layernorm)) / 1e9


def model_gmacs(model: nn.Module, layernorm: bool = True) -> float:
    """GMACs of a timm ViT, patched (hard mode) or not."""
    return liferegress_gmacs(ViTGeometry.from_model(model), getattr(model, "life_cfg", None), layernorm)
