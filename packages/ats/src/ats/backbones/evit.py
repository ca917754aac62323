"""EViT (Liang et al., "Not All Patches are What You Need: Expediting Vision Transformers via Token
Reorganizations", ICLR 2022) on timm blocks, and ATS inside it (the ATS paper's Table A.5).

EViT is a DeiT whose blocks 4, 7 and 10 (0-based 3, 6, 9; ``drop_loc``) reorganise the tokens after the attention
and before the MLP (EViT Sec. 3.2, as the released ``evit.py`` ``Block.forward``):

* the *attentiveness* of token j is the CLS row of the attention averaged over the heads, ``a_j = mean_h A_h[0, j]``
  (EViT Eq. 2, :func:`attentiveness`);
* the ``ceil(keep_rate * (N - 1))`` most attentive non-CLS tokens are kept, most attentive first
  (:func:`keep_count`, :func:`top_tokens`; ``N`` counts the CLS and an earlier fused token), their rows taken from
  the post-attention residual;
* the others are fused into one token appended last, ``x_fused = sum_j a_j x_j`` over the dropped tokens, with the
  attentiveness as it is (not renormalised; EViT Eq. 3, :func:`fuse_inattentive`).

At 224 px and ``keep_rate`` 0.7 the blocks see 197 -> 140 -> 100 -> 72 tokens; 3.03 GMACs without LayerNorm
(:class:`EViTGeometry`). :class:`EViT` is timm's ``VisionTransformer`` whose reorganising blocks are
:class:`EViTBlock` (a timm ``Block`` by class swap: parameters and ``state_dict`` keys are timm's, which are the
released checkpoints' too, :func:`convert_state_dict`); ``forward_features`` / ``forward_head`` are timm's.

ATS (:func:`apply`) samples in blocks 4, 5, 7, 8, 10 and 11 (0-based; ``STAGES``) with the same
:mod:`ats.sampling` functions; the EViT blocks then reorganise each image's own token set. Table A.5's
``K_n = round(0.7 x #InputTokens_n)`` is read by default as 0.7 x the tokens EViT alone gives block n (98, 98, 70,
70, 50, 50 at 224 px, ``k_rule="evit"``); ``k_rule="compound"`` takes 0.7 x the tokens that actually enter block n
(ATS's own rho rule, compounding over the stages). The first bounds EViT + ATS at 2.58 GMACs, the second at 2.15,
below the paper's 2.5 average: see the package README.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from vitbench.flops import ViTGeometry, block_macs, head_macs, layernorm_macs, linear_macs, patch_embed_macs
from vitbench.patching import attach

from ..patch import ATSAttention, ATSBlock, ATSRecord, ATSVisionTransformer, attach_ats
from ..patch import check_structure as check_vit
from ..registry import register_unshipped_models
from ..sampling import stage_k, valid_mask
from ..tokens import TokenSets, ragged_index

KEEP_RATE = 0.7  # EViT-DeiT-S (the released default base_keep_rate)
DROP_LOC = (3, 6, 9)  # EViT's reorganising blocks, 0-based (the released drop_loc)
STAGES = (4, 5, 7, 8, 10, 11)  # ATS in EViT-DeiT-S (Table A.5), 0-based
ATS_RHO = 0.7  # Table A.5's K_n = round(0.7 x #InputTokens_n)
K_RULES = ("evit", "compound")
FUSED = -2  # the original index recorded for a fused token (negative: not a patch of the grid)


# ---------------------------------------------------------------------------------------------- pure functions
def keep_count(n_tokens: int, keep_rate: float) -> int:
    """Non-CLS tokens a reorganising block keeps from ``n_tokens`` (CLS and a fused token included):
    ``ceil(keep_rate * (N - 1))`` (EViT Sec. 3.2; the released ``math.ceil(keep_rate * (N - 1))``, float64)."""
    return math.ceil(keep_rate * (n_tokens - 1))


def tokens_after(n_tokens, keep_rate: float):
    """Tokens leaving a reorganising block that ``n_tokens`` enter: CLS, the kept ones and the fused token, or all
    ``n_tokens`` unchanged when nothing would be dropped (the released block then returns them as they are). An
    int for an int, elementwise for a tensor (per-image counts; float64 as Python)."""
    if isinstance(n_tokens, Tensor):
        n = n_tokens.double()
        keep = torch.ceil(keep_rate * (n - 1))
        return torch.where(keep >= n - 1, n, keep + 2).to(n_tokens.dtype)
    keep = keep_count(n_tokens, keep_rate)
    return n_tokens if keep >= n_tokens - 1 else keep + 2


def attention_weights(q: Tensor, k: Tensor, scale: float, n: Tensor | None = None) -> Tensor:
    """``softmax(q k^T * scale)`` ``[B, H, N, N]`` (keys at or beyond ``n[b]`` masked when given): the whole matrix,
    as EViT's attention computes it (its CLS row is the attentiveness)."""
    logits = (q @ k.transpose(-2, -1)) * scale
    if n is not None:
        logits = logits.masked_fill(~valid_mask(n, logits.shape[-1])[:, None, None, :], float("-inf"))
    return logits.softmax(-1)


