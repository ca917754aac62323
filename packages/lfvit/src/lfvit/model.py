"""LF-ViT on timm building blocks: a timm ``VisionTransformer`` with a second positional table, a fusion MLP and a
class-attention-recording ``Attention``.

LF-ViT is a model of its own (registered timm names, extra parameters), so it is a real subclass built with
``attn_layer=LFAttention`` rather than a mixin attached to an existing model; state-dict keys stay timm's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Attention, VisionTransformer
from vitbench.patching import qkv_heads

from .focus import focus_sequence, upsample_tokens
from .localization import (REGION_MODES, check_region_size, cls_attention, global_class_attention,
                           num_focus_cells, select_cells, select_window)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The paper's (and the released model's) settings, the defaults everywhere in lfvit: the region side m, alpha
# (K = ceil(alpha m^2) refined cells), beta (GCA moving average), the first block in the GCA and the region mode.
DEFAULT_REGION_SIZE = 5
DEFAULT_ALPHA = 0.88
DEFAULT_BETA = 0.99
DEFAULT_GCA_START = 3
DEFAULT_REGION_MODE = "ngca"


class LFAttention(Attention):
    """timm ``Attention`` that can also emit the head-mean CLS attention row.

    Modifications: when ``self.cls_rows`` is a list, the CLS query row of the attention (Eq. 2) is appended to
    it; with fused attention only that row is formed (``softmax(q_cls k^T)``), the output still comes from
    ``scaled_dot_product_attention``; without fused attention the row is read off the explicit map.
    """

    cls_rows: list | None = None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        # Note: this is copied from timm.layers.attention.Attention.forward with modifications.
        if self.cls_rows is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        B, N, _ = x.shape
        q, k, v = qkv_heads(self, self.qkv(x))
        if self.fused_attn:
            self.cls_rows.append(cls_attention(q, k, self.scale))
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            self.cls_rows.append(attn[:, :, 0].mean(dim=1))
            x = self.attn_drop(attn) @ v
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        return self.proj_drop(self.proj(x))


class LFOutput(NamedTuple):
    """Logits of both stages (two-stage forward)."""

    location: torch.Tensor
    focus: torch.Tensor


@dataclass
class LFRecord:
    """Per-image record of the last forward (rows follow the batch; -1 where a stage did not run).

    exit_stage: 0 = exited after localization, 1 = focus stage. gca: (B, g, g) global class attention.
    window: (B, 2) top-left (row, col) of the m x m region. cells: (B, K) selected coarse cells (raster, in
    descending GCA order). fine_index: (B, 4K) fine-grid token indices fed to the focus stage.
    confidence: (B,) max softmax of the location logits.
    """

    exit_stage: torch.Tensor
    gca: torch.Tensor
    window: torch.Tensor
    cells: torch.Tensor
    fine_index: torch.Tensor
    confidence: torch.Tensor


class _Localized(NamedTuple):
    logits: torch.Tensor
    tokens: torch.Tensor       # normalised output patch tokens Z_L (B, g^2, D)
    embeddings: torch.Tensor   # input coarse patch embeddings incl. positions (B, g^2, D)
    gca: torch.Tensor          # (B, g^2)


class LFVisionTransformer(VisionTransformer):
    """Localization-and-Focus ViT (Hu et al., AAAI'24), released-model semantics.

    Shared patch embedding, blocks, final norm and head; ``pos_embed`` is the 2g x 2g (full-resolution) table and
    ``pos_embed_coarse`` the g x g one; ``reuse_block`` = LayerNorm + MLP fusion. ``img_size`` is the full
    resolution; the localization stage sees the bilinear (align_corners=True) half-resolution image.

    Options: ``region_size`` m, ``alpha`` (K = ceil(alpha m^2)), ``beta`` (GCA moving average), ``gca_start``
    (first 0-indexed block in the GCA, 3 as released), ``region_mode`` (Table 6), ``region_selection`` (False =
    whole-image focus phase), ``whole_image_pos_embed`` (False reproduces the released whole-image phase, which
    adds no positional embedding).
    """

    def __init__(self, *, region_size: int = DEFAULT_REGION_SIZE, alpha: float = DEFAULT_ALPHA,
                 beta: float = DEFAULT_BETA, gca_start: int = DEFAULT_GCA_START, region_mode: str = DEFAULT_REGION_MODE,
                 region_selection: bool = True, whole_image_pos_embed: bool = True, **kwargs) -> None:
        kwargs.setdefault("qkv_bias", True)
        super().__init__(attn_layer=LFAttention, **kwargs)
        assert self.cls_token is not None and self.reg_token is None and not self.no_embed_class
        assert self.global_pool == "token" and isinstance(self.fc_norm, nn.Identity)
        assert isinstance(self.norm_pre, nn.Identity) and self.attn_pool is None
        assert not self.dynamic_img_size and self.pos_embed is not None
        full = self.patch_embed.grid_size
        if full[0] != full[1] or full[0] % 2:
            raise ValueError(f"LF-ViT needs an even square patch grid at full resolution, got {full}")
        self.grid = full[0] // 2
        self.patch_embed.strict_img_size = False
        for blk in self.blocks:
            assert isinstance(blk.attn, LFAttention) and isinstance(blk.ls1, nn.Identity)
        if not 0 <= gca_start < len(self.blocks):
            raise ValueError(f"gca_start={gca_start} must index one of the {len(self.blocks)} blocks")
        dim = self.embed_dim
        self.pos_embed_coarse = nn.Parameter(torch.zeros(1, self.grid * self.grid + 1, dim))
        self.reuse_block = nn.Sequential(nn.LayerNorm(dim, eps=1e-6), Mlp(dim, 4 * dim, dim, act_layer=nn.GELU))
        trunc_normal_(self.pos_embed_coarse, std=0.02)
        for m in self.reuse_block.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.gca_start = gca_start
        self.set_lf_options(region_size=region_size, alpha=alpha, beta=beta, region_mode=region_mode)
        self.region_selection = region_selection
        self.whole_image_pos_embed = whole_image_pos_embed
        self.region_generator: torch.Generator | None = None
        self.record: LFRecord | None = None

    @property
    def input_multiple(self) -> int:
        """Every input size is a multiple of twice the patch size: the localization stage's half-size image must
        have a whole patch grid too (the command-line ``--img-size`` check reads this)."""
        return 2 * self.patch_embed.patch_size[0]

    def set_lf_options(self, *, region_size: int | None = None, alpha: float | None = None,
                       beta: float | None = None, region_mode: str | None = None) -> None:
        """Validate and set m, alpha, beta and the region-selection mode."""
        region_size = self.region_size if region_size is None else region_size
        alpha = self.alpha if alpha is None else alpha
        beta = self.beta if beta is None else beta
        region_mode = self.region_mode if region_mode is None else region_mode
        check_region_size(region_size, self.grid)
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha={alpha} must be in (0, 1]")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta={beta} must be in [0, 1)")
        if region_mode not in REGION_MODES:
            raise ValueError(f"unknown region mode {region_mode!r}; choose from {REGION_MODES}")
        self.region_size, self.alpha, self.beta, self.region_mode = region_size, alpha, beta, region_mode

    @property
    def num_cells(self) -> int:
        """K, the number of coarse cells refined in the focus stage."""
        return num_focus_cells(self.region_size, self.alpha)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"pos_embed_coarse"}

    def downsample(self, x: torch.Tensor) -> torch.Tensor:
        """Half-resolution copy for the localization stage (bilinear, align_corners=True as released)."""
        h, w = x.shape[-2:]
        return F.interpolate(x, (h // 2, w // 2), mode="bilinear", align_corners=True)

    def localize(self, x_low: torch.Tensor) -> _Localized:
        """Localization stage on the half-resolution image; returns logits, Z_L, input embeddings and GCA."""
        x = self.patch_embed(x_low)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed_coarse
        x = self.pos_drop(x)
        embeddings = x[:, 1:]
        rows: list[torch.Tensor] = []
        for i, blk in enumerate(self.blocks):
            blk.attn.cls_rows = rows if i >= self.gca_start else None
            try:
                x = blk(x)
            finally:
                blk.attn.cls_rows = None
        x = self.norm(x)
        return _Localized(self.forward_head(x), x[:, 1:], embeddings, global_class_attention(rows, self.beta))

    def focus(self, x_full: torch.Tensor, loc: _Localized) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Focus stage on the full-resolution image, given the localization results of the same images."""
        b = x_full.shape[0]
        patches = self.patch_embed(x_full)
        reuse = self.reuse_block(loc.tokens)
        cls = self.cls_token.expand(b, -1, -1)
        sel: dict[str, torch.Tensor] = {}
        if self.region_selection:
            window = select_window(loc.gca, self.region_size, self.region_mode, self.region_generator)
            cells, reused = select_cells(loc.gca, window, self.region_size, self.alpha)
            x, fine_index = focus_sequence(cls + self.pos_embed[:, :1], patches, reuse, self.pos_embed[:, 1:],
                                           loc.embeddings, cells, reused, self.grid)
            sel = {"window": window, "cells": cells, "fine_index": fine_index}
        else:
            x = torch.cat((cls, patches + upsample_tokens(reuse, self.grid)), dim=1)
            if self.whole_image_pos_embed:
                x = x + self.pos_embed
        x = self.pos_drop(x)
        x = self.blocks(x)
        return self.forward_head(self.norm(x)), sel

    def compile_stages(self, **options) -> LFVisionTransformer:
        """``torch.compile`` the localization and the focus stage, each as one graph (``fullgraph=True``).

        The early-exit decision between them stays eager: the size of the focus sub-batch is data (one host read
        per forward). The focus stage sees a new batch size on most calls, so it is compiled with dynamic shapes
        unless ``options`` say otherwise; ``options`` go to ``torch.compile``. Returns the model."""
        self.localize = torch.compile(self.localize, fullgraph=True, **options)
        self.focus = torch.compile(self.focus, fullgraph=True, **{"dynamic": True, **options})
        return self

    def forward(self, x: torch.Tensor) -> LFOutput:
        """Two-stage forward (eta = 1, every image reaches the focus stage): location and focus logits."""
        loc = self.localize(self.downsample(x))
        z_f, sel = self.focus(x, loc)
        go = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        self.record = self._record(loc, go, torch.arange(x.shape[0], device=x.device), sel)
        return LFOutput(loc.logits, z_f)

    def forward_early_exit(self, x: torch.Tensor, eta: float) -> torch.Tensor:
        """Early-exit inference: images with ``max softmax(z_l) >= eta`` stop after localization, the rest run
        the focus stage as one sub-batch. Returns the final logits; the per-image record is ``record``.

        One host sync: the number of images going on (the sub-batch size) is read once."""
        check_eta(eta)
        if not self.region_selection:
            raise ValueError("early exit needs region selection (model.region_selection = True)")
        loc = self.localize(self.downsample(x))
        go = loc.logits.softmax(dim=-1).amax(dim=-1) < eta
        logits = loc.logits.clone()
        sel: dict[str, torch.Tensor] = {}
        idx = go.nonzero()[:, 0]
        if idx.numel():
            sub = _Localized(*(t.index_select(0, idx) for t in loc))
            z_f, sel = self.focus(x.index_select(0, idx), sub)
            logits.index_copy_(0, idx, z_f.to(logits.dtype))
        self.record = self._record(loc, go, idx, sel)
        return logits

    def _record(self, loc: _Localized, go: torch.Tensor, idx: torch.Tensor,
                sel: dict[str, torch.Tensor]) -> LFRecord:
        b, dev = go.shape[0], go.device
        k = self.num_cells
        out = {"window": torch.full((b, 2), -1, dtype=torch.long, device=dev),
               "cells": torch.full((b, k), -1, dtype=torch.long, device=dev),
               "fine_index": torch.full((b, 4 * k), -1, dtype=torch.long, device=dev)}
        for name, value in sel.items():
            out[name].index_copy_(0, idx, value)
        return LFRecord(exit_stage=go.long(), gca=loc.gca.detach().reshape(b, self.grid, self.grid),
                        confidence=loc.logits.detach().softmax(dim=-1).amax(dim=-1), **out)


def check_eta(eta: float) -> float:
    """Accept a confidence threshold eta in [0, 1]."""
    if not isinstance(eta, (int, float)) or not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta={eta!r} must be a number in [0, 1]")
    return float(eta)


def eta_for_share(model: LFVisionTransformer, images: torch.Tensor, share: float) -> float:
    """An eta sending ``round(share * len(images))`` of ``images`` to the focus stage: midway between two images'
    localization confidences (no ties at the threshold), so the share does not depend on float noise."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share={share!r} must be in [0, 1]")
    with torch.inference_mode():
        conf = model(images).location.float().softmax(-1).amax(-1).sort().values
    n = round(share * len(conf))
    if n == 0:
        return float(conf[0]) / 2
    return 1.0 if n == len(conf) else float((conf[n - 1] + conf[n]) / 2)


WEIGHTS_DIR = Path(__file__).parent / "weights"
EMBEDDED_WEIGHTS = WEIGHTS_DIR / "lfvit_vit_digits_patch8_112.safetensors"


def _cfg(**kwargs) -> dict:
    return {"input_size": (3, 224, 224), "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "crop_pct": 0.875,
            "interpolation": "bicubic", "num_classes": 1000, "first_conv": "patch_embed.proj", "classifier": "head",
            "license": "apache-2.0", **kwargs}


default_cfgs = generate_default_cfgs({
    "lfvit_deit_small_patch16_224": _cfg(),
    "lfvit_deit_small_patch16_288": _cfg(input_size=(3, 288, 288)),
    "lfvit_vit_digits_patch8_112.embedded": _cfg(file=str(EMBEDDED_WEIGHTS), input_size=(3, 112, 112),
                                                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0,
                                                 num_classes=10),
})


def _create(variant: str, arch: dict, pretrained: bool, **kwargs) -> LFVisionTransformer:
    if pretrained and variant != "lfvit_vit_digits_patch8_112":
        raise ValueError(f"no hosted LF-ViT weights for {variant}; give --checkpoint PATH (the released layout "
                         "is accepted)")
    if pretrained and not EMBEDDED_WEIGHTS.is_file():
        raise FileNotFoundError(f"the embedded LF-ViT weights are not installed ({EMBEDDED_WEIGHTS}); train them "
                                "with `lfvit-train` (see the lfvit README) or give --checkpoint PATH")
    return build_model_with_cfg(LFVisionTransformer, variant, pretrained, **{**arch, **kwargs})


_DEIT_S = {"patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6}


@register_model
def lfvit_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> LFVisionTransformer:
    """LF-ViT on DeiT-S, 224 px (g = 7)."""
    return _create("lfvit_deit_small_patch16_224", {**_DEIT_S, "img_size": 224}, pretrained, **kwargs)


@register_model
def lfvit_deit_small_patch16_288(pretrained: bool = False, **kwargs) -> LFVisionTransformer:
    """LF-ViT* on DeiT-S, 288 px (g = 9)."""
    return _create("lfvit_deit_small_patch16_288", {**_DEIT_S, "img_size": 288}, pretrained, **kwargs)


@register_model
def lfvit_vit_digits_patch8_112(pretrained: bool = False, **kwargs) -> LFVisionTransformer:
    """LF-ViT on the embedded backbone geometry: 112 px, patch 8 (14 x 14 full, 7 x 7 at 56 px), embed 64,
    depth 12, 2 heads, 10 classes. ``pretrained=True`` loads the weights shipped with lfvit."""
    arch = {"img_size": 112, "patch_size": 8, "embed_dim": 64, "depth": 12, "num_heads": 2, "num_classes": 10}
    return _create("lfvit_vit_digits_patch8_112", arch, pretrained, **kwargs)
