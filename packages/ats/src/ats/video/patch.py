"""ATS on the video transformers of :mod:`ats.video.models`, with the same :mod:`ats.sampling` functions as on images.

Where (ATS paper, Appendix E.4/E.5): X-ViT blocks 3..11, TimeSformer blocks 3..5 (0-based, as the image stages).
The paper does not spell out the video details; these are our readings, documented in the README:

* **What the CLS attends to.** The sampling step sits in the attention in which the CLS token takes part, the
  spatial attention (TimeSformer's temporal attention has no CLS). Every frame has a CLS query (TimeSformer's
  per-frame copy of its one CLS token; X-ViT's own per-frame CLS) whose attention row over that frame's tokens
  gives ``A[cls, (t, s)]``; the score of patch ``(t, s)`` is that row times ``||V_(t, s)||`` (Eq. 3; heads summed
  in ``official`` mode, per head in ``paper`` mode), normalised over **all patches of the clip**.
* **How K counts.** One sampler per clip over all its ``T x S`` patches: ``N`` = alive patches + 1 (the CLS,
  counted once), ``K = max(round(rho * N), 8)`` or an absolute K, ``K' <= K`` kept (CLS included), as for
  images. Frames rich in evidence keep more tokens than static ones.
* **What dropping means.** A dropped token leaves every later attention (temporal and spatial) as a query and a
  key; with X-ViT's channel mixing its key and value chunks are zero in the neighbouring frames, as at a clip's
  ends. The CLS token(s) are always kept. The sampling block itself still attends to all tokens (``O = A_s V``).

Per clip results never depend on the batch (masks, no shared padding). After every forward ``model.record``
(:class:`VideoATSRecord`) holds per block the tokens in/out (CLS included), the kept original indices
(0 = CLS, ``1 + t * S + s``) and the alive masks from which :func:`ats.video.flops.clip_gmacs` counts each clip.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from vitbench.patching import attach

from .. import sampling
from ..patch import ATSConfig, ATSRecord, schedule
from . import compact
from .models import TimeSformer, VideoTransformer, XViT

STAGES = {"timesformer": tuple(range(3, 6)), "xvit": tuple(range(3, 12))}


@dataclass
class VideoATSRecord(ATSRecord):
    """:class:`ats.patch.ATSRecord` for clips, plus ``alive``: ``[B, T, S]`` masks entering every block and
    leaving the last one (``depth + 1`` entries)."""

    frames: int = 0
    alive: list[Tensor] = field(default_factory=list)
    masked: bool = False

    def reset(self, n_ref: int, grid: tuple[int, int], frames: int = 0) -> None:
        super().reset(n_ref, grid)
        self.frames, self.alive = frames, []

    def kept_per_frame(self, block: int) -> Tensor:
        """``[B, T]`` patches of every frame that ATS block ``block`` kept."""
        return self.alive[block + 1].sum(-1)


@sampling.in_fp32
def grid_scores(q: Tensor, k: Tensor, v: Tensor, alive: Tensor, *, scale: float, mode: str) -> tuple[Tensor, Tensor]:
    """Eq. 3's ingredients from a clip's frame-wise q, k, v on the full grid (``[B, T, H, 1 + S, d]``, CLS first,
    zero k and v at dropped tokens): every frame's CLS attention row over its alive tokens, ``[B, H, T * S]``
    (zero at dropped patches), and the value norms, ``[B, T * S]`` (``official``) or ``[B, H, T * S]``
    (``paper``). The masked reference's route; the compacted blocks read the same from their padded view."""
    B, T, H, N1, d = k.shape
    S = N1 - 1
    keep = torch.cat([alive.new_ones(B, T, 1), alive], -1)
    # CLS rows per frame; cls_attention masks a prefix, so the kept keys are moved to the front and back again.
    order = (~keep).to(torch.int8).sort(dim=-1, stable=True).indices
    k_front = k.gather(3, order[:, :, None, :, None].expand(B, T, H, N1, d))
    eps = sampling.OFFICIAL_EPS if mode == "official" else None
    rows = sampling.cls_attention(q[:, :, :, :1].reshape(B * T, H, 1, d), k_front.reshape(B * T, H, N1, d), scale,
                                  keep.sum(-1).reshape(-1), eps)
    attn = torch.zeros_like(rows).scatter(-1, order.reshape(B * T, 1, N1).expand(-1, H, -1), rows)
    attn = attn.reshape(B, T, H, N1)[..., 1:].permute(0, 2, 1, 3).reshape(B, H, T * S)
    if mode == "paper":
        v_norm = v[:, :, :, 1:].float().norm(dim=-1).permute(0, 2, 1, 3).reshape(B, H, T * S)
    else:
        v_norm = v[:, :, :, 1:].permute(0, 1, 3, 2, 4).reshape(B, T * S, H * d).float().norm(dim=-1)
    return attn, v_norm