def attentiveness(attn: Tensor) -> Tensor:
    """EViT Eq. 2: the CLS row of the attention averaged over the heads, on the non-CLS tokens:
    ``[B, H, N, N]`` -> ``[B, N - 1]`` (zero at masked keys)."""
    return attn[:, :, 0, 1:].mean(1)


def top_tokens(score: Tensor, n_cand: Tensor, keep: Tensor, width: int) -> Tensor:
    """Indices of every image's ``keep[b]`` most attentive candidates among its first ``n_cand[b]``, most attentive
    first (``torch.topk`` sorted, as released): ``[B, width]``, -1 beyond ``keep[b]``."""
    score = score.masked_fill(~valid_mask(n_cand, score.shape[1]), float("-inf"))
    idx = score.topk(width, dim=1, largest=True, sorted=True).indices
    return idx.masked_fill(~valid_mask(keep, width), -1)


def fuse_inattentive(x: Tensor, score: Tensor, kept: Tensor, n_cand: Tensor) -> Tensor:
    """EViT Eq. 3: the fused token ``sum_j a_j x_j`` over each image's candidates not in ``kept`` (``[B, W]``, -1
    padded), weighted by the attentiveness ``score`` ``[B, M]`` as it is (not renormalised). ``x`` ``[B, M, C]``;
    returns ``[B, C]``."""
    B, M = score.shape
    not_kept = torch.ones(B, M + 1, dtype=torch.bool, device=x.device)
    not_kept.scatter_(1, torch.where(kept >= 0, kept, M), False)
    weight = torch.where(not_kept[:, :M] & valid_mask(n_cand, M), score, 0.0)
    return (x * weight[..., None].to(x.dtype)).sum(1)


def reorganize(tokens: TokenSets, x: Tensor, score: Tensor, keep_rate: float) -> TokenSets:
    """EViT's token reorganisation of every image's own set (``x``: the post-attention residual in ``tokens``'
    layout, ``score`` ``[B, Nmax - 1]`` the attentiveness): CLS, the kept tokens most attentive first, the fused
    token last; an image with nothing to drop keeps its tokens in order. Counts come from ``tokens.sizes`` (host
    ints): no host sync."""
    sizes = tokens.sizes
    keeps = [keep_count(n, keep_rate) for n in sizes]
    shrink = [kp < n - 1 for kp, n in zip(keeps, sizes)]
    if not any(shrink):
        return TokenSets(x, tokens.lengths, tokens.origin, sizes)
    dev, C = x.device, x.shape[-1]
    padded, n_cand = tokens.pad(x), tokens.lengths - 1
    kept_n = [kp if s else n - 1 for kp, s, n in zip(keeps, shrink, sizes)]
    width = max(kept_n)
    keep_t, shrink_t = torch.tensor(kept_n, device=dev), torch.tensor(shrink, device=dev)
    in_order = torch.arange(width, device=dev).expand(len(sizes), -1)
    kept = torch.where(shrink_t[:, None], top_tokens(score, n_cand, keep_t, width),
                       in_order.masked_fill(~valid_mask(keep_t, width), -1))
    fused = fuse_inattentive(padded[:, 1:], score, kept, n_cand)
    rows = padded[:, 1:].gather(1, kept.clamp(min=0)[..., None].expand(-1, -1, C))
    out = torch.cat([padded[:, :1], rows, fused[:, None]], 1)
    slot = keep_t + 1  # the fused token's place: right after the kept ones
    out = out.scatter(1, slot[:, None, None].expand(-1, 1, C), fused[:, None])
    origin = torch.cat([tokens.origin[:, :1], tokens.origin[:, 1:].gather(1, kept.clamp(min=0)).masked_fill(
        kept < 0, -1), tokens.origin.new_full((len(sizes), 1), -1)], 1)
    origin = origin.scatter(1, slot[:, None], torch.where(shrink_t, FUSED, -1)[:, None].to(origin.dtype))
    new_sizes = [kp + 2 if s else n for kp, s, n in zip(keeps, shrink, sizes)]
    W = max(new_sizes)
    lengths = torch.tensor(new_sizes, device=dev)
    out, origin = out[:, :W], origin[:, :W]
    if all(s == W for s in new_sizes):
        return TokenSets(out.contiguous(), lengths, origin, new_sizes)
    image, pos = ragged_index(lengths, sum(new_sizes))
    return TokenSets(out.reshape(-1, C).index_select(0, image * W + pos), lengths, origin, new_sizes)


