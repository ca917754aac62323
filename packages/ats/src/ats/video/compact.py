"""The blocks of :mod:`ats.video.models` on compacted tokens: once ATS has dropped a token it takes no further part.

Rows are packed per :class:`ats.video.layout.FrameLayout`. Every linear layer (qkv, proj, ``temporal_fc``, the MLP)
runs on the alive rows only; spatial attention runs per frame over the frame's CLS and alive patches, TimeSformer's
temporal attention per patch position over the frames where it is alive, X-ViT's key/value mixing takes the
neighbouring frame's channels where that token is alive and zeros where it was dropped. An ATS stage scores on the
padded per-frame view of its q, k, v (:func:`frame_scores`: the masked reference's
:func:`ats.video.patch.grid_scores` on the clip's grid of patches), attends with every alive query, and only the kept
rows go on through ``proj``, the residual and the MLP.

Same results as the masked blocks of :mod:`ats.video.models` (their ``alive`` argument, kept as the test oracle) to
float rounding; drop-path draws once per clip (the masked blocks draw per frame or per position).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from vitbench.patching import qkv_heads

from .. import sampling
from .layout import FrameLayout
from .models import TimeSformerBlock, VideoAttention, XViTBlock

Sampler = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``sample(scores, v_norm, alive) -> alive``: an ATS step given :func:`frame_scores`' CLS attention rows and value
norms on the clip's grid and the alive mask ``[B, T, S]`` (:func:`ats.video.patch.sample_clips`)."""


def attend(attn: VideoAttention, qkv: Tensor, mask: Tensor | None) -> Tensor:
    """Multi-head attention on a padded view ``[N, W, 3C]`` (``mask`` ``[N, 1, 1, W]`` of valid keys) ->
    ``[N, W, C]`` before ``proj``."""
    q, k, v = qkv_heads(attn, qkv)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    N, _, W, _ = o.shape
    return attn.norm(o.transpose(1, 2).reshape(N, W, attn.attn_dim))


def draw(module: nn.Module, clips: int, device: torch.device) -> Tensor | None:
    """timm ``DropPath``'s per-sample factors, one per clip (``None``: nothing dropped, e.g. in eval mode)."""
    p = float(getattr(module, "drop_prob", 0.0))
    if not module.training or p == 0.0:
        return None
    keep = torch.empty(clips, device=device).bernoulli_(1 - p)
    return keep / (1 - p) if getattr(module, "scale_by_keep", True) else keep


def drop_path(x: Tensor, keep: Tensor | None, clip: Tensor) -> Tensor:
    """``x`` (rows of the clips ``clip``) times its clip's drop-path factor ``keep`` (from :func:`draw`)."""
    return x if keep is None else x * keep.index_select(0, clip)[:, None]


@sampling.in_fp32
def frame_scores(p: Tensor, attn: VideoAttention, layout: FrameLayout, mode: str) -> tuple[Tensor, Tensor]:
    """:func:`ats.video.patch.grid_scores` from the spatial view ``p`` ``[B * T, W, 3C]`` (q|k|v, a frame's valid
    tokens a prefix): every frame's CLS attention row over its tokens and the value norms, on the clip's grid of
    patches (``[B, H, T * S]``; ``[B, T * S]`` or ``[B, H, T * S]``). In fp32 also under autocast."""
    B, T, S = layout.alive.shape
    H = attn.num_heads
    q, k, v = qkv_heads(attn, p)
    eps = sampling.OFFICIAL_EPS if mode == "official" else None
    rows = sampling.cls_attention(q[:, :, :1], k, attn.scale, layout.alive.sum(-1).flatten() + 1, eps)
    slots = layout.patch_slots
    scores = rows.transpose(0, 1).reshape(H, -1).index_select(1, slots).view(H, B, T * S).transpose(0, 1)
    if mode == "paper":
        v_norm = v.norm(dim=-1).transpose(0, 1).reshape(H, -1).index_select(1, slots).view(H, B, T * S).transpose(0, 1)
    else:
        v_norm = p[:, :, 2 * attn.attn_dim :].norm(dim=-1).flatten().index_select(0, slots).view(B, T * S)
    return scores, v_norm


def select_step(layout: FrameLayout, p: Tensor, attn: VideoAttention, select: Sampler, mode: str,
                xvit: bool) -> FrameLayout:
    """The ATS step on the spatial view ``p`` -> the layout of the kept tokens (its one host read)."""
    alive = select(*frame_scores(p, attn, layout, mode), layout.alive)
    return FrameLayout.of(alive, cls_rows=xvit, temporal=not xvit)


def row_clips(layout: FrameLayout) -> Tensor:
    """The clip of every packed row."""
    return layout.grid_index // (layout.T * (1 + layout.S))


