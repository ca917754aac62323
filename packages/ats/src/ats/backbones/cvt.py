"""CvT (Wu et al., ICCV 2021), the convolutional backbone of the ATS paper's Table 1, on timm layers.

Three stages; each starts with a convolutional token embedding (conv 7x7 / stride 4 / pad 2, then 3x3 / 2 / 1,
each followed by LayerNorm) and runs blocks whose attention projects q, k, v from the 2-D token grid through a
depthwise 3x3 conv + BatchNorm (``dw_bn``: q stride 1, k and v stride 2; the CLS token bypasses the conv) and
then a linear layer. Widths 64 / 192 / 384, heads 1 / 3 / 6, depths 1 / 2 / 10 (CvT-13) or 1 / 4 / 16 (CvT-21),
MLP ratio 4, the CLS token in stage 3 only, attention scale ``dim ** -0.5`` over the whole width (not the head
width, as microsoft/CvT ``lib/models/cls_cvt.py`` and HF's ``modeling_cvt``), the final LayerNorm and the linear
head on the CLS token.

Options: ``projection`` sets stage 3's q/k/v projection, ``"dw_bn"`` (CvT's) or ``"linear"`` (no convolutional
projection: the grid tokens go straight to linear q/k/v with keys and values not strided, as the ATS paper runs
stage 3, App. E.2). A ``linear`` stage 3 is built from plain timm ``Block`` / ``Attention`` (packed ``qkv``) with
``scale = dim ** -0.5`` and the math attention path (timm's fused path would use the head-width scale).
``activation``: ``"quick_gelu"`` (``x * sigmoid(1.702 x)``, the official code and the weights it released) or
``"gelu"`` (HF's port).

Parameter names are the official checkpoint's (``stage{i}.patch_embed.proj``, ``stage{i}.blocks.{j}.attn.
conv_proj_q.conv``, ``...attn.proj_q``, ``stage2.cls_token``, ``norm``, ``head``); :func:`convert_state_dict`
reads the official and the HuggingFace (``CvtForImageClassification``) layouts, :func:`fold_projections` turns
``dw_bn`` stage-3 weights into ``linear`` ones, :func:`cvt_gmacs` counts FLOPs (GMACs) analytically.

ATS (:func:`apply`) samples in stage 3 of a ``linear`` CvT, by default in its blocks 1-9 (0-based 0..8, stage-local;
App. E.2), with the image ViT's blocks and :mod:`ats.sampling` functions (:func:`ats.patch.run_blocks`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm, Mlp, QuickGELU, trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from vitbench.flops import blocks_macs, layernorm_macs, linear_macs

from ..patch import ATSRecord, attach_ats, check_blocks, run_blocks
from ..registry import register_unshipped_models

PROJECTIONS = ("dw_bn", "linear")
ACTIVATIONS = {"quick_gelu": QuickGELU, "gelu": nn.GELU}
DEPTHS = {13: (1, 2, 10), 21: (1, 4, 16)}
EMBED = ((7, 4, 2), (3, 2, 1), (3, 2, 1))  # (kernel, stride, padding) of each stage's convolutional embedding
DIMS = (64, 192, 384)
HEADS = (1, 3, 6)
KV_STRIDE = 2
NORM_EPS = 1e-5  # the official LayerNorm (and HF's nn.LayerNorm); BatchNorm keeps torch's 1e-5
BN_PER_ELEMENT = 2  # fvcore's eval-mode BatchNorm (affine): 2 per element

Grid = tuple[int, int]


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class ConvEmbed(nn.Module):
    """Convolutional token embedding: conv, then LayerNorm over the channels of every position (``proj``, ``norm``)."""

    def __init__(self, in_chans: int, dim: int, kernel: int, stride: int, padding: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel, stride, padding)
        self.norm = LayerNorm(dim, eps=NORM_EPS)

    def forward(self, x: Tensor) -> tuple[Tensor, Grid]:
        """``[B, C_in, H, W]`` -> tokens ``[B, H' W', C]`` and their grid ``(H', W')``."""
        x = self.proj(x)
        grid = (x.shape[-2], x.shape[-1])
        return self.norm(x.flatten(2).transpose(1, 2)), grid


class ConvProjection(nn.Module):
    """Depthwise 3x3 conv + BatchNorm on the token grid (``conv``, ``bn``): the ``dw_bn`` projection."""

    def __init__(self, dim: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, stride, 1, groups=dim, bias=False)
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> ``[B, H' W', C]``."""
        return self.bn(self.conv(x)).flatten(2).transpose(1, 2)