# ------------------------------------------------------------------------------------------------------ modules
class EViTBlock(ATSBlock):
    """A timm ``Block`` that reorganises its tokens after the attention (EViT Sec. 3.2); its attention is
    :class:`ats.patch.ATSAttention` (timm's ``Attention`` with the token-set helpers). Runs on a plain ``[B, N, C]``
    batch (``forward``, timm's signature) and, inside an ATS model, on per-image token sets (``forward_tokens``).

    Modifications: the whole attention matrix is formed (its CLS row scores the tokens, as released); between the
    attention residual and the MLP, :func:`reorganize`."""

    keep_rate: float = KEEP_RATE

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        if attn_mask is not None:
            raise ValueError("EViT blocks do not take an attention mask")
        return self.forward_tokens(TokenSets.full(x)).x

    def forward_tokens(self, tokens: TokenSets, info: ATSRecord | None = None, block: int = -1) -> TokenSets:
        """The block on ``tokens``; with ``info`` its token counts and the kept tokens' original indices (output
        order, the fused token as ``FUSED``) are recorded as ATS blocks record theirs."""
        if info is not None:
            info.tokens_in.append(tokens.lengths)
        q, k, v, _ = self.attn.heads(self.norm1(tokens.x), tokens)
        attn = self.attn.attn_drop(attention_weights(q, k, self.attn.scale, None if tokens.uniform else
                                                     tokens.lengths))
        x = tokens.x + tokens.drop_path(self.ls1(self.attn.output(attn @ v, tokens)), self.drop_path1)
        out = reorganize(tokens, x, attentiveness(attn), self.keep_rate)
        out.x = out.x + out.drop_path(self.ls2(self.mlp(self.norm2(out.x))), self.drop_path2)
        if info is not None:
            info.tokens_out.append(out.lengths)
            info.kept[block] = out.origin.detach()
        return out


class EViT(VisionTransformer):
    """timm ``VisionTransformer`` whose blocks ``drop_loc`` are :class:`EViTBlock` s keeping ``keep_rate`` of their
    non-CLS tokens. Everything else (embedding, the other blocks, ``forward_features``, ``forward_head``, the
    parameter names) is timm's."""

    def __init__(self, *args, keep_rate: float = KEEP_RATE, drop_loc: tuple[int, ...] = DROP_LOC, **kwargs):
        super().__init__(*args, **kwargs)
        if not 0 < keep_rate <= 1:
            raise ValueError(f"keep_rate must be in (0, 1], got {keep_rate}")
        if any(not 0 <= i < len(self.blocks) for i in drop_loc):
            raise ValueError(f"drop_loc {tuple(drop_loc)} outside the {len(self.blocks)} blocks")
        self.keep_rate, self.drop_loc = float(keep_rate), tuple(sorted(set(drop_loc)))
        for i in self.drop_loc:
            attach(self.blocks[i], EViTBlock)
            attach(self.blocks[i].attn, ATSAttention)
            self.blocks[i].keep_rate = self.keep_rate

    def gmacs(self, img_size: int | None = None, layernorm: bool = True) -> float:
        """GMACs of one image (the analytic-count protocol of ``vitbench-flops``): :meth:`EViTGeometry.gmacs`.
        ``ValueError`` for another input size (the positional table is fixed)."""
        if img_size not in (None, self.patch_embed.img_size[0]):
            raise ValueError(f"EViT is built for {self.patch_embed.img_size[0]} px; build it with img_size={img_size}")
        return EViTGeometry.from_model(self).gmacs(None, layernorm)


