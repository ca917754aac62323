"""Life Regression as pure tensor functions (Chen et al., Sec. III).

Conventions (those of the released code; see the Decisions section of the package README):

* blocks are 0-indexed; ``drop_layers = (4, 7, 10)`` are the first blocks that run on a reduced token set and
  ``t_base = drop_layers[0]`` is the number of blocks run before the lives are predicted;
* token 0 is [CLS]; token counts always include it;
* a life ``tau`` is in layer units: a token with life ``l`` is used by blocks ``a < l`` (hard mode), and its soft
  weight in block ``a`` is ``sigmoid(U (tau - a))``. [CLS] has life ``T`` (the depth).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_DROP_LAYERS",
    "keep_schedule",
    "tokens_per_block",
    "life_statistics",
    "global_importance",
    "lives_from_scores",
    "soft_weights",
    "log_soft_weights",
    "step_weights",
    "keep_order",
    "kept_indices",
]

DEFAULT_DROP_LAYERS = (4, 7, 10)


def keep_schedule(keep_rate: float, num_tokens: int = 197, num_drops: int = 3) -> tuple[int, ...]:
    """Token counts (CLS included) kept from each drop layer on, for keep rate ``rho`` (Sec. III-D).

    ``n_{k+1} = ceil(rho * (n_k - 1)) + 2`` with ``n_0 = num_tokens``, capped at ``n_k``: EViT's sequence lengths,
    which reproduce the released code's hard-coded tuples exactly (0.9 -> 179/163/148, 0.8 -> 159/129/105,
    0.7 -> 140/100/72 for 197 tokens) and extend them to any ``rho`` and token count.
    """
    if not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"keep rate must be in (0, 1], got {keep_rate}")
    if num_tokens < 2:
        raise ValueError(f"need at least [CLS] and one patch, got {num_tokens} tokens")
    if num_drops < 1:
        raise ValueError(f"need at least one drop layer, got {num_drops}")
    counts, n = [], num_tokens
    for _ in range(num_drops):
        # round away float noise such as 0.7 * 140 = 97.99999999999999 before the ceiling
        n = min(n, math.ceil(round(keep_rate * (n - 1), 9)) + 2)
        counts.append(n)
    return tuple(counts)


def _check_schedule(keep_counts: Sequence[int], drop_layers: Sequence[int], depth: int, num_tokens: int) -> None:
    if len(keep_counts) != len(drop_layers) or not drop_layers:
        raise ValueError(f"need one keep count per drop layer, got {tuple(keep_counts)} for {tuple(drop_layers)}")
    if list(drop_layers) != sorted(set(drop_layers)) or drop_layers[0] < 1 or drop_layers[-1] >= depth:
        raise ValueError(f"drop layers must increase strictly within [1, {depth - 1}], got {tuple(drop_layers)}")
    prev = num_tokens
    for n in keep_counts:
        if not 1 <= n <= prev:
            raise ValueError(f"keep counts must be non-increasing within [1, {num_tokens}], got {tuple(keep_counts)}")
        prev = n


def tokens_per_block(
    keep_counts: Sequence[int], drop_layers: Sequence[int], depth: int, num_tokens: int
) -> tuple[int, ...]:
    """Number of tokens each of the ``depth`` blocks runs on (the ``n_t`` of Eq. 9, 0-indexed)."""
    _check_schedule(keep_counts, drop_layers, depth, num_tokens)
    counts = []
    for a in range(depth):
        passed = [n for layer, n in zip(drop_layers, keep_counts) if layer <= a]
        counts.append(passed[-1] if passed else num_tokens)
    return tuple(counts)


def life_statistics(
    keep_counts: Sequence[int], drop_layers: Sequence[int], depth: int, num_tokens: int
) -> tuple[float, float]:
    """Target mean and standard deviation of the lives, normalised to ``(tau - t_base) / (T - t_base)`` (Eqs. 9-10).

    The lives implied by the schedule are ``drop_layers[k]`` for the ``n_{k-1} - n_k`` tokens dropped there and ``T``
    for the ``n_last`` survivors, over all ``num_tokens`` tokens (CLS included). As in the released code the standard
    deviation is the sample one (Eq. 10 with the square; the population form differs by < 0.3 %).
    """
    _check_schedule(keep_counts, drop_layers, depth, num_tokens)
    t_base = drop_layers[0]
    group_lives = [(layer - t_base) / (depth - t_base) for layer in drop_layers] + [1.0]
    group_sizes = [prev - n for prev, n in zip([num_tokens, *keep_counts], [*keep_counts, 0])]
    lives = [life for life, size in zip(group_lives, group_sizes) for _ in range(size)]
    return statistics.mean(lives), statistics.stdev(lives)


def global_importance(x_bar: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Bilinear global importance of each patch, Eq. 2: ``s_i = x̄_iᵀ W x̄_cls`` for ``i = 1..N``.

    ``x_bar``: (B, 1 + N, D) normalised features at ``t_base`` (token 0 is CLS); ``W``: (D, D). Every patch is
    projected by ``W`` (the paper's "linear layer to a semantic subspace"), then dotted with the CLS token.
    Returns (B, N).
    """
    projected = x_bar[:, 1:] @ W  # (B, N, D)
    return (projected @ x_bar[:, :1].transpose(1, 2)).squeeze(-1)