class ConvAttention(nn.Module):
    """CvT's convolutional-projection attention (parameters named as the official ``Attention``)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, kv_stride: int = KV_STRIDE):
        super().__init__()
        self.num_heads = num_heads
        self.scale = dim**-0.5  # the whole width, not the head width (official and HF)
        self.conv_proj_q = ConvProjection(dim, 1)
        self.conv_proj_k = ConvProjection(dim, kv_stride)
        self.conv_proj_v = ConvProjection(dim, kv_stride)
        self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def split_heads(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        return x.view(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)

    def forward(self, x: Tensor, grid: Grid, prefix: int = 0) -> Tensor:
        """``x`` ``[B, prefix + H W, C]`` (the first ``prefix`` rows, the CLS, bypass the convolutions)."""
        B, N, C = x.shape
        cls, patches = x[:, :prefix], x[:, prefix:]
        patches = patches.transpose(1, 2).reshape(B, C, *grid)
        q, k, v = (torch.cat([cls, conv(patches)], 1) for conv in (self.conv_proj_q, self.conv_proj_k,
                                                                       self.conv_proj_v))
        q, k, v = (self.split_heads(lin(t)) for lin, t in ((self.proj_q, q), (self.proj_k, k), (self.proj_v, v)))
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0,
                                           scale=self.scale)
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(B, N, C)))


class ConvBlock(nn.Module):
    """Pre-norm CvT block with :class:`ConvAttention` (``norm1``, ``attn``, ``norm2``, ``mlp``; timm layers)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 act_layer: type[nn.Module] = QuickGELU):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=NORM_EPS)
        self.attn = ConvAttention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm(dim, eps=NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)

    def forward(self, x: Tensor, grid: Grid, prefix: int = 0) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), grid, prefix))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def linear_block(dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, proj_drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, act_layer: type[nn.Module] = QuickGELU) -> Block:
    """A plain timm ``Block`` as a CvT block with the ``linear`` projection: packed ``qkv``, scale ``dim ** -0.5``
    on the math attention path (timm's fused path would apply the head-width scale)."""
    blk = Block(dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop, attn_drop=attn_drop,
                drop_path=drop_path, act_layer=act_layer, norm_layer=partial(LayerNorm, eps=NORM_EPS))
    blk.attn.scale = dim**-0.5
    blk.attn.fused_attn = False
    return blk


class CvTStage(nn.Module):
    """One stage: ``patch_embed`` (:class:`ConvEmbed`), an optional ``cls_token``, ``blocks``."""

    def __init__(self, in_chans: int, dim: int, depth: int, num_heads: int, embed: tuple[int, int, int],
                 cls_token: bool, projection: str, drop_path: list[float], **block_args):
        super().__init__()
        self.patch_embed = ConvEmbed(in_chans, dim, *embed)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        self.pos_drop = nn.Dropout(block_args.get("proj_drop", 0.0))
        make = ConvBlock if projection == "dw_bn" else linear_block
        self.blocks = nn.ModuleList(make(dim, num_heads, drop_path=dp, **block_args) for dp in drop_path)
        self.projection = projection

    @property
    def num_prefix_tokens(self) -> int:
        return 0 if self.cls_token is None else 1

    def embed(self, x: Tensor) -> tuple[Tensor, Grid]:
        """``[B, C_in, H, W]`` -> the tokens entering block 0 (CLS first when the stage has one) and the grid."""
        x, grid = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
        return self.pos_drop(x), grid

    def forward(self, x: Tensor) -> tuple[Tensor, Grid]:
        x, grid = self.embed(x)
        for blk in self.blocks:
            x = blk(x, grid, self.num_prefix_tokens) if isinstance(blk, ConvBlock) else blk(x)
        return x, grid