# -------------------------------------------------------------------------------------------------------- FLOPs
def evit_block_macs(dim: int, n_in, n_out, mlp_ratio: float = 4.0, layernorm: bool = True):
    """One reorganising block: LN, qkv, ``QK^T``, ``A V`` and proj on all ``n_in`` tokens, LN and MLP on the
    ``n_out`` it keeps. Ranking and fusing are comparisons and elementwise products (counted by neither fvcore nor
    ``FlopCounterMode``)."""
    macs = linear_macs(n_in, dim, 3 * dim) + 2 * n_in * n_in * dim + linear_macs(n_in, dim, dim)
    macs = macs + 2 * linear_macs(n_out, dim, mlp_ratio * dim)
    return macs + (layernorm_macs(n_in, dim) + layernorm_macs(n_out, dim) if layernorm else 0.0)


@dataclass(frozen=True)
class EViTGeometry:
    """What the FLOPs of an EViT depend on: the ViT's geometry, the keep rate and the reorganising blocks."""

    vit: ViTGeometry
    keep_rate: float = KEEP_RATE
    drop_loc: tuple[int, ...] = DROP_LOC

    @classmethod
    def from_model(cls, model: EViT) -> EViTGeometry:
        return cls(ViTGeometry.from_model(model), model.keep_rate, model.drop_loc)

    @property
    def depth(self) -> int:
        return self.vit.depth

    @property
    def num_tokens(self) -> int:
        return self.vit.num_tokens

    @property
    def grid(self) -> tuple[int, int]:
        return self.vit.grid

    def at_grid(self, grid: tuple[int, int]) -> EViTGeometry:
        return replace(self, vit=self.vit.at_grid(grid))

    def tokens_out(self, block: int, n_tokens):
        """Tokens leaving block ``block`` when ``n_tokens`` enter it and it does not sample (an EViT block
        reorganises, any other keeps them)."""
        return tokens_after(n_tokens, self.keep_rate) if block in self.drop_loc else n_tokens

    def dense_counts(self) -> list[int]:
        """Tokens entering every block of the EViT alone (197, ..., 140, ..., 100, ..., 72, 72 at 224 px)."""
        counts, n = [], self.num_tokens
        for i in range(self.depth):
            counts.append(n)
            n = self.tokens_out(i, n)
        return counts

    def gmacs(self, tokens_per_block=None, layernorm: bool = True):
        """GMACs of one image: patch embedding, blocks, final LayerNorm and head. ``tokens_per_block[i]``: block i's
        count (what enters it) or ``(n_in, n_out[, n_query])`` for an ATS block, as :func:`vitbench.flops.vit_macs`
        takes them (per-image tensors allowed); an EViT block's output follows from its input. Default: EViT
        alone."""
        counts = self.dense_counts() if tokens_per_block is None else list(tokens_per_block)
        if len(counts) != self.depth:
            raise ValueError(f"need {self.depth} token counts, got {len(counts)}")
        g = self.vit
        macs = patch_embed_macs(g) + head_macs(g)
        n_last = self.num_tokens
        for i, c in enumerate(counts):
            n_in, *rest = c if isinstance(c, (tuple, list)) else (c,)
            if i in self.drop_loc:
                n_last = self.tokens_out(i, n_in)
                macs = macs + evit_block_macs(g.dim, n_in, n_last, g.mlp_ratio, layernorm)
            else:
                n_last = rest[0] if rest else n_in
                macs = macs + block_macs(g.dim, n_in, n_last, rest[1] if len(rest) > 1 else None, g.mlp_ratio,
                                         layernorm)
        if layernorm:
            macs = macs + layernorm_macs(n_last, g.dim)
        return macs / 1e9


# ------------------------------------------------------------------------------------------------------------- ATS
def check_structure(model: nn.Module) -> None:
    """Refuse what ATS cannot sample in: an :class:`EViT` (``TypeError`` otherwise) with the timm ViT's checks."""
    if not isinstance(model, EViT):
        raise TypeError(f"expected an EViT, got {type(model).__name__}")
    check_vit(model)


def ats_k(model: EViT, stages, rho: float) -> tuple[float, ...]:
    """Table A.5's ``K_n = round(rho x #InputTokens_n)`` with #InputTokens_n the tokens EViT alone gives block n
    (``max(round(rho N), 8)``, ATS's rule on those counts): (98, 98, 70, 70, 50, 50) at 224 px and rho 0.7."""
    counts = EViTGeometry.from_model(model).dense_counts()
    return tuple(float(stage_k(counts[s], rho)) for s in stages)


