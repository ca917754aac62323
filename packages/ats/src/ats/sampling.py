"""Adaptive Token Sampling as pure tensor functions (Fayyaz et al., ECCV 2022, Sec. 3).

All functions work on a *batch of variable-length token sets*: every image ``b`` has ``n[b]`` candidate
tokens stored in the first ``n[b]`` columns of a padded ``[B, M]`` tensor. Each image is processed exactly
as if it were alone (the released code couples images through its padded batch; we do not).

Two selection modes:

* ``official`` -- the released code (``ats_block.py``): ascending sort of the scores, min-max normalised
  CDF, a ``ys_start..1`` grid, nearest-CDF-*value* picks (first index on ties), dedup; kept tokens are
  returned in ascending-score order. For ``K < N`` the rectangular reading (grid of ``K-1`` points).
* ``paper`` -- Eqs. 4-5 literally: the CDF in token order, the ``(2i-1)/(2K)`` grid, inverse transform
  sampling ``Psi(k) = CDF^-1(k)``, dedup; kept tokens in token order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

OFFICIAL_EPS = 1e-6  # softmax_with_policy, transformer_block.py:255
_SENTINEL_GAP = 1e8  # create_ys: ignore ncdf == 0 when looking for ys_start (ats_block.py:72)


def in_fp32(select: Callable) -> Callable:
    """Run ``select`` (a scoring-and-sampling step) with autocast off and its floating-point tensor arguments in
    float32. Under bf16 autocast the score row would be a bf16 product, and bf16 scores flip the nearest-CDF picks
    of inverse transform sampling; in fp32 runs the casts are no-ops, so results are unchanged."""

    @functools.wraps(select)
    def run(*args, **kwargs):
        device = next(a.device.type for a in (*args, *kwargs.values()) if isinstance(a, Tensor))
        args = [a.float() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args]
        kwargs = {k: v.float() if isinstance(v, Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}
        with torch.autocast(device, enabled=False):
            return select(*args, **kwargs)

    return run


def stage_k(n_tokens: int, k: float) -> int:
    """K of one ATS stage for an image with ``n_tokens`` tokens (CLS included); K counts the CLS.

    ``k <= 1`` is a ratio rho (``K = max(round(rho * N), 8)``), larger values an absolute K; the result is
    clamped to ``[.., N]``. Same arithmetic as the released ``AdaptiveTokenSampler.forward`` (Python round).
    """
    kk = min(float(k), n_tokens)
    if kk <= 1.0:
        kk = kk * n_tokens
    if kk < 8:
        kk = 8
    return min(round(kk), n_tokens)


def stage_k_tensor(n_tokens: Tensor, k: float) -> Tensor:
    """:func:`stage_k` for every image of ``n_tokens`` ``[B]`` on its device (float64 and round-half-even, as
    Python), so that no count has to travel to the host."""
    n = n_tokens.double()
    kk = n.clamp(max=float(k))
    kk = torch.where(kk <= 1.0, kk * n, kk).clamp(min=8.0)
    return torch.minimum(kk.round().long(), n_tokens)


def valid_mask(n: Tensor, width: int) -> Tensor:
    """``[B, width]`` bool mask of the first ``n[b]`` columns."""
    return torch.arange(width, device=n.device) < n[:, None]


def cls_attention(q_row: Tensor, k: Tensor, scale: float, n: Tensor, eps: float | None = None) -> Tensor:
    """One attention row per image and head, ``softmax(q_row k^T / sqrt(d))`` (Eq. 1, a single query).

    ``q_row`` is ``[B, H, 1, d]``, ``k`` is ``[B, H, N, d]``; keys at or beyond ``n[b]`` are masked. With
    ``eps`` the released eps-softmax is used: ``(e + eps/n) / (sum e + eps)``, ``n`` the image's token count.
    Returns ``[B, H, N]`` (exactly zero at masked keys).
    """
    logits = (q_row @ k.transpose(-2, -1)).squeeze(-2) * scale
    keep = valid_mask(n, logits.shape[-1])[:, None, :]
    logits = logits.masked_fill(~keep, float("-inf"))
    if eps is None:
        return logits.softmax(-1)
    e = (logits.float() - logits.float().amax(-1, keepdim=True)).exp()
    attn = (e + eps / n.to(e.dtype)[:, None, None]) / (e.sum(-1, keepdim=True) + eps)
    return attn.masked_fill(~keep, 0.0).to(logits.dtype)


def value_norms(v: Tensor, per_head: bool = False) -> Tensor:
    """``||V_j||`` of Eq. 3 from ``v`` ``[B, H, N, d]``: ``[B, N]``, the norm of the concatenation of all heads'
    values (the released code), or ``[B, H, N]`` per head (``per_head``, the paper's reading)."""
    if per_head:
        return v.norm(dim=-1)
    return v.transpose(1, 2).reshape(v.shape[0], v.shape[2], -1).norm(dim=-1)


def significance_scores(attn: Tensor, v_norm: Tensor, n: Tensor) -> Tensor:
    """Released-code score: ``S_j = (sum_h A_h[j]) * ||V_j|| / sum_i (...)`` (Eq. 3).

    ``attn`` ``[B, H, M]`` (attention weights on the M candidates), ``v_norm`` ``[B, M]`` the L2 norm of the
    concatenation of all heads' values (or ones for the no-||V|| ablation). Padding columns score 0.
    """
    s = attn.sum(1) * v_norm
    s = s.masked_fill(~valid_mask(n, s.shape[-1]), 0.0)
    return s / s.sum(-1, keepdim=True)


def significance_scores_per_head(attn: Tensor, v_norm: Tensor, n: Tensor) -> Tensor:
    """Paper score (Eq. 3 per head, "then sum the scores over all heads"), renormalised to sum to 1.

    ``attn`` and ``v_norm`` are ``[B, H, M]`` (per-head value norms).
    """
    s = attn * v_norm
    s = s.masked_fill(~valid_mask(n, s.shape[-1])[:, None, :], 0.0)
    s = (s / s.sum(-1, keepdim=True)).sum(1)
    return s / s.sum(-1, keepdim=True)


@functools.lru_cache(maxsize=16)
def linspace_rows(width: int, device: torch.device | str | None = None) -> Tensor:
    """``[width + 1, width]`` table whose row ``g`` holds ``torch.linspace(0, 1, g)`` (zero padded), so that a batch
    of images with different grid sizes takes its grids with one gather, bitwise equal to ``torch.linspace``.
    Cached per width and device (do not modify it)."""
    with torch.inference_mode(False), torch.no_grad():
        rows = torch.zeros(width + 1, width, device=device)
        for g in range(1, width + 1):
            rows[g, :g] = torch.linspace(0, 1.0, steps=g, device=device)
    return rows


def official_grid(ys_start: Tensor, points: Tensor, lin: Tensor) -> Tensor:
    """``create_ys`` of the released code: ``points[b]`` values from ``ys_start[b]`` to 1 (ats_block.py:54-84).

    ``ys_start`` and ``points`` are ``[B]``, ``lin`` a :func:`linspace_rows` table; returns ``[B, W]`` (``W`` =
    ``lin``'s width, garbage beyond ``points[b]``) with the released code's float operations in float32.
    """
    width = lin.shape[1]
    ys = lin.index_select(0, points)
    steps = torch.arange(0, width, device=ys_start.device, dtype=ys.dtype).unsqueeze(0)
    start, d = ys_start[:, None], (points - 1).to(ys.dtype)[:, None]  # n - 2 with n = points + 1
    return start + (((ys * d) - start * steps) / d)


def paper_grid(points: Tensor, width: int) -> Tensor:
    """Deterministic sample points ``k_i = (2i - 1) / (2G)``, ``i = 1..G`` (Sec. 3.2); ``[B, width]``."""
    i = torch.arange(width, device=points.device, dtype=torch.float32)
    return (2 * i + 1)[None, :] / (2 * points.clamp(min=1).float()[:, None])


def nearest_index(values: Tensor, queries: Tensor, n: Tensor) -> Tensor:
    """``argmin_j |queries_i - values_j|`` over the first ``n[b]`` entries, first index on ties.

    ``values`` ``[B, M]`` must be non-decreasing on the valid prefix (a normalised CDF). Equivalent to the
    released code's brute-force ``torch.min(abs(ys - ncdf))`` (ats_block.py:141-151) in O(G log M).
    """
    last = (n - 1).clamp(min=0)[:, None]
    values = values.contiguous()
    hi = torch.searchsorted(values, queries.contiguous())
    lo = torch.minimum((hi - 1).clamp(min=0), last)
    hi = torch.minimum(hi, last)
    d_lo = (queries - values.gather(1, lo)).abs()
    d_hi = (queries - values.gather(1, hi)).abs()
    pick = torch.where(d_lo <= d_hi, lo, hi)
    # the clamp only matters for non-finite scores (a NaN CDF sorts past the end): the indices stay in range and
    # the NaN reaches the output, where the training loop's divergence check names it instead of an index error
    return torch.minimum(torch.searchsorted(values, values.gather(1, pick).contiguous()), last)


def unique_sorted(picks: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Distinct values of each row of ``picks`` (where ``valid``), ascending, left-aligned.

    Returns ``(unique [B, W] padded with -1, count [B])``: the dedup step ("we only keep one instance"). Sort and
    compare neighbours (no ``torch.unique``, whose output size would need a host read).
    """
    big = torch.iinfo(picks.dtype).max
    srt = picks.masked_fill(~valid, big).sort(-1).values
    first = torch.ones_like(srt, dtype=torch.bool)
    first[:, 1:] = srt[:, 1:] != srt[:, :-1]
    first &= srt != big
    return compact(srt, first)


def compact(values: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Left-align ``values[keep]`` per row (order preserved); returns ``(padded with -1, count)``.

    The output keeps the input's width (no host read of the largest count)."""
    count = keep.sum(-1)
    width = keep.shape[-1]
    slot = torch.where(keep, keep.long().cumsum(-1) - 1, width)
    out = values.new_full((values.shape[0], width + 1), -1)
    out.scatter_(1, slot, torch.where(keep, values, -1))
    return out[:, :width], count


def _nothing(scores: Tensor) -> tuple[Tensor, Tensor]:
    """Selection result when no image has a candidate left."""
    B = scores.shape[0]
    return torch.empty(B, 0, dtype=torch.long, device=scores.device), torch.zeros(B, dtype=torch.long,
                                                                                    device=scores.device)


def official_select(scores: Tensor, n: Tensor, points: Tensor, lin: Tensor) -> tuple[Tensor, Tensor]:
    """Released-code inverse transform sampling (ats_block.py:115-196) for each image.

    ``scores`` ``[B, M]`` normalised significance scores of the candidates (CLS excluded), ``n`` the number
    of candidates per image, ``points`` the grid size per image (``n_ref - 1`` when K = N, else ``K - 1``),
    ``lin`` a :func:`linspace_rows` table at least as wide as the largest grid (``n_ref - 1`` covers every case).
    Returns the kept candidate indices in ascending-score order (``[B, W]`` padded with -1, ``W`` = ``lin``'s
    width) and K'. No host sync: every shape follows from the inputs' shapes.
    """
    if scores.shape[1] == 0:
        return _nothing(scores)
    M = scores.shape[1]
    valid = valid_mask(n, M)
    sorted_scores, order = scores.masked_fill(~valid, float("inf")).sort(dim=-1, stable=True)
    cdf = sorted_scores.masked_fill(~valid, 0.0).cumsum(-1)
    cmin = cdf.min(-1, keepdim=True).values
    cmax = cdf.max(-1, keepdim=True).values
    ncdf = (cdf - cmin) / ((cmax - cmin) / 1.0)
    ys_start = (ncdf + (ncdf == 0).float() * _SENTINEL_GAP).min(-1).values
    ys = official_grid(ys_start, points, lin)
    grid_valid = valid_mask(points, ys.shape[1]) & (n > 0)[:, None]
    picks = nearest_index(ncdf, ys, n).masked_fill((n == 1)[:, None], 0)  # one candidate: 0/0 CDF
    kept, count = unique_sorted(picks, grid_valid)
    # get_unique_indices pads its shifted copy with the value 1, so a largest pick equal to 1 is dropped.
    bug = (count > 0) & (kept.gather(1, (count - 1).clamp(min=0)[:, None]).squeeze(1) == 1)
    count = count - bug.long()
    kept = torch.where(valid_mask(count, kept.shape[1]), kept, -1)
    return order.gather(1, kept.clamp(min=0)).masked_fill(kept < 0, -1), count


def paper_select(scores: Tensor, n: Tensor, points: Tensor) -> tuple[Tensor, Tensor]:
    """Paper inverse transform sampling (Eqs. 4-5): ``CDF_i = sum_{j<=i} S_j`` in token order, samples
    ``k_i = (2i-1)/(2G)``, token ``Psi(k) = min{i : CDF_i >= k}``, duplicates removed.

    ``points`` (G per image) must not exceed ``M``. Returns the kept candidate indices in token order (``[B, M]``
    padded with -1) and K'.
    """
    if scores.shape[1] == 0:
        return _nothing(scores)
    M = scores.shape[1]
    cdf = scores.masked_fill(~valid_mask(n, M), 0.0).cumsum(-1)
    ks = paper_grid(points, M)
    picks = torch.minimum(torch.searchsorted(cdf, ks), (n - 1).clamp(min=0)[:, None])
    return unique_sorted(picks, valid_mask(points, M) & (n > 0)[:, None])


def topk_select(scores: Tensor, n: Tensor, points: Tensor) -> tuple[Tensor, Tensor]:
    """Top-K ablation (Sec. 4.1): the ``min(points, n)`` highest-scoring candidates, highest first (``[B, M]``)."""
    if scores.shape[1] == 0:
        return _nothing(scores)
    M = scores.shape[1]
    count = torch.minimum(points, n)
    idx = scores.masked_fill(~valid_mask(n, M), float("-inf")).topk(M, -1).indices
    return idx.masked_fill(~valid_mask(count, M), -1), count