def grid_to_map(x: Tensor, grid: Grid, prefix: int) -> Tensor:
    """Tokens ``[B, prefix + H W, C]`` -> the patch grid ``[B, C, H, W]`` (the prefix dropped)."""
    return x[:, prefix:].transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)


class CvT(nn.Module):
    """Convolutional vision Transformer: ``stage0..stage2``, ``norm``, ``head`` (the official module names).

    ``forward_features`` returns stage 3's tokens (CLS first); ``forward_head`` takes the CLS token, ``norm``
    (the official final LayerNorm, on the CLS token only, like timm's ``fc_norm`` after pooling) and ``head``.
    ``img_size`` is the nominal input size (the FLOPs geometry and the pretrained config): CvT has no positional
    table, so any input size runs."""

    def __init__(self, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000,
                 depths: tuple[int, ...] = DEPTHS[13], dims: tuple[int, ...] = DIMS, heads: tuple[int, ...] = HEADS,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, projection: str = "dw_bn", activation: str = "quick_gelu",
                 embed: tuple[tuple[int, int, int], ...] = EMBED):
        super().__init__()
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        self.img_size, self.in_chans, self.num_classes = img_size, in_chans, num_classes
        self.depths, self.dims, self.heads, self.mlp_ratio = tuple(depths), tuple(dims), tuple(heads), mlp_ratio
        self.projection, self.activation, self.embed = projection, activation, tuple(tuple(e) for e in embed)
        self.embed_dim = self.num_features = dims[-1]
        self.num_prefix_tokens = 1
        block_args = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop_rate, attn_drop=attn_drop_rate,
                          act_layer=ACTIVATIONS[activation])
        chans = in_chans
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            last = i == len(dims) - 1
            dpr = torch.linspace(0, drop_path_rate, depth).tolist() if last else [0.0] * depth
            stage = CvTStage(chans, dim, depth, heads[i], self.embed[i], cls_token=last,
                             projection=projection if last else "dw_bn", drop_path=dpr, **block_args)
            setattr(self, f"stage{i}", stage)
            chans = dim
        self.norm = LayerNorm(dims[-1], eps=NORM_EPS)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_weights)
        trunc_normal_(self.stages[-1].cls_token, std=0.02)

    @property
    def stages(self) -> list[CvTStage]:
        return [getattr(self, f"stage{i}") for i in range(len(self.depths))]

    @property
    def blocks(self) -> nn.ModuleList:
        """Stage 3's blocks (the tokens with the CLS, where the ATS paper samples)."""
        return self.stages[-1].blocks

    def gmacs(self, img_size: int | None = None, layernorm: bool = True) -> float:
        """GMACs of one image at ``img_size`` px (default ``self.img_size``): :func:`cvt_gmacs`, the analytic-count
        protocol of ``vitbench-flops`` (:mod:`vitbench.flops`). ``layernorm=False`` counts no norm at all (neither
        LayerNorm nor the ``dw_bn`` BatchNorm): what ``FlopCounterMode`` measures. ``ValueError`` for a size the
        convolutional embeddings reduce to an empty grid."""
        geom = CvTGeometry.from_model(self, img_size)
        if min(min(grid) for grid in geom.grids()) < 1:
            raise ValueError(f"CvT cannot take {img_size} px: its token grids would be {geom.grids()}")
        return cvt_gmacs(geom, layernorm=layernorm)

    def no_weight_decay(self) -> set[str]:
        """The CLS token, as the official ``no_weight_decay``."""
        return {f"stage{len(self.depths) - 1}.cls_token"}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def stem(self, x: Tensor) -> Tensor:
        """Stages 1 and 2: ``[B, C_in, H, W]`` -> stage 2's output map ``[B, C_2, H/8, W/8]``."""
        for stage in self.stages[:-1]:
            x = grid_to_map(*stage(x), stage.num_prefix_tokens)
        return x

    def embed_tokens(self, x: Tensor) -> Tensor:
        """The tokens entering stage 3's blocks (CLS first): stages 1 and 2, then stage 3's embedding."""
        return self.stages[-1].embed(self.stem(x))[0]

    def token_grid(self, x: Tensor) -> Grid:
        """Stage 3's token grid for the images ``x``."""
        return CvTGeometry(tuple(x.shape[-2:]), self.depths, self.dims, embed=self.embed).grids()[-1]

    def forward_features(self, x: Tensor) -> Tensor:
        x, _ = self.stages[-1](self.stem(x))
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.head_drop(self.norm(x[:, 0]))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def init_weights(m: nn.Module) -> None:
    """The official initialisation: truncated normal (std 0.02) linear weights, zero biases, unit norms."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------------- registration
_IMAGENET = dict(num_classes=1000, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bicubic",
                 first_conv="stage0.patch_embed.proj", classifier="head", license="mit")
# The embedded geometry: 112 px digits, stage 3 on the papers' 14 x 14 grid + CLS (its embedding at stride 1, not 2),
# widths 16 / 32 / 64 (the embedded ViT's 64), CvT-13's depths.
_DIGITS = dict(_IMAGENET, num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0,
               license="apache-2.0")
CVT_MODELS = {
    # name: (constructor arguments, pretrained config); the 384 px models are the ImageNet-22k-pretrained ones
    # fine-tuned at 384
    "cvt_13_224": (dict(depths=DEPTHS[13], img_size=224), dict(_IMAGENET, crop_pct=0.875)),
    "cvt_21_224": (dict(depths=DEPTHS[21], img_size=224), dict(_IMAGENET, crop_pct=0.875)),
    "cvt_13_384": (dict(depths=DEPTHS[13], img_size=384), dict(_IMAGENET, crop_pct=1.0)),
    "cvt_21_384": (dict(depths=DEPTHS[21], img_size=384), dict(_IMAGENET, crop_pct=1.0)),
    "cvt_digits_112": (dict(depths=DEPTHS[13], img_size=112, dims=(16, 32, 64), heads=(1, 1, 2), num_classes=10,
                            embed=((7, 4, 2), (3, 2, 1), (3, 1, 1))), _DIGITS),
}
register_unshipped_models({name: (CvT, kw, cfg) for name, (kw, cfg) in CVT_MODELS.items()}, globals(),
                          "the official or HuggingFace weights with ats.backbones.cvt.load_cvt_state")


# ------------------------------------------------------------------------------------------------ checkpoint layouts
# HuggingFace ``CvtForImageClassification`` <-> official (= ours for ``dw_bn``) names, from transformers'
# ``convert_cvt_original_pytorch_checkpoint_to_pytorch.py``. Block parts: HF suffix after ``layers.{j}.``, ours after
# ``blocks.{j}.``.
_HF_QKV = {"query": "q", "key": "k", "value": "v"}
_HF_CONV = "attention.attention.convolution_projection_{}.convolution_projection."
HF_BLOCK_PARTS = {
    **{_HF_CONV.format(hf) + "convolution.": f"attn.conv_proj_{o}.conv." for hf, o in _HF_QKV.items()},
    **{_HF_CONV.format(hf) + "normalization.": f"attn.conv_proj_{o}.bn." for hf, o in _HF_QKV.items()},
    **{f"attention.attention.projection_{hf}.": f"attn.proj_{o}." for hf, o in _HF_QKV.items()},
    "attention.output.dense.": "attn.proj.",
    "intermediate.dense.": "mlp.fc1.",
    "output.dense.": "mlp.fc2.",
    "layernorm_before.": "norm1.",
    "layernorm_after.": "norm2.",
}
HF_STAGE_PARTS = {
    "embedding.convolution_embeddings.projection.": "patch_embed.proj.",
    "embedding.convolution_embeddings.normalization.": "patch_embed.norm.",
}
HF_TOP = {"layernorm.": "norm.", "classifier.": "head."}
_HF_STAGE = re.compile(r"cvt\.encoder\.stages\.(\d+)\.(.*)")
_HF_LAYER = re.compile(r"layers\.(\d+)\.(.*)")
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _rename(rest: str, table: dict[str, str]) -> str | None:
    for src, dst in table.items():
        if rest.startswith(src):
            return dst + rest[len(src):]
    return None


def hf_to_official(key: str) -> str | None:
    """One HF key in the official (our ``dw_bn``) layout, or None when it is not a CvT key."""
    if (top := _rename(key, HF_TOP)) is not None:
        return top
    m = _HF_STAGE.fullmatch(key)
    if m is None:
        return None
    stage, rest = m.groups()
    if rest == "cls_token":
        return f"stage{stage}.cls_token"
    if (part := _rename(rest, HF_STAGE_PARTS)) is not None:
        return f"stage{stage}.{part}"
    layer = _HF_LAYER.fullmatch(rest)
    part = None if layer is None else _rename(layer.group(2), HF_BLOCK_PARTS)
    return None if part is None else f"stage{stage}.blocks.{layer.group(1)}.{part}"


def official_to_hf(key: str) -> str:
    """The inverse of :func:`hf_to_official` (exporting our ``dw_bn`` weights to ``CvtForImageClassification``)."""
    for hf, ours in HF_TOP.items():
        if key.startswith(ours):
            return hf + key[len(ours):]
    m = re.fullmatch(r"stage(\d+)\.(.*)", key)
    if m is None:
        raise ValueError(f"{key!r} is not a CvT key")
    stage, rest = m.groups()
    if rest == "cls_token":
        return f"cvt.encoder.stages.{stage}.cls_token"
    block = re.fullmatch(r"blocks\.(\d+)\.(.*)", rest)
    inverse = {v: k for k, v in (HF_STAGE_PARTS if block is None else HF_BLOCK_PARTS).items()}
    part = _rename(rest if block is None else block.group(2), inverse)
    if part is None:
        raise ValueError(f"{key!r} is not a CvT key")
    prefix = f"cvt.encoder.stages.{stage}." + ("" if block is None else f"layers.{block.group(1)}.")
    return prefix + part


def official_keys(depths: tuple[int, ...], cls_stages: tuple[int, ...] = (2,), head: bool = True) -> list[str]:
    """Every key of an official CvT checkpoint (``dw_bn`` everywhere) with these stage depths."""
    keys = []
    for i, depth in enumerate(depths):
        keys += [f"stage{i}.cls_token"] if i in cls_stages else []
        keys += [f"stage{i}.patch_embed.{m}.{p}" for m in ("proj", "norm") for p in ("weight", "bias")]
        for j in range(depth):
            b = f"stage{i}.blocks.{j}."
            for x in "qkv":
                keys += [f"{b}attn.conv_proj_{x}.conv.weight"] + [f"{b}attn.conv_proj_{x}.bn.{p}" for p in _BN]
            linears = [f"attn.proj_{x}" for x in "qkv"] + ["attn.proj", "mlp.fc1", "mlp.fc2", "norm1", "norm2"]
            keys += [f"{b}{m}.{p}" for m in linears for p in ("weight", "bias")]
    keys += ["norm.weight", "norm.bias"] + (["head.weight", "head.bias"] if head else [])
    return keys


def detect_layout(state: dict[str, Tensor]) -> str:
    """``"hf"`` (``CvtForImageClassification``) or ``"official"`` (microsoft/CvT, and this module's ``dw_bn``)."""
    keys = [k.removeprefix("module.") for k in state]
    if any(k.startswith("cvt.encoder.") for k in keys):
        return "hf"
    if any(re.match(r"stage\d+\.", k) for k in keys):
        return "official"
    raise ValueError(f"not a CvT state dict (neither official stage{{i}}.* nor HF cvt.encoder.* keys): "
                     f"{sorted(state)[:5]}")


def convert_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The official microsoft/CvT or the HuggingFace ``CvtForImageClassification`` state dict (detected from the
    keys; a ``module.`` prefix is dropped) in this module's ``dw_bn`` layout (the official names).

    Unknown keys and missing ones raise ``ValueError`` naming them; a missing BatchNorm ``num_batches_tracked``
    (unused in evaluation) is filled with 0, a checkpoint without ``head`` (no classifier) is accepted."""
    layout = detect_layout(state)
    out, unknown = {}, []
    for key, value in state.items():
        key = key.removeprefix("module.")
        new = hf_to_official(key) if layout == "hf" else key
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    blocks = [re.match(r"stage(\d+)\.blocks\.(\d+)\.", k) for k in out]
    depths = [0] * (1 + max((int(m.group(1)) for m in blocks if m), default=-1))
    for m in filter(None, blocks):
        depths[int(m.group(1))] = max(depths[int(m.group(1))], int(m.group(2)) + 1)
    cls_stages = tuple(int(m.group(1)) for m in map(re.compile(r"stage(\d+)\.cls_token").fullmatch, out) if m)
    expected = official_keys(tuple(depths), cls_stages, head="head.weight" in out)
    for key in expected:
        if key.endswith("num_batches_tracked") and key not in out:
            out[key] = torch.zeros((), dtype=torch.long)
    unknown += sorted(set(out) - set(expected))
    missing = sorted(set(expected) - set(out))
    if unknown or missing:
        raise ValueError(f"not a CvT state dict in the {layout} layout: unknown keys {unknown[:8]}"
                         f"{' ...' if len(unknown) > 8 else ''}, missing keys {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}")
    return {k: out[k] for k in expected}


# ----------------------------------------------------------------------------------------------------------- FLOPs
@dataclass(frozen=True)
class CvTGeometry:
    """What the FLOPs of a CvT depend on."""

    img_size: Grid
    depths: tuple[int, ...] = DEPTHS[13]
    dims: tuple[int, ...] = DIMS
    mlp_ratio: float = 4.0
    projection: str = "dw_bn"
    in_chans: int = 3
    num_classes: int = 1000
    embed: tuple[tuple[int, int, int], ...] = EMBED

    @classmethod
    def from_model(cls, model: CvT, img_size: int | Grid | None = None) -> CvTGeometry:
        size = model.img_size if img_size is None else img_size
        return cls(tuple(size) if isinstance(size, (tuple, list)) else (size, size), model.depths, model.dims,
                   model.mlp_ratio, model.projection, model.in_chans, model.num_classes, model.embed)

    @property
    def depth(self) -> int:
        """Stage 3's blocks (those :func:`apply` may sample in)."""
        return self.depths[-1]

    @property
    def grid(self) -> Grid:
        """Stage 3's token grid."""
        return self.grids()[-1]

    @property
    def num_tokens(self) -> int:
        """Stage 3's tokens, the CLS included."""
        return self.grid[0] * self.grid[1] + 1

    def at_grid(self, grid: Grid) -> CvTGeometry:
        """This geometry, checked to have stage-3 grid ``grid`` (a CvT's grid follows from its input size)."""
        if tuple(grid) != self.grid:
            raise ValueError(f"stage-3 grid {tuple(grid)} is not this geometry's {self.grid}; count at that input size")
        return self

    def gmacs(self, tokens_per_block=None, layernorm: bool = True) -> float:
        """:func:`cvt_gmacs`, with stage 3's token counts per block as :func:`vitbench.flops.vit_macs` takes them
        (a ``linear`` stage 3 only; default dense)."""
        return cvt_gmacs(self, layernorm, tokens_per_block=tokens_per_block)

    def grids(self) -> list[Grid]:
        """Every stage's token grid."""
        out, (h, w) = [], self.img_size
        for kernel, stride, padding in self.embed[: len(self.dims)]:
            h, w = conv_out(h, kernel, stride, padding), conv_out(w, kernel, stride, padding)
            out.append((h, w))
        return out


def attention_macs(dim: int, grid: Grid, prefix: int, conv: bool, batchnorm: bool = True) -> float:
    """One CvT attention: the q / k / v projections (``dw_bn``: depthwise 3x3 conv + BatchNorm on the grid, keys and
    values at stride 2, the prefix bypassing the conv; ``linear``: none), the q / k / v linears, ``QK^T`` and ``AV``
    with the strided keys and values, and ``proj``."""
    n = grid[0] * grid[1]
    n_kv = conv_out(grid[0], 3, KV_STRIDE, 1) * conv_out(grid[1], 3, KV_STRIDE, 1) if conv else n
    macs = 0.0
    if conv:
        macs += 9 * dim * (n + 2 * n_kv)  # depthwise 3x3: q at stride 1, k and v at stride 2
        macs += BN_PER_ELEMENT * dim * (n + 2 * n_kv) if batchnorm else 0.0
    n, n_kv = n + prefix, n_kv + prefix
    macs += linear_macs(n, dim, dim) + 2 * linear_macs(n_kv, dim, dim)  # proj_q, proj_k, proj_v (or packed qkv)
    macs += 2 * n * n_kv * dim  # Q K^T and A V (summed over heads: the whole width)
    return macs + linear_macs(n, dim, dim)  # proj


def cvt_block_macs(dim: int, grid: Grid, prefix: int, conv: bool, mlp_ratio: float = 4.0, layernorm: bool = True,
                   batchnorm: bool = True) -> float:
    """One pre-norm CvT block on ``prefix + H W`` tokens: attention, MLP and its two LayerNorms."""
    n = grid[0] * grid[1] + prefix
    macs = attention_macs(dim, grid, prefix, conv, batchnorm) + 2 * linear_macs(n, dim, mlp_ratio * dim)
    return macs + (2 * layernorm_macs(n, dim) if layernorm else 0.0)


def cvt_macs(geom: CvTGeometry, layernorm: bool = True, batchnorm: bool | None = None,
             tokens_per_block=None) -> float:
    """MACs of one image through a CvT: convolutional embeddings (+ LayerNorm), blocks, the final LayerNorm on the
    CLS token and the head. ``layernorm``: LayerNorm at 5 per element; ``batchnorm`` (default: as ``layernorm``):
    the ``dw_bn`` projections' eval-mode BatchNorm at 2 per element (both fvcore's counts). Without either the count
    is what ``FlopCounterMode`` measures (:func:`vitbench.flops.flop_counter_gmacs`). ``tokens_per_block``: the
    token counts of a ``linear`` stage 3's blocks, each ``n`` or ``(n_in, n_out[, n_query])`` (ATS; default dense)."""
    if tokens_per_block is not None and geom.projection != "linear":
        raise ValueError("token counts per block need a linear stage 3 (ATS runs only there)")
    batchnorm = layernorm if batchnorm is None else batchnorm
    norms = dict(layernorm=layernorm, batchnorm=batchnorm)
    macs, chans, last = 0.0, geom.in_chans, len(geom.dims) - 1
    for i, (grid, dim, depth) in enumerate(zip(geom.grids(), geom.dims, geom.depths)):
        kernel = geom.embed[i][0]
        n = grid[0] * grid[1]
        macs += n * kernel * kernel * chans * dim + (layernorm_macs(n, dim) if layernorm else 0.0)
        prefix = 1 if i == last else 0
        conv = i < last or geom.projection == "dw_bn"
        if i == last and tokens_per_block is not None:
            macs += blocks_macs(dim, tokens_per_block, geom.mlp_ratio, layernorm)[0]
        else:
            macs += depth * cvt_block_macs(dim, grid, prefix, conv, geom.mlp_ratio, **norms)
        chans = dim
    macs += layernorm_macs(1, geom.dims[-1]) if layernorm else 0.0  # the final norm, on the CLS token
    return macs + geom.dims[-1] * geom.num_classes


def cvt_gmacs(geom: CvTGeometry, layernorm: bool = True, batchnorm: bool | None = None,
              tokens_per_block=None) -> float:
    """:func:`cvt_macs` in G (the papers' "GFLOPs")."""
    return cvt_macs(geom, layernorm, batchnorm, tokens_per_block) / 1e9


# ---------------------------------------------------------------------------------------------- dw_bn -> linear
def fold_projections(state: dict[str, Tensor], stage: int = 2, eps: float = 1e-5) -> dict[str, Tensor]:
    """A ``dw_bn`` state dict (this module's layout, :func:`convert_state_dict`) as the weights of a ``linear``
    stage ``stage`` (timm ``Block``: packed ``attn.qkv``): each depthwise conv keeps only its centre tap, which with
    the eval-mode BatchNorm is a per-channel affine map ``a * x + b`` folded into the following linear layer
    (``W diag(a)``, ``bias + W b``).

    Not exact: the conv's other eight taps are dropped, keys and values are no longer strided (7 x 7 -> 14 x 14
    at 224 px), and the CLS token, which bypassed the convolution, now goes through the folded affine map. It is a
    training-free starting point; the ATS paper fine-tunes the linear stage 3 for 30 epochs (App. E.2)."""
    prefix = f"stage{stage}.blocks."
    blocks = sorted({int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)})
    folded = {k: v for k, v in state.items()
              if not (k.startswith(prefix) and re.search(r"\.attn\.(conv_proj_[qkv]|proj_[qkv])\.", k))}
    for j in blocks:
        b = f"{prefix}{j}.attn."
        weights, biases = [], []
        for x in "qkv":
            gamma, beta, mean, var = (state[f"{b}conv_proj_{x}.bn.{p}"].double()
                                      for p in ("weight", "bias", "running_mean", "running_var"))
            inv = gamma / torch.sqrt(var + eps)
            scale = state[f"{b}conv_proj_{x}.conv.weight"][:, 0, 1, 1].double() * inv
            shift = beta - mean * inv
            w = state[f"{b}proj_{x}.weight"]
            bias = state.get(f"{b}proj_{x}.bias", torch.zeros(w.shape[0], dtype=w.dtype))
            weights.append((w.double() * scale[None]).to(w.dtype))
            biases.append((bias.double() + w.double() @ shift).to(w.dtype))
        folded[f"{b}qkv.weight"], folded[f"{b}qkv.bias"] = torch.cat(weights), torch.cat(biases)
    return folded