def apply(model: EViT, stages=STAGES, rho: float | None = ATS_RHO, k=None, mode: str = "official", variant=(),
          seed: int = 0, k_rule: str = "evit") -> EViT:
    """:func:`ats.patch.apply` for an EViT: ATS in blocks ``stages`` (0-based, none of them reorganising; default
    4, 5, 7, 8, 10, 11), the same modes and variants. ``rho`` (default 0.7) sets K_n by ``k_rule``: ``"evit"``
    (Table A.5 read as rho x EViT's own count at block n, :func:`ats_k`) or ``"compound"`` (rho x the tokens that
    actually enter block n, ATS's rho rule); ``k`` gives absolute K as for a ViT. Returns ``model``."""
    check_structure(model)
    if k_rule not in K_RULES:
        raise ValueError(f"k_rule must be one of {K_RULES}, got {k_rule!r}")
    stages = tuple(int(s) for s in stages)
    clash = sorted(set(stages) & set(model.drop_loc))
    if clash:
        raise ValueError(f"ATS cannot sample in EViT's reorganising blocks {clash}; choose among the others")
    if k is None and rho is not None and k_rule == "evit" and all(0 <= s < len(model.blocks) for s in stages):
        if not 0 < rho <= 1:
            raise ValueError(f"rho must be in (0, 1], got {rho}")
        rho, k = None, ats_k(model, stages, rho)
    return attach_ats(model, ATSVisionTransformer, stages, rho, k, mode, variant, seed)


# ------------------------------------------------------------------------------------------------ checkpoint layout
_BLOCK_KEYS = [f"{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
               for p in ("weight", "bias")]


def expected_keys(depth: int, head: bool = True) -> list[str]:
    """Every key of a released EViT / DeiT checkpoint (= timm's ``VisionTransformer``) of ``depth`` blocks."""
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    keys += [f"blocks.{i}.{k}" for i in range(depth) for k in _BLOCK_KEYS]
    return keys + ["norm.weight", "norm.bias"] + (["head.weight", "head.bias"] if head else [])


def convert_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The released EViT checkpoint (``main.py`` saves ``{"model": ...}``; :func:`vitbench.models.read_state_dict`
    unwraps it; a ``module.`` prefix is dropped) in this module's layout, which has the same names (DeiT's, timm's).

    Unknown keys (a distilled model's ``dist_token`` / ``head_dist``, a ``pre_logits`` layer, anything else) and
    missing ones raise ``ValueError`` naming them; a checkpoint without ``head`` is accepted."""
    out = {k.removeprefix("module."): v for k, v in state.items()}
    blocks = [int(m.group(1)) for m in map(re.compile(r"blocks\.(\d+)\.").match, out) if m]
    expected = expected_keys(1 + max(blocks, default=-1), head="head.weight" in out)
    unknown, missing = sorted(set(out) - set(expected)), sorted(set(expected) - set(out))
    if unknown or missing:
        more = (" ..." if len(unknown) > 8 else "", " ..." if len(missing) > 8 else "")
        raise ValueError(f"not an EViT / DeiT state dict: unknown keys {unknown[:8]}{more[0]}, missing keys "
                         f"{missing[:8]}{more[1]}")
    return {k: out[k] for k in expected}


# ---------------------------------------------------------------------------------------------------- registration
_IMAGENET = dict(num_classes=1000, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bicubic",
                 crop_pct=0.875, first_conv="patch_embed.proj", classifier="head", license="apache-2.0")
_DIGITS = dict(_IMAGENET, num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0)
EVIT_MODELS = {
    # name: (constructor arguments, pretrained config). The digits model is the embedded backbone's geometry
    # (vitbench's vit_digits_patch8_112: 112 px, patch 8, the papers' 14 x 14 grid + CLS, width 64, 2 heads).
    "evit_deit_small_patch16_224": (dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6), _IMAGENET),
    "evit_digits_patch8_112": (dict(img_size=112, patch_size=8, embed_dim=64, depth=12, num_heads=2, num_classes=10),
                               _DIGITS),
}
register_unshipped_models({name: (EViT, kw, cfg) for name, (kw, cfg) in EVIT_MODELS.items()}, globals(),
                          "the released EViT (or DeiT) weights with ats.backbones.load_weights (--checkpoint)")
