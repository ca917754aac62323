"""timm integration: ``apply(model, keep_rate=0.7, temperature=1.5)`` turns a timm ViT/DeiT into Life Regression.

ToMe-style, through :func:`vitbench.patching.attach`: the model's class is swapped for a subclass that overrides
``forward_features`` only, each block's ``Attention`` for :class:`~liferegress.attention.LifeRegressionAttention`
(timm's forward, except that a key bias needing a gradient keeps the fused kernel), and a ``life_predictor``
module (non-affine LayerNorm + one D x D matrix ``W``) is added. timm's ``Block`` is used unchanged: soft weights
enter as an additive ``attn_mask`` (``log β``), hard pruning slices the sequence. Backbone ``state_dict`` keys stay
as they are; the predictor adds ``life_predictor.W``.

After a forward, ``model.record`` holds each image's lives and, in hard mode, the original indices of the tokens
kept from each drop layer on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from vitbench.patching import attach

from .attention import LifeRegressionAttention
from .life import (
    DEFAULT_DROP_LAYERS,
    global_importance,
    keep_order,
    keep_schedule,
    kept_indices,
    life_statistics,
    lives_from_scores,
    log_soft_weights,
    tokens_per_block,
)

__all__ = ["MODES", "LifeRegressionConfig", "LifeRecord", "LifePredictor", "apply", "set_mode", "is_patched"]

MODES = ("auto", "soft", "hard", "mask")


@dataclass(frozen=True)
class LifeRegressionConfig:
    """Schedule and mode of a patched model (``model.life_cfg``).

    ``mode``: ``auto`` = soft weights while ``model.training`` and hard pruning in eval (stage 1 / inference);
    ``soft`` = always soft; ``hard`` = always hard pruning (stage 2 training); ``mask`` = the released code's
    unpruned evaluation variant, 0/1 weights ``τ > t`` on all tokens.
    """

    keep_counts: tuple[int, ...]
    drop_layers: tuple[int, ...]
    temperature: float
    depth: int
    num_tokens: int
    mode: str = "auto"
    keep_rate: float | None = None
    tokens_per_block: tuple[int, ...] = field(init=False)
    life_mu: float = field(init=False)
    life_sigma: float = field(init=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature U must be > 0, got {self.temperature}")
        object.__setattr__(
            self, "tokens_per_block", tokens_per_block(self.keep_counts, self.drop_layers, self.depth, self.num_tokens)
        )
        mu, sigma = life_statistics(self.keep_counts, self.drop_layers, self.depth, self.num_tokens)
        object.__setattr__(self, "life_mu", mu)
        object.__setattr__(self, "life_sigma", sigma)

    @property
    def t_base(self) -> int:
        """Blocks run before the lives are predicted (the first drop layer)."""
        return self.drop_layers[0]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class LifeRecord:
    """Per-forward state: ``lives`` (B, N) in layer units (CLS = T, unclamped, detached); ``kept_indices`` one
    (B, n_k) tensor of original token indices (0 = CLS) per drop layer in hard mode, else ``None``;
    ``tokens_per_block`` the token count each block ran on; ``mode`` the mode that ran (soft/hard/mask)."""

    lives: torch.Tensor
    kept_indices: tuple[torch.Tensor, ...] | None
    tokens_per_block: tuple[int, ...]
    mode: str


class LifePredictor(nn.Module):
    """Life regression module (Fig. 2): non-affine LayerNorm (Eq. 1), bilinear score with one D x D ``W`` (Eq. 2,
    uniform [0, 1) init as released), z-score mapped to the schedule's lives (Eq. 3)."""

    def __init__(self, dim: int, device=None, dtype=None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.W = nn.Parameter(torch.rand(dim, dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, cfg: LifeRegressionConfig) -> torch.Tensor:
        s = global_importance(self.norm(x), self.W)
        return lives_from_scores(s, cfg.life_mu, cfg.life_sigma, cfg.t_base, cfg.depth)


class LifeRegressionMixin:
    """Modifications of ``timm.models.vision_transformer.VisionTransformer.forward_features``: blocks
    ``0..t_base-1`` on all tokens, lives predicted once, then blocks ``t_base..T-1`` either with ``log β`` key bias
    (soft) or on the longest-lived ``n(a)`` tokens (hard)."""

    life_cfg: LifeRegressionConfig
    record: LifeRecord | None
    life_predictor: LifePredictor

    def active_mode(self) -> str:
        mode = self.life_cfg.mode
        if mode == "auto":
            return "soft" if self.training else "hard"
        return mode

    def forward_features(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("Life Regression models do not take an external attention mask")
        cfg = self.life_cfg
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        for blk in self.blocks[: cfg.t_base]:
            x = blk(x)
        lives = self.life_predictor(x, cfg)
        mode = self.active_mode()
        kept = None
        if mode == "hard":
            order = keep_order(lives.detach())
            kept = kept_indices(order, cfg.keep_counts)
            x = x.gather(1, kept[0].unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            for a in range(cfg.t_base, cfg.depth):
                x = self.blocks[a](x[:, : cfg.tokens_per_block[a]])
            counts = cfg.tokens_per_block
        else:
            for a in range(cfg.t_base, cfg.depth):
                if mode == "soft":
                    bias = log_soft_weights(lives, a, cfg.temperature)
                else:
                    bias = torch.zeros_like(lives).masked_fill_(lives <= a, float("-inf"))
                x = self.blocks[a](x, attn_mask=bias[:, None, None, :].to(x.dtype))
            counts = (cfg.num_tokens,) * cfg.depth
        self.record = LifeRecord(lives=lives.detach(), kept_indices=kept, tokens_per_block=counts, mode=mode)
        return self.norm(x)


def is_patched(model: nn.Module) -> bool:
    return isinstance(model, LifeRegressionMixin)


def check_structure(model: nn.Module) -> None:
    """Refuse a model Life Regression cannot patch: a timm ``VisionTransformer`` with one CLS token read by the
    classifier and plain timm blocks is needed."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"expected a timm VisionTransformer, got {type(model).__name__}")
    if model.cls_token is None or model.num_prefix_tokens != 1 or model.global_pool != "token":
        raise ValueError("Life Regression needs exactly one [CLS] prefix token pooled by 'token' (no registers)")
    if model.attn_pool is not None or getattr(model, "dynamic_img_size", False):
        raise ValueError("attention pooling and dynamic image size are not supported")
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise TypeError(f"block {i} is {type(blk).__name__}/{type(blk.attn).__name__}, "
                            "expected timm Block/Attention")


def apply(
    model: nn.Module,
    keep_rate: float | None = 0.7,
    temperature: float = 1.5,
    *,
    drop_layers: Sequence[int] = DEFAULT_DROP_LAYERS,
    keep_counts: Sequence[int] | None = None,
    mode: str = "auto",
) -> nn.Module:
    """Patch a timm ViT/DeiT in place for Life Regression and return it.

    ``keep_rate`` rho gives the per-drop-layer token counts (``keep_schedule``); ``keep_counts`` overrides them.
    ``temperature`` is U of Eq. 7. Re-applying to a patched model changes the schedule and keeps the trained ``W``.
    """
    if not is_patched(model):
        check_structure(model)
    depth = len(model.blocks)
    num_tokens = model.patch_embed.num_patches + 1
    if keep_counts is None:
        if keep_rate is None:
            raise ValueError("give keep_rate or keep_counts")
        keep_counts = keep_schedule(keep_rate, num_tokens, len(drop_layers))
    cfg = LifeRegressionConfig(
        keep_counts=tuple(int(n) for n in keep_counts),
        drop_layers=tuple(int(a) for a in drop_layers),
        temperature=float(temperature),
        depth=depth,
        num_tokens=num_tokens,
        mode=mode,
        keep_rate=keep_rate,
    )
    if not is_patched(model):
        ref = model.cls_token
        model.life_predictor = LifePredictor(model.embed_dim, device=ref.device, dtype=ref.dtype)
        attach(model, LifeRegressionMixin)
        for blk in model.blocks:
            attach(blk.attn, LifeRegressionAttention)
    model.life_cfg = cfg
    model.record = None
    return model


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    """Switch a patched model between ``auto``/``soft``/``hard``/``mask``."""
    if not is_patched(model):
        raise TypeError("model is not patched; call liferegress.apply first")
    model.life_cfg = dataclasses.replace(model.life_cfg, mode=mode)
    return model