def surviving(layout: FrameLayout, new: FrameLayout, o: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """The attention output ``o`` (padded view of ``layout``) packed as rows of ``new``, and the residual ``rows`` of
    the tokens alive in ``new`` (all of them when no ATS stage ran: ``new is layout``)."""
    if new is layout:
        return layout.pack(o), rows
    moved_rows, moved_slots = layout.moved(new)
    return layout.pack(o, moved_slots), rows.index_select(0, moved_rows)


def xvit_block(blk: XViTBlock, rows: Tensor, layout: FrameLayout, select: Sampler | None = None,
               mode: str = "official") -> tuple[Tensor, FrameLayout]:
    """One X-ViT block on packed rows (CLS rows included); with ``select`` an ATS stage. Returns rows, layout."""
    attn = blk.attn
    p = layout.pad_mixed(attn.qkv(blk.norm1(rows)), attn.segment, attn.attn_dim // attn.shift_div)
    new = layout if select is None else select_step(layout, p, attn, select, mode, xvit=True)
    o = attend(attn, p, layout.key_mask)
    o, residual = surviving(layout, new, o, rows)
    clip = row_clips(new) if blk.training else None
    keep1, keep2 = (draw(m, new.B, rows.device) for m in (blk.drop_path1, blk.drop_path2))
    x = residual + drop_path(blk.ls1(attn.proj_drop(attn.proj(o))), keep1, clip)
    return x + drop_path(blk.ls2(blk.mlp(blk.norm2(x))), keep2, clip), new


def timesformer_block(blk: TimeSformerBlock, cls: Tensor, rows: Tensor, layout: FrameLayout,
                      select: Sampler | None = None, mode: str = "official") -> tuple[Tensor, Tensor, FrameLayout]:
    """One divided space-time block on packed patch rows and the CLS token ``[B, C]``; with ``select`` an ATS
    stage. Returns cls, rows, layout."""
    B, T = layout.B, layout.T
    keep1, keep2 = (draw(m, B, rows.device) for m in (blk.drop_path1, blk.drop_path2))
    clip = row_clips(layout) if blk.training else None
    ta = blk.temporal_attn
    o = attend(ta, layout.pad_time(ta.qkv(blk.temporal_norm1(rows))), layout.time_mask)
    rows = rows + blk.temporal_fc(drop_path(ta.proj_drop(ta.proj(layout.pack_time(o))), keep1, clip))

    attn = blk.attn
    qkv_cls = attn.qkv(blk.norm1(cls)).repeat_interleave(T, 0)  # every frame's copy of the CLS token
    p = layout.pad(attn.qkv(blk.norm1(rows)), qkv_cls)
    new = layout if select is None else select_step(layout, p, attn, select, mode, xvit=False)
    o = attend(attn, p, layout.key_mask)
    o_rows, residual = surviving(layout, new, o, rows)
    clips = torch.arange(B, device=cls.device)
    cls_res = drop_path(blk.ls1(attn.proj_drop(attn.proj(o[:, 0]))), keep1, clips.repeat_interleave(T))
    cls = cls + cls_res.view(B, T, -1).mean(1)  # the frames' copies averaged
    clip = row_clips(new) if blk.training else None
    rows = residual + drop_path(blk.ls1(attn.proj_drop(attn.proj(o_rows))), keep1, clip)
    tokens = torch.cat([cls, rows])
    every = None if clip is None else torch.cat([clips, clip])
    tokens = tokens + drop_path(blk.ls2(blk.mlp(blk.norm2(tokens))), keep2, every)
    return tokens[:B], tokens[B:], new


def run_blocks(model: nn.Module, cls: Tensor, x: Tensor, selectors: dict[int, Sampler],
               record: Callable | None = None, mode: str = "official", uniform_block: Callable | None = None) -> Tensor:
    """Every block of an :mod:`ats.video.models` model on compacted tokens from its embedding ``(cls, x)``
    (``x`` ``[B, T, S, C]``); ``selectors[i]`` makes block i an ATS stage (``mode``: how it scores),
    ``record(i, alive_in, alive_out)`` sees the masks (None while nothing was dropped). Returns the CLS token(s)
    after the last block (X-ViT ``[B, T, C]``, TimeSformer ``[B, C]``). ``uniform_block`` (a compiled
    :func:`xvit_block` or :func:`timesformer_block`) runs the blocks before the first ATS stage."""
    B, T, S, C = x.shape
    xvit = model.arch == "xvit"
    layout = FrameLayout.full(B, T, S, cls_rows=xvit, device=x.device, temporal=not xvit)
    rows = (torch.cat([cls[:, :, None], x], 2) if xvit else x).reshape(-1, C)
    for i, blk in enumerate(model.blocks):
        before = layout
        select = selectors.get(i)
        step = uniform_block if uniform_block is not None and layout.uniform and select is None else None
        if xvit:
            rows, layout = (step or xvit_block)(blk, rows, layout, select, mode)
        else:
            cls, rows, layout = (step or timesformer_block)(blk, cls, rows, layout, select, mode)
        if record is not None:
            record(i, None if before.uniform else before.alive, None if layout.uniform else layout.alive)
    return layout.cls(rows) if xvit else cls
