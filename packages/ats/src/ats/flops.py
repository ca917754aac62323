"""Per-image FLOPs (GMACs, the papers' convention) of an ATS model from its recorded token counts.

``geometry`` is the backbone's FLOPs geometry (:func:`ats.backbones.geometry`: a timm ViT's
:class:`~vitbench.flops.ViTGeometry` or a CvT's): its ATS-able blocks (``depth``, ``num_tokens``, ``grid``) and
``gmacs(tokens_per_block, layernorm)``."""

from __future__ import annotations

import torch

from .patch import ATSConfig, ATSRecord
from .sampling import stage_k


def _query_rows(config: ATSConfig, n_in, n_out):
    """QK^T rows an ATS block computes: the score row plus the kept queries (all rows for the
    self-attention-score ablation, which needs the full matrix)."""
    return n_in + n_out if "self_attention" in config.variant else n_out + 1


def per_image_gmacs(geometry, info: ATSRecord, layernorm: bool = True) -> torch.Tensor:
    """``[B]`` GMACs of every image of the last forward, from its own token counts (padding never counted)."""
    n_in, n_out = (t.double() for t in info.token_counts())
    counts = []
    for i in range(geometry.depth):
        if i in info.config.stages:
            counts.append((n_in[:, i], n_out[:, i], _query_rows(info.config, n_in[:, i], n_out[:, i])))
        else:
            counts.append(n_in[:, i])
    return (geometry.at_grid(info.grid) if info.grid != (0, 0) else geometry).gmacs(counts, layernorm)


def upper_bound_gmacs(geometry, config: ATSConfig, layernorm: bool = True) -> float:
    """GMACs when every ATS stage keeps its maximum, K_n tokens (CLS included): no data needed.

    Exact for single-stage ATS at an absolute K (the paper's 2.0 / 2.5 / 3.0 G levels for K = 48 / 78 / 108)."""
    n = geometry.num_tokens
    counts: list = []
    for i in range(geometry.depth):
        if i in config.stages:
            k = stage_k(n, config.k_of(i))
            counts.append((n, k, _query_rows(config, n, k)))
            n = k
        else:
            counts.append(n)
            n = geometry.tokens_out(i, n) if hasattr(geometry, "tokens_out") else n  # EViT's blocks reorganise
    return geometry.gmacs(counts, layernorm)


def dense_gmacs(geometry, layernorm: bool = True) -> float:
    return geometry.gmacs(None, layernorm)