def lives_from_scores(
    s: torch.Tensor, mu: float, sigma: float, t_base: int, depth: int, eps: float = 1e-8
) -> torch.Tensor:
    """Lives of all tokens from the patch scores, Eq. 3 in layer units; [CLS] gets life ``T = depth``.

    ``s``: (B, N). The scores are z-scored per image (unbiased std, ``eps`` added to it), mapped to the normalised
    target ``mu``/``sigma`` (``life_statistics``) and then to layers, ``tau = t_base + life_n (T - t_base)``.
    Lives are not clamped. Returns (B, 1 + N).
    """
    life_n = (s - s.mean(dim=-1, keepdim=True)) / (s.std(dim=-1, keepdim=True) + eps) * sigma + mu
    life_n = torch.cat((life_n.new_ones(life_n.shape[0], 1), life_n), dim=1)
    return t_base + life_n * (depth - t_base)


def soft_weights(tau: torch.Tensor, t: float | torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft weight of each token in block ``t``, Eq. 7 with the sign corrected: ``β_i(t) = sigmoid(U (τ_i - t))``.

    In (0, 1) and decreasing in ``t`` (Fig. 3); 0.5 at ``t = τ_i``.
    """
    return torch.sigmoid(temperature * (tau - t))


def log_soft_weights(tau: torch.Tensor, t: float | torch.Tensor, temperature: float) -> torch.Tensor:
    """``log β_i(t)``, numerically stable: added to the attention logits it turns softmax into Eq. 6's weighting."""
    return F.logsigmoid(temperature * (tau - t))


def step_weights(tau: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """0/1 weights ``β̄_i(t)`` of Eq. 4, as the released code's unpruned evaluation (``β_i(t) > 0.5``, i.e. τ > t)."""
    return (tau > t).to(tau.dtype)


def keep_order(tau: torch.Tensor) -> torch.Tensor:
    """Token indices sorted by life, longest first, [CLS] always first (Property 1: the order of β(t) for every t).

    ``tau``: (B, 1 + N). Ties keep the original order. Returns (B, 1 + N) int64.
    """
    tau = torch.cat((torch.full_like(tau[:, :1], float("inf")), tau[:, 1:]), dim=1)
    return torch.argsort(tau, dim=1, descending=True, stable=True)


def kept_indices(order: torch.Tensor, keep_counts: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """Original indices of the tokens kept from each drop layer on: the first ``n_k`` entries of ``keep_order``."""
    return tuple(order[:, :n] for n in keep_counts)