@sampling.in_fp32
def sample_clips(attn: Tensor, v_norm: Tensor, alive: Tensor, *, info: VideoATSRecord, block: int,
                 lin: Tensor | None = None) -> Tensor:
    """Score every alive patch of a clip (Eq. 3 from :func:`grid_scores`' ``attn`` and ``v_norm``), sample with one
    K per clip (Eqs. 4-6) and return the new ``[B, T, S]`` alive mask (in fp32 also under autocast; no host sync).
    ``lin``: the ``official`` grid table (:func:`ats.sampling.linspace_rows` of ``info.n_ref - 1``)."""
    cfg = info.config
    B, T, S = alive.shape
    H = attn.shape[1]
    positions = torch.arange(T * S, device=attn.device).expand(B, -1).contiguous()
    cand, n_cand = sampling.compact(positions, alive.reshape(B, T * S))
    at = cand.clamp(min=0)
    attn_c = attn.gather(2, at[:, None].expand(-1, H, -1))
    n_tokens = n_cand + 1
    ks = sampling.stage_k_tensor(n_tokens, cfg.k_of(block))
    if cfg.mode == "paper":
        scores = sampling.significance_scores_per_head(attn_c, v_norm.gather(2, at[:, None].expand(-1, H, -1)),
                                                       n_cand)
        sel, count = sampling.paper_select(scores, n_cand, ks - 1)
    else:
        scores = sampling.significance_scores(attn_c, v_norm.gather(1, at), n_cand)
        points = torch.where(ks == n_tokens, info.n_ref - 1, ks - 1)
        lin = sampling.linspace_rows(info.n_ref - 1, attn.device) if lin is None else lin
        sel, count = sampling.official_select(scores, n_cand, points, lin)
    kept = cand.gather(1, sel.clamp(min=0)).masked_fill(sel < 0, -1)
    new_alive = torch.zeros(B, T * S + 1, dtype=torch.bool, device=attn.device)
    new_alive.scatter_(1, torch.where(kept >= 0, kept, T * S), True)
    info.kept[block] = torch.cat([kept.new_zeros(B, 1), torch.where(kept >= 0, kept + 1, -1)], 1).detach()
    return new_alive[:, : T * S].reshape(B, T, S)


def select_tokens(q: Tensor, k: Tensor, v: Tensor, alive: Tensor, *, info: VideoATSRecord, block: int,
                  scale: float) -> Tensor:
    """The ATS step of the masked reference blocks on a clip's frame-wise attention (``q, k, v``
    ``[B, T, H, 1 + S, d]``, CLS first): :func:`grid_scores`, then :func:`sample_clips`."""
    attn, v_norm = grid_scores(q, k, v, alive, scale=scale, mode=info.config.mode)
    return sample_clips(attn, v_norm, alive, info=info, block=block)


class VideoATSMixin:
    """``forward_features`` that runs the blocks with the ATS selectors on compacted tokens
    (:func:`ats.video.compact.run_blocks`; ``record.masked``: the masked reference blocks) and fills ``record``."""

    record: VideoATSRecord

    def forward_features(self, x: Tensor) -> Tensor:
        info = self.record
        S = self.grid[0] * self.grid[1]
        T = self.num_frames
        info.reset(1 + T * S, self.grid, T)
        cls_tokens = 1 if self.arch == "timesformer" else T
        compiled = getattr(self, "compiled_parts", {})
        if info.masked:
            selectors = {b: partial(select_tokens, info=info, block=b, scale=self.blocks[b].attn.scale)
                         for b in info.config.stages}
        else:
            sample = compiled.get("sample", sample_clips)
            lin = sampling.linspace_rows(T * S, x.device) if info.config.mode == "official" else None
            selectors = {b: partial(sample, info=info, block=b, lin=lin) for b in info.config.stages}

        def record(i: int, before: Tensor | None, after: Tensor | None) -> None:
            ones = torch.ones(x.shape[0], T, S, dtype=torch.bool, device=x.device)
            before = ones if before is None else before
            after = ones if after is None else after
            info.alive.append(before)
            info.tokens_in.append(cls_tokens + before.sum((1, 2)))
            info.tokens_out.append(cls_tokens + after.sum((1, 2)))
            if i == len(self.blocks) - 1:
                info.alive.append(after)

        if info.masked:
            return super().forward_features(x, selectors, record)
        return self.norm(compact.run_blocks(self, *self.tokens(x), selectors, record, info.config.mode,
                                            compiled.get("block")))


def apply(model: VideoTransformer, stages: Iterable[int] | None = None, rho: float | None = None,
          k: float | None = None, mode: str = "official", masked: bool = False) -> VideoTransformer:
    """Patch a :mod:`ats.video.models` model in place with ATS and return it (parameters untouched).

    ``stages`` default to the paper's (TimeSformer 3..5, X-ViT 3..11); ``rho`` (``K_n = max(round(rho N_n), 8)``)
    or an absolute ``k`` per clip; default rho = 1 (K = N, the fine-tuning setting). ``mode`` ``official`` or
    ``paper`` as for images. Calling it again reconfigures the model. ``masked=True`` runs the reference blocks that
    mask dropped tokens instead of removing them (same results, no saving: the oracle of the tests)."""
    if not isinstance(model, (TimeSformer, XViT)):
        raise TypeError(f"video ATS patches an ats.video TimeSformer or XViT, got {type(model).__name__}")
    stages, ks = schedule(STAGES[model.arch] if stages is None else stages, rho, k, len(model.blocks))
    model.record = VideoATSRecord(ATSConfig(stages, ks, mode), masked=masked)
    return attach(model, VideoATSMixin)


def compile_ats(model: VideoTransformer, **options) -> VideoTransformer:
    """``torch.compile`` (in place, ``state_dict`` keys unchanged) the parts of a video ATS model that gain from it:
    the blocks that run before the first ATS stage, while every clip still has all its tokens (one graph per
    block), and the scoring and sampling of every stage (:func:`sample_clips`, one graph with dynamic token counts,
    ``dynamic=True``). The blocks after a stage's host read stay eager, as for images (:func:`ats.patch.compile_ats`).
    ``options`` go to ``torch.compile`` (e.g. ``mode``, ``backend``)."""
    if not isinstance(getattr(model, "record", None), VideoATSRecord):
        raise TypeError("compile_ats needs a model patched with ats.video.apply")
    options = {"dynamic": True, **options}
    block = compact.xvit_block if model.arch == "xvit" else compact.timesformer_block
    model.compiled_parts = {"sample": torch.compile(sample_clips, **options), "block": torch.compile(block, **options)}
    return model
