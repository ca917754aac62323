"""Video transformers from timm building blocks, in the two forms the ATS paper samples (Tables 2, 3, A.2).

* **TimeSformer** (Bertasius et al., ICML 2021), divided space-time attention: every block runs temporal
  attention (each patch with the same patch of the other frames, then ``temporal_fc``), then spatial attention
  (each frame's patches with a per-frame copy of the one CLS token; the copies' outputs are averaged), then the
  MLP. Configurations B (8 x 224), HR (16 x 448) and L (96 x 224), all ViT-B/16.
* **X-ViT** (Bulat et al., NeurIPS 2021), space-time mixing attention: a ViT-B/16 runs on every frame with its
  own CLS token; the keys and values of every attention layer mix channels of the neighbouring frames
  (``C / shift_div`` channels from frame t+1, as many from t-1, the rest from t), so attention stays O(T S^2);
  a one-block temporal encoder over the frames' CLS tokens ("consensus") classifies. 8x and 16x frames.

Clips are ``[B, C, T, H, W]`` (the released codes' layout). Inside, patch tokens are a grid ``[B, T, S, C]``
with the CLS token(s) beside it. Blocks take an optional ``alive`` mask ``[B, T, S]``: tokens outside it are
masked out of every attention (their keys and values are zero), which is how ATS (:mod:`ats.video.patch`) drops
tokens per clip. Module names follow the released checkpoints; :func:`ats.video.checkpoint.convert_released` maps
their keys.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import Attention, PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from vitbench.patching import qkv_heads

from ..registry import register_unshipped_models

ARCHS = ("timesformer", "xvit")
Selector = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
"""``select(q, k, v, alive) -> alive``: an ATS step given a frame-wise attention's q, k, v
(``[B, T, H, 1 + S, d]``, CLS first) and the alive mask ``[B, T, S]``; returns the mask of kept tokens."""


def attention_mask(keep: Tensor) -> Tensor:
    """Boolean ``[B', 1, N, N]`` mask: a query sees the kept keys and always itself (so no row is empty)."""
    n = keep.shape[-1]
    return (keep[:, None, :] | torch.eye(n, dtype=torch.bool, device=keep.device))[:, None]


class VideoAttention(Attention):
    """timm ``Attention`` split into :meth:`heads` and :meth:`attend`, so ATS can read q, k, v; same parameters."""

    def heads(self, x: Tensor, keep: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``x`` ``[B', N, C]`` -> q, k, v ``[B', H, N, d]``; rows outside ``keep`` ``[B', N]`` get zero k and v."""
        q, k, v = qkv_heads(self, self.qkv(x))
        if keep is not None:
            k, v = (t * keep[:, None, :, None] for t in (k, v))
        return q, k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.attn_drop.p if self.training else 0.0)
        B, _, N, _ = o.shape
        return self.proj_drop(self.proj(self.norm(o.transpose(1, 2).reshape(B, N, self.attn_dim))))

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        mask = None if keep is None else attention_mask(keep)
        return self.attend(*self.heads(x, keep), mask)


def _frames_keep(alive: Tensor | None) -> Tensor | None:
    """``[B, T, S]`` alive patches -> ``[B * T, 1 + S]`` keep mask with the (per-frame) CLS always kept."""
    if alive is None:
        return None
    B, T, S = alive.shape
    return torch.cat([alive.new_ones(B, T, 1), alive], -1).reshape(B * T, 1 + S)


class TimeSformerBlock(Block):
    """timm ``Block`` plus TimeSformer's temporal branch (``temporal_norm1``, ``temporal_attn``, ``temporal_fc``).

    Modifications: ``forward(cls [B, C], x [B, T, S, C], alive, select)``; temporal attention over the T frames
    of every patch position, spatial attention over every frame's patches plus a copy of the CLS token (the T
    copies' outputs averaged), as in the released ``Block`` (divided_space_time)."""

    def __init__(self, dim: int, num_heads: int, **kwargs):
        super().__init__(dim, num_heads, attn_layer=VideoAttention, **kwargs)
        self.temporal_norm1 = kwargs.get("norm_layer", nn.LayerNorm)(dim)
        self.temporal_attn = VideoAttention(dim, num_heads, qkv_bias=kwargs.get("qkv_bias", False))
        self.temporal_fc = nn.Linear(dim, dim)

    def forward(self, cls: Tensor, x: Tensor, alive: Tensor | None = None,
                select: Selector | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        B, T, S, C = x.shape
        xt = x.transpose(1, 2).reshape(B * S, T, C)
        keep_t = None if alive is None else alive.transpose(1, 2).reshape(B * S, T)
        res = self.drop_path1(self.temporal_attn(self.temporal_norm1(xt), keep_t))
        x = x + self.temporal_fc(res.reshape(B, S, T, C).transpose(1, 2))

        xs = torch.cat([cls[:, None, None, :].expand(B, T, 1, C), x], 2).reshape(B * T, 1 + S, C)
        keep_s = _frames_keep(alive)
        q, k, v = self.attn.heads(self.norm1(xs), keep_s)
        if select is not None:
            alive = select(*(t.reshape(B, T, *t.shape[1:]) for t in (q, k, v)), _all_alive(alive, x))
        mask = None if keep_s is None else attention_mask(keep_s)
        res = self.drop_path1(self.ls1(self.attn.attend(q, k, v, mask))).reshape(B, T, 1 + S, C)
        tokens = torch.cat([cls[:, None], x.reshape(B, T * S, C)], 1)
        tokens = tokens + torch.cat([res[:, :, 0].mean(1, keepdim=True), res[:, :, 1:].reshape(B, T * S, C)], 1)
        tokens = tokens + self.drop_path2(self.ls2(self.mlp(self.norm2(tokens))))
        return tokens[:, 0], tokens[:, 1:].reshape(B, T, S, C), alive


def _all_alive(alive: Tensor | None, x: Tensor) -> Tensor:
    return alive if alive is not None else torch.ones(x.shape[:3], dtype=torch.bool, device=x.device)


class XViTAttention(VideoAttention):
    """Space-time mixing attention (X-ViT Eq. 6): keys and values of frame t take channels ``[0, C/div)`` from
    frame t+1 and ``[C/div, 2C/div)`` from frame t-1 (zero past a segment's ends), as the released
    ``TemporalShift`` on the concatenated heads; the query stays frame t's. Frames are cut into segments of
    ``segment`` frames that do not mix (the released K400/K600 configs shift within 8 of 16 frames)."""

    segment: int = 8
    shift_div: int = 8

    def heads(self, x: Tensor, keep: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = super().heads(x, keep)
        return q, self.shift(k), self.shift(v)

    def shift(self, t: Tensor) -> Tensor:
        BT, H, N, d = t.shape
        seg, fold = self.segment, H * d // self.shift_div
        g = t.transpose(1, 2).reshape(BT // seg, seg, N, H * d)
        out = g.clone()
        out[:, :-1, :, :fold] = g[:, 1:, :, :fold]
        out[:, -1, :, :fold] = 0
        out[:, 1:, :, fold : 2 * fold] = g[:, :-1, :, fold : 2 * fold]
        out[:, 0, :, fold : 2 * fold] = 0
        return out.reshape(BT, N, H, d).transpose(1, 2)


class XViTBlock(Block):
    """timm ``Block`` with space-time mixing attention on every frame's ``[CLS_t, patches_t]``.

    Modifications: ``forward(cls [B, T, C], x [B, T, S, C], alive, select)``; the attention is
    :class:`XViTAttention` (same parameters as timm's)."""

    def __init__(self, dim: int, num_heads: int, **kwargs):
        super().__init__(dim, num_heads, attn_layer=XViTAttention, **kwargs)

    def forward(self, cls: Tensor, x: Tensor, alive: Tensor | None = None,
                select: Selector | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        B, T, S, C = x.shape
        tokens = torch.cat([cls[:, :, None], x], 2).reshape(B * T, 1 + S, C)
        keep = _frames_keep(alive)
        q, k, v = self.attn.heads(self.norm1(tokens), keep)
        if select is not None:
            alive = select(*(t.reshape(B, T, *t.shape[1:]) for t in (q, k, v)), _all_alive(alive, x))
        mask = None if keep is None else attention_mask(keep)
        tokens = tokens + self.drop_path1(self.ls1(self.attn.attend(q, k, v, mask)))
        tokens = tokens + self.drop_path2(self.ls2(self.mlp(self.norm2(tokens))))
        tokens = tokens.reshape(B, T, 1 + S, C)
        return tokens[:, :, 0], tokens[:, :, 1:], alive


class VideoTransformer(nn.Module):
    """Shared body: per-frame patch embedding, blocks on ``(cls, grid)`` tokens, ``forward_features`` /
    ``forward_head`` split as timm's. Subclasses define the token layout and the head."""

    arch: str

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_frames: int = 8,
                 num_classes: int = 400, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, block_fn: type[Block] = TimeSformerBlock, frame_stride: int = 32):
        super().__init__()
        self.num_classes = num_classes
        self.num_frames = num_frames
        self.frame_stride = frame_stride  # video frames between a clip's frames (the released test configs)
        self.embed_dim = self.num_features = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            block_fn(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop_rate,
                     drop_path=dpr[i], norm_layer=partial(nn.LayerNorm, eps=1e-6)) for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.patch_embed.grid_size)

    def check_input(self, x: Tensor) -> None:
        expected = (self.patch_embed.proj.in_channels, self.num_frames, *self.patch_embed.img_size)
        if x.dim() != 5 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"{type(self).__name__} takes clips [B, C, T, H, W] = [B, {', '.join(map(str, expected))}]"
                             f", got {list(x.shape)}")

    def embed(self, x: Tensor) -> Tensor:
        """``[B, C, T, H, W]`` -> every frame's tokens, CLS first, with positions: ``[B, T, 1 + S, C]``."""
        self.check_input(x)
        B, _, T, H, W = x.shape
        p = self.patch_embed(x.transpose(1, 2).reshape(B * T, -1, H, W))
        tokens = torch.cat([self.cls_token.expand(B * T, -1, -1), p], 1) + self.pos_embed
        return self.pos_drop(tokens).reshape(B, T, 1 + p.shape[1], -1)

    def run_blocks(self, cls: Tensor, x: Tensor, selectors: dict[int, Selector] | None = None,
                   record: Callable | None = None) -> tuple[Tensor, Tensor]:
        """Every block in turn; ``selectors[i]`` makes block i an ATS stage, ``record(i, alive_in, alive_out)``
        sees the masks (None while no token was dropped)."""
        alive = None
        for i, blk in enumerate(self.blocks):
            select = selectors.get(i) if selectors else None
            before = alive
            cls, x, alive = blk(cls, x, alive, select)
            if record is not None:
                record(i, before, alive)
        return cls, x

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class TimeSformer(VideoTransformer):
    """TimeSformer (divided space-time attention). Parameters as the released ``VisionTransformer``:
    ``cls_token``, ``pos_embed`` ``[1, 1 + S, C]``, ``time_embed`` ``[1, T, C]``, blocks, ``norm``, ``head``."""

    arch = "timesformer"

    def __init__(self, num_classes: int = 400, embed_dim: int = 768, num_frames: int = 8, drop_rate: float = 0.0,
                 **kwargs):
        super().__init__(num_classes=num_classes, embed_dim=embed_dim, num_frames=num_frames, drop_rate=drop_rate,
                         block_fn=TimeSformerBlock, **kwargs)
        self.time_embed = nn.Parameter(torch.zeros(1, num_frames, embed_dim))
        self.time_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head.apply(self._init_weights)
        for blk in list(self.blocks)[1:]:  # released init: temporal_fc starts at zero except in block 0
            nn.init.zeros_(blk.temporal_fc.weight)
            nn.init.zeros_(blk.temporal_fc.bias)

    def tokens(self, x: Tensor) -> tuple[Tensor, Tensor]:
        t = self.embed(x)
        return t[:, 0, 0], self.time_drop(t[:, :, 1:] + self.time_embed[:, :, None, :])

    def forward_features(self, x: Tensor, selectors: dict[int, Selector] | None = None,
                         record: Callable | None = None) -> Tensor:
        cls, _ = self.run_blocks(*self.tokens(x), selectors, record)
        return self.norm(cls)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return x if pre_logits else self.head(x)


class TemporalHead(nn.Module):
    """X-ViT's temporal attention aggregation (the released ``VitHead``): a CLS token and one transformer
    block over the frames' CLS outputs, then LayerNorm -> Linear -> GELU -> Dropout -> Linear."""

    def __init__(self, dim: int, num_classes: int, num_heads: int = 12, hidden: int | None = None,
                 dropout: float = 0.0):
        super().__init__()
        hidden = hidden or dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.temporal_encoder = nn.Sequential(Block(dim, num_heads, qkv_bias=False, norm_layer=nn.LayerNorm))
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                      nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
        return self.mlp_head(self.temporal_encoder(x)[:, 0])


class XViT(VideoTransformer):
    """X-ViT (space-time mixing attention). Parameters as the released ``XVIT``: the per-frame ViT
    (``cls_token``, ``pos_embed``, ``temp_embed`` ``[1, T, 1, C]``, blocks, ``norm``) and ``consensus``."""

    arch = "xvit"

    def __init__(self, num_classes: int = 400, embed_dim: int = 768, num_heads: int = 12, num_frames: int = 8,
                 segment: int | None = None, shift_div: int = 8, head_heads: int | None = None,
                 head_dropout: float = 0.5, **kwargs):
        super().__init__(num_classes=num_classes, embed_dim=embed_dim, num_heads=num_heads, num_frames=num_frames,
                         block_fn=XViTBlock, **kwargs)
        segment = segment or num_frames
        if num_frames % segment or embed_dim % shift_div:
            raise ValueError(f"X-ViT needs frames ({num_frames}) divisible by segment ({segment}) and width "
                             f"({embed_dim}) divisible by shift_div ({shift_div})")
        for blk in self.blocks:
            blk.attn.segment, blk.attn.shift_div = segment, shift_div
        self.temp_embed = nn.Parameter(torch.zeros(1, num_frames, 1, embed_dim))
        self.head_drop = nn.Dropout(head_dropout)
        self.consensus = TemporalHead(embed_dim, num_classes, head_heads or num_heads, dropout=head_dropout)
        self.consensus.apply(self._init_weights)

    def tokens(self, x: Tensor) -> tuple[Tensor, Tensor]:
        t = self.embed(x) + self.temp_embed
        return t[:, :, 0], t[:, :, 1:]

    def forward_features(self, x: Tensor, selectors: dict[int, Selector] | None = None,
                         record: Callable | None = None) -> Tensor:
        cls, _ = self.run_blocks(*self.tokens(x), selectors, record)
        return self.norm(cls)  # [B, T, C]: every frame's CLS

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return x if pre_logits else self.consensus(self.head_drop(x))


# Registered names. The released Kinetics checkpoints are not shipped; load them with ``load_released``.
_K400 = dict(num_classes=400, mean=(0.45, 0.45, 0.45), std=(0.225, 0.225, 0.225), crop_pct=1.0,
             interpolation="bilinear", first_conv="patch_embed.proj", classifier="head", license="apache-2.0")
_XVIT = dict(_K400, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), classifier="consensus.mlp_head.4")
_DIGITS = dict(_K400, num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
VIDEO_MODELS = {
    # name: (class, kwargs, pretrained_cfg)
    # frames x frame_stride as the released checkpoints' names (TimeSformer 8x32, 16x16, 96x4); X-ViT: 8x32, and
    # 16x16 for the same span (an assumption, see the README)
    "timesformer_base_patch16_224": (TimeSformer, dict(img_size=224, num_frames=8, frame_stride=32), _K400),
    "timesformer_hr_patch16_448": (TimeSformer, dict(img_size=448, num_frames=16, num_classes=600, frame_stride=16),
                                   dict(_K400, num_classes=600)),
    "timesformer_l_patch16_224": (TimeSformer, dict(img_size=224, num_frames=96, frame_stride=4), _K400),
    "xvit_base_patch16_224_8f": (XViT, dict(img_size=224, num_frames=8, frame_stride=32), _XVIT),
    "xvit_base_patch16_224_16f": (XViT, dict(img_size=224, num_frames=16, segment=8, frame_stride=16), _XVIT),
    # embedded moving-digits geometry: 8 frames (every 2nd of 16) of 64 px, patch 8 (8 x 8 grid), depth 12, width 64
    "timesformer_digits_patch8_64": (TimeSformer, dict(img_size=64, patch_size=8, num_frames=8, embed_dim=64,
                                                       num_heads=2, num_classes=10, frame_stride=2), _DIGITS),
    "xvit_digits_patch8_64": (XViT, dict(img_size=64, patch_size=8, num_frames=8, embed_dim=64, num_heads=2,
                                         num_classes=10, head_dropout=0.0, frame_stride=2), _DIGITS),
}
register_unshipped_models(VIDEO_MODELS, globals(), "the authors' checkpoint with ats.video.load_released(model, path)")