def load_cvt_state(model: CvT, state: dict[str, Tensor]) -> CvT:
    """Load official or HuggingFace CvT weights into ``model`` (strict): :func:`convert_state_dict`, then
    :func:`fold_projections` when ``model``'s stage 3 is ``linear``. Returns ``model``."""
    state = convert_state_dict(state)
    if model.projection == "linear":
        state = fold_projections(state, len(model.depths) - 1)
    model.load_state_dict(state)
    return model


# ------------------------------------------------------------------------------------------------------------- ATS
STAGES = tuple(range(9))  # stage 3's blocks 1-9 (App. E.2), 0-based and stage-local


class ATSCvT:
    """A CvT whose stage-3 blocks run on per-image token sets, ATS sampling in the blocks of ``record``'s stages.

    Modifications: ``forward_features`` runs stages 1 and 2 and stage 3's embedding as CvT does, then stage 3's
    blocks through :func:`ats.patch.run_blocks` (padded output, CLS first: ``forward_head`` reads the CLS token)."""

    record: ATSRecord

    def forward_features(self, x: Tensor, *, hidden: Tensor | None = None, start: int = 0) -> Tensor:
        """``hidden``: the output of stage 3's first ``start`` blocks for ``x`` (see :func:`ats.patch.dense_hidden`)."""
        tokens = self.embed_tokens(x) if hidden is None else hidden
        return run_blocks(self.blocks, tokens, self.record, self.token_grid(x), start, hidden is not None)


def check_structure(model: nn.Module) -> None:
    """Refuse a CvT that ATS cannot sample in: stage 3 must have the ``linear`` projection (a token set, App. E.2)."""
    if not isinstance(model, CvT):
        raise TypeError(f"expected a CvT, got {type(model).__name__}")
    if model.projection != "linear":
        raise ValueError(f"ATS samples stage 3 of a CvT without convolutional projections (projection='linear', "
                         f"ATS paper App. E.2); this one has {model.projection!r}: build it with projection='linear' "
                         "(load_cvt_state folds dw_bn weights into it)")
    check_blocks(model.blocks)


def apply(model: CvT, stages=STAGES, rho: float | None = None, k=None, mode: str = "official", variant=(),
          seed: int = 0) -> CvT:
    """:func:`ats.patch.apply` for a ``linear`` CvT: ATS in stage 3's blocks ``stages`` (0-based, stage-local;
    default 0..8, the paper's blocks 1-9), the same K schedule, modes and variants. Returns ``model``."""
    check_structure(model)
    return attach_ats(model, ATSCvT, stages, rho, k, mode, variant, seed)
