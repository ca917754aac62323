"""PS-ViT (Yue et al., ICCV 2021), the progressive-sampling backbone of the ATS paper's Table 1, on timm layers.

A convolutional stem (conv 7x7 / stride 2 + BatchNorm + ReLU, max-pool 3x3 / 2, then two ResNet bottlenecks
64 -> 256 and 256 -> 384, inner width 64) turns a 224 px image into a 56 x 56 x 384 feature map. The progressive
sampling module then iterates ``num_iters`` (4) times: sample the map at ``P x P`` points by bilinear
interpolation at ``point + gamma * offset`` (:func:`progressive_sample`), add a position embedding of the
normalised sampling point (one ``Linear(2 -> dim)`` shared by all iterations) and the previous iteration's output,
run one transformer layer and (except in the last iteration) predict the next offsets with ``Linear(dim -> 2)``.
The points start at the centres of a ``P x P`` grid of cells, x-major (token ``i P + j`` is column ``i``, row
``j``). A CLS token joins the ``P x P`` sampled tokens in the vision-transformer module: ``depth - num_iters`` (10)
pre-norm layers (width 384, 6 heads, MLP ratio 3, no qkv bias, LayerNorm eps 1e-5), the final LayerNorm and the
linear head on the CLS token. ``psvit_b14_224``: ``P = 14``; ``psvit_b18_224``: ``P = 18`` (21.3 M parameters).

Option ``attn_scale``: ``"width"`` (``dim ** -0.5``, what the released builders set when they are asked for the
released weights, ``pretrained=True``; the default) or ``"head"`` (``head_dim ** -0.5``, the released code built
with ``pretrained=False``, as its training script does).

Parameter names are the released checkpoint's (``stem.*``, ``pos_layer``, ``ps_layers.{i}.transformer_layer``,
``ps_layers.{i}.offset_layer``, ``trans_layers.{j}``, ``cls_token``, ``norm``, ``head``, the ``point_coord``
buffer), so :func:`convert_state_dict` only drops the released model's tied copies of ``pos_layer`` and refuses
what it does not know. :func:`psvit_gmacs` counts FLOPs analytically.

ATS (:func:`apply`) samples in the vision-transformer module's layers, by default 1..9 (0-based: layer 0 dense;
the paper's "stages 1-9 of the transformer module", Sec. 4), with the image ViT's blocks and :mod:`ats.sampling`
functions (:func:`ats.patch.run_blocks`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm, trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from vitbench.flops import block_macs, blocks_macs, layernorm_macs, linear_macs

from ..patch import ATSRecord, attach_ats, check_blocks, run_blocks
from ..registry import register_unshipped_models
from .cvt import BN_PER_ELEMENT, Grid, init_weights  # the same counting convention and initialisation as CvT's

NORM_EPS = 1e-5  # the released nn.LayerNorm
SCALES = ("width", "head")
BACKWARDS = ("kernel", "autograd")
STAGES = tuple(range(1, 10))  # the transformer module's layers 1-9 (Sec. 4), 0-based: layer 0 dense


# --------------------------------------------------------------------------------------------- progressive sampling
def sampling_grid(coords: Tensor, height: int, width: int) -> Tensor:
    """Pixel coordinates ``[..., 2]`` as ``(y, x)`` -> ``grid_sample``'s normalised ``(x, y)`` with
    ``align_corners=True``: ``g = 2 x / (W - 1) - 1`` (pixel 0 at -1, pixel ``W - 1`` at +1)."""
    y, x = coords.unbind(-1)
    return torch.stack([2 * x / (width - 1) - 1, 2 * y / (height - 1) - 1], -1)


def bilinear_sample(feat: Tensor, coords: Tensor) -> Tensor:
    """``feat`` ``[B, C, H, W]`` at the pixel coordinates ``coords`` ``[B, N, 2]`` ``(y, x)`` -> ``[B, N, C]``.

    The released CUDA kernel's ``bilinear_interpolate``: 0 outside ``(-1, H) x (-1, W)``, otherwise the four
    neighbours ``floor(y), floor(y) + 1`` x ``floor(x), floor(x) + 1`` weighted bilinearly, neighbours outside the
    map read as 0. That is ``grid_sample(mode='bilinear', padding_mode='zeros', align_corners=True)``."""
    grid = sampling_grid(coords, feat.shape[-2], feat.shape[-1]).unsqueeze(1).to(feat.dtype)  # [B, 1, N, 2]
    out = F.grid_sample(feat, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.squeeze(2).transpose(1, 2)


def kernel_corners(coords: Tensor, height: int, width: int) -> tuple[Tensor, ...]:
    """The released backward kernel's ``bilinear_interpolate_gradient`` for every point: coordinates clamped below
    at 0 and, from ``size - 1`` on, set to ``size - 1`` with both neighbours there. Returns ``(y, x, y_low, y_high,
    x_low, x_high, inside)`` (``inside``: the point is in ``(-1, H) x (-1, W)``; elsewhere everything is 0)."""
    y, x = coords.unbind(-1)
    inside = (y > -1) & (y < height) & (x > -1) & (x < width)
    out = []
    for c, size in ((y, height), (x, width)):
        c = c.clamp(min=0)
        low = c.floor()
        top = low >= size - 1
        c = torch.where(top, float(size - 1), c)
        low = torch.where(top, float(size - 1), low)
        high = torch.where(top, low, low + 1)
        out.append((c, low.long(), high.long()))
    (y, y_low, y_high), (x, x_low, x_high) = out
    zero = torch.zeros_like
    return (torch.where(inside, y, zero(y)), torch.where(inside, x, zero(x)), y_low * inside, y_high * inside,
            x_low * inside, x_high * inside, inside)


def kernel_backward(grad: Tensor, feat: Tensor, coords: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`bilinear_sample` as the released CUDA backward computes them: ``(d feat, d offset)`` for
    the output gradient ``grad`` ``[B, N, C]``, ``feat`` ``[B, C, H, W]``, sampling at ``coords`` ``[B, N, 2]``
    (``point + gamma * offset``). Inside the map it is the exact derivative; at the borders the kernel clamps the
    coordinates (see :func:`kernel_corners`): for ``y`` in ``(-1, 0]`` it spreads ``grad`` as if ``y = 0`` and
    gives ``d/dy`` the slope between rows 0 and 1, for ``y >= H - 1`` it puts all of ``grad`` on row ``H - 1`` and
    gives no offset gradient (the same in ``x``), where autograd of the zero-padded forward would differ."""
    B, C, H, W = feat.shape
    y, x, y0, y1, x0, x1, inside = kernel_corners(coords, H, W)
    ly, lx = y - y0, x - x0
    hy, hx = y1 - y, x1 - x  # 0 where clamped to the last row / column (both neighbours there), unlike 1 - ly
    w = torch.stack([(1 - ly) * (1 - lx), (1 - ly) * lx, ly * (1 - lx), ly * lx], -1) * inside[..., None]
    idx = torch.stack([y0 * W + x0, y0 * W + x1, y1 * W + x0, y1 * W + x1], -1)  # [B, N, 4]
    flat = feat.flatten(2)  # [B, C, H W]
    corners = flat.gather(2, idx.flatten(1)[:, None].expand(-1, C, -1)).view(B, C, -1, 4)  # [B, C, N, 4]
    g = grad.transpose(1, 2)  # [B, C, N]
    d_feat = torch.zeros_like(flat).scatter_add_(
        2, idx.flatten(1)[:, None].expand(-1, C, -1), (g[..., None] * w[:, None].to(g.dtype)).flatten(2))
    v00, v10, v01, v11 = corners.unbind(-1)  # (y_low, x_low), (y_low, x_high), (y_high, x_low), (y_high, x_high)
    gx = v11 * ly[:, None] + v10 * hy[:, None] - v01 * ly[:, None] - v00 * hy[:, None]
    gy = v11 * lx[:, None] + v01 * hx[:, None] - v10 * lx[:, None] - v00 * hx[:, None]
    d_offset = gamma * torch.stack([(g * gy).sum(1), (g * gx).sum(1)], -1) * inside[..., None]
    return d_feat.view_as(feat), d_offset


class ProgressiveSampling(torch.autograd.Function):
    """:func:`bilinear_sample` at ``point + gamma * offset`` whose backward is the released CUDA kernel's
    (:func:`kernel_backward`); like the released op it gives no gradient to ``point``."""

    @staticmethod
    def forward(ctx, feat: Tensor, point: Tensor, offset: Tensor, gamma: float) -> Tensor:
        coords = point + offset * gamma
        ctx.save_for_backward(feat, coords)
        ctx.gamma = gamma
        return bilinear_sample(feat, coords)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        feat, coords = ctx.saved_tensors
        d_feat, d_offset = kernel_backward(grad, feat, coords, ctx.gamma)
        return d_feat, None, d_offset.to(coords.dtype), None


def progressive_sample(feat: Tensor, point: Tensor, offset: Tensor, gamma: float = 1.0,
                       backward: str = "kernel") -> Tensor:
    """PS-ViT's sampling op: ``feat`` ``[B, C, H, W]`` at ``point + gamma * offset`` (``[B, N, 2]``, pixel ``(y, x)``)
    -> ``[B, N, C]``. The forward is :func:`bilinear_sample` (the released kernel's formula); ``backward``:
    ``"kernel"`` (the released kernel's gradients, :func:`kernel_backward`) or ``"autograd"`` (the exact derivative
    of the forward, which differs from the kernel's within one pixel of the border)."""
    if backward == "kernel":
        return ProgressiveSampling.apply(feat, point, offset, gamma)
    if backward != "autograd":
        raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
    return bilinear_sample(feat, point.detach() + offset * gamma)


def initial_points(feat_size: int, num_points: int) -> Tensor:
    """``[1, P P, 2]`` ``(y, x)`` centres of a ``P x P`` grid of cells on a ``feat_size`` map, x-major (point
    ``i P + j`` at column ``i``, row ``j``), as the released ``_get_initial_point``."""
    step = feat_size / num_points
    centres = torch.tensor([i * step for i in range(num_points)]) + step / 2
    cols, rows = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([rows, cols], -1).view(1, -1, 2)


# ---------------------------------------------------------------------------------------------------------- layers
class BottleneckLayer(nn.Module):
    """The released stem's ResNet bottleneck: 1x1 -> 3x3 -> 1x1 convs with BatchNorm, ReLU, a 1x1 conv + BatchNorm
    shortcut when the widths differ (``conv1..3``, ``bn1..3``, ``downsample``)."""

    def __init__(self, in_chans: int, inner: int, out_chans: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, inner, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, inner, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv3 = nn.Conv2d(inner, out_chans, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chans)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if in_chans != out_chans:
            self.downsample = nn.Sequential(nn.Conv2d(in_chans, out_chans, 1, bias=False), nn.BatchNorm2d(out_chans))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def make_stem(in_chans: int, widths: tuple[int, int], inner: int, dim: int) -> nn.Sequential:
    """Conv 7x7 / 2 (``widths[0]``) + BatchNorm + ReLU, max-pool 3x3 / 2, bottlenecks ``widths[0] -> widths[1]`` and
    ``widths[1] -> dim`` (inner width ``inner``): the released ``stem`` (indices 0, 1, 4, 5 hold weights)."""
    return nn.Sequential(nn.Conv2d(in_chans, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0]),
                         nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1), BottleneckLayer(widths[0], inner, widths[1]),
                         BottleneckLayer(widths[1], inner, dim))


def transformer_layer(dim: int, num_heads: int, mlp_ratio: float, scale: float, drop: float = 0.0,
                      attn_drop: float = 0.0, drop_path: float = 0.0) -> Block:
    """The released ``TransformerEncoderLayer`` as a plain timm ``Block`` (no qkv bias, GELU, LayerNorm eps 1e-5)
    with attention scale ``scale``; away from the head-width scale it runs the math path (timm's fused path would
    apply the head width's)."""
    blk = Block(dim, num_heads, mlp_ratio, qkv_bias=False, proj_drop=drop, attn_drop=attn_drop, drop_path=drop_path,
                norm_layer=partial(LayerNorm, eps=NORM_EPS))
    if scale != blk.attn.scale:
        blk.attn.scale = scale
        blk.attn.fused_attn = False
    return blk


class PSLayer(nn.Module):
    """One progressive-sampling iteration (``transformer_layer``, ``offset_layer``; the position layer is the
    model's shared ``pos_layer``)."""

    def __init__(self, feat_size: int, dim: int, num_heads: int, mlp_ratio: float, scale: float, pred_offset: bool,
                 gamma: float = 1.0, offset_bias: bool = True, backward: str = "kernel", **drops):
        super().__init__()
        self.feat_size, self.gamma, self.backward = float(feat_size), gamma, backward
        self.transformer_layer = transformer_layer(dim, num_heads, mlp_ratio, scale, **drops)
        self.offset_layer = nn.Linear(dim, 2, bias=offset_bias) if pred_offset else None

    def forward(self, feat: Tensor, point: Tensor, offset: Tensor, pre_out: Tensor | None,
                pos_layer: nn.Module) -> tuple[Tensor, Tensor | None, Tensor]:
        """Returns ``(tokens [B, N, dim], next offsets [B, N, 2] or None, the sampling points)``."""
        tokens = progressive_sample(feat, point, offset, self.gamma, self.backward)
        point = point + offset.detach()
        tokens = tokens + pos_layer(point / self.feat_size)
        if pre_out is not None:
            tokens = tokens + pre_out
        tokens = self.transformer_layer(tokens)
        return tokens, None if self.offset_layer is None else self.offset_layer(tokens), point


class PSViT(nn.Module):
    """Vision transformer with progressive sampling: ``stem``, ``pos_layer``, ``ps_layers``, ``cls_token``,
    ``trans_layers`` (= ``blocks``), ``norm``, ``head`` (the released names).

    ``forward_features`` returns the normed tokens of the transformer module (CLS first, as timm's ViT);
    ``forward_head`` takes the CLS token. The input must be ``img_size`` px: the points and their normalisation
    follow from it, as in the released model."""

    def __init__(self, img_size: int = 224, num_points: int = 14, in_chans: int = 3, num_classes: int = 1000,
                 num_iters: int = 4, depth: int = 14, embed_dim: int = 384, num_heads: int = 6,
                 mlp_ratio: float = 3.0, stem_widths: tuple[int, int] = (64, 256), stem_inner: int = 64,
                 downsample: int = 4, offset_gamma: float = 1.0, attn_scale: str = "width", drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, sampling_backward: str = "kernel"):
        super().__init__()
        if attn_scale not in SCALES:
            raise ValueError(f"attn_scale must be one of {SCALES}, got {attn_scale!r}")
        if sampling_backward not in BACKWARDS:
            raise ValueError(f"sampling_backward must be one of {BACKWARDS}, got {sampling_backward!r}")
        if not 1 <= num_iters < depth:
            raise ValueError(f"need 1 <= num_iters < depth, got {num_iters} and {depth}")
        self.img_size, self.num_points, self.in_chans, self.num_classes = img_size, num_points, in_chans, num_classes
        self.num_iters, self.depth, self.mlp_ratio, self.attn_scale = num_iters, depth, mlp_ratio, attn_scale
        self.stem_widths, self.stem_inner, self.downsample = tuple(stem_widths), stem_inner, downsample
        self.embed_dim = self.num_features = embed_dim
        self.num_prefix_tokens = 1
        self.feat_size = img_size // downsample
        scale = (embed_dim if attn_scale == "width" else embed_dim // num_heads) ** -0.5
        self.register_buffer("point_coord", initial_points(self.feat_size, num_points))
        self.pos_layer = nn.Linear(2, embed_dim)
        self.stem = make_stem(in_chans, self.stem_widths, stem_inner, embed_dim)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        layer_args = dict(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, scale=scale, drop=drop_rate,
                          attn_drop=attn_drop_rate)
        self.ps_layers = nn.ModuleList(
            PSLayer(self.feat_size, pred_offset=i < num_iters - 1, gamma=offset_gamma, backward=sampling_backward,
                    drop_path=dpr[i], **layer_args) for i in range(num_iters))
        self.trans_layers = nn.ModuleList(transformer_layer(drop_path=dpr[i], **layer_args)
                                          for i in range(num_iters, depth))
        self.norm = LayerNorm(embed_dim, eps=NORM_EPS)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_weights)
        for layer in self.ps_layers:
            if layer.offset_layer is not None:
                nn.init.zeros_(layer.offset_layer.weight)
                if layer.offset_layer.bias is not None:
                    nn.init.zeros_(layer.offset_layer.bias)

    @property
    def blocks(self) -> nn.ModuleList:
        """The vision-transformer module's layers (where the ATS paper samples)."""
        return self.trans_layers

    def gmacs(self, img_size: int | None = None, layernorm: bool = True) -> float:
        """GMACs of one image (:func:`psvit_gmacs`), the analytic-count protocol of ``vitbench-flops``.
        ``layernorm=False`` counts no norm at all (neither LayerNorm nor BatchNorm): what ``FlopCounterMode``
        measures. ``ValueError`` for any size but ``img_size``."""
        if img_size is not None and img_size != self.img_size:
            raise ValueError(f"PS-ViT takes only its own {self.img_size} px (its sampling points and their "
                             f"normalisation follow from it), not {img_size}")
        return psvit_gmacs(PSViTGeometry.from_model(self), layernorm=layernorm)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def sample_tokens(self, x: Tensor) -> Tensor:
        """The progressive sampling module's output ``[B, P P, dim]`` for the images ``x``."""
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"PS-ViT takes {self.img_size} x {self.img_size} px images, got {tuple(x.shape[-2:])}")
        feat = self.stem(x)
        point = self.point_coord.expand(x.shape[0], -1, -1)
        offset, tokens = torch.zeros_like(point), None
        for layer in self.ps_layers:
            tokens, new_offset, point = layer(feat, point, offset, tokens, self.pos_layer)
            offset = new_offset if new_offset is not None else offset
        return tokens

    def embed_tokens(self, x: Tensor) -> Tensor:
        """The tokens entering the transformer module: the CLS token, then the sampled tokens."""
        tokens = self.sample_tokens(x)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], 1)

    def token_grid(self, x: Tensor | None = None) -> Grid:
        """The sampled tokens' initial ``P x P`` grid (token ``i P + j``: column ``i``, row ``j``)."""
        return (self.num_points, self.num_points)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.embed_tokens(x)
        for blk in self.trans_layers:
            x = blk(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.head_drop(x[:, 0])
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------------- registration
_IMAGENET = dict(num_classes=1000, input_size=(3, 224, 224), crop_pct=0.9, interpolation="bicubic",
                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), first_conv="stem.0", classifier="head",
                 license="apache-2.0")
PSVIT_MODELS = {
    # name: (constructor arguments, pretrained config, the released checkpoint's file)
    "psvit_b14_224": (dict(num_points=14), _IMAGENET, "ps_vit_b_14.pth"),
    "psvit_b18_224": (dict(num_points=18), _IMAGENET, "ps_vit_b_18.pth"),
}
register_unshipped_models({name: (PSViT, kw, cfg) for name, (kw, cfg, _) in PSVIT_MODELS.items()}, globals(),
                          "the authors' PS-ViT weights with ats.backbones.psvit.load_psvit_state (or --checkpoint)")


# ------------------------------------------------------------------------------------------------ checkpoint layout
_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_BLOCK = r"(norm[12]\.(weight|bias)|attn\.qkv\.weight|attn\.proj\.(weight|bias)|mlp\.fc[12]\.(weight|bias))"
RELEASED_KEYS = re.compile("|".join([
    r"cls_token", r"point_coord", r"(pos_layer|norm|head)\.(weight|bias)", r"stem\.0\.weight", rf"stem\.1\.{_BN}",
    rf"stem\.[45]\.(conv[123]\.weight|bn[123]\.{_BN}|downsample\.0\.weight|downsample\.1\.{_BN})",
    rf"ps_layers\.\d+\.transformer_layer\.{_BLOCK}", r"ps_layers\.\d+\.(offset_layer|position_layer)\.(weight|bias)",
    rf"trans_layers\.\d+\.{_BLOCK}",
]))
_POSITION = re.compile(r"ps_layers\.(\d+)\.position_layer\.(weight|bias)")


def convert_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The released PS-ViT state dict (yuexy/PS-ViT ``models/ps_vit.py``; a ``module.`` prefix is dropped) in this
    module's layout: the same names without ``ps_layers.{i}.position_layer``, the released model's tied copies of
    ``pos_layer`` (checked equal to it). Unknown keys raise ``ValueError`` naming them; a missing BatchNorm
    ``num_batches_tracked`` (unused in evaluation) is filled with 0 where the stem's BatchNorm has its statistics."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    unknown = sorted(k for k in state if not RELEASED_KEYS.fullmatch(k))
    if unknown:
        raise ValueError(f"not a PS-ViT state dict: unknown keys {unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    out = {}
    for key, value in state.items():
        m = _POSITION.fullmatch(key)
        if m is None:
            out[key] = value
        elif f"pos_layer.{m.group(2)}" in state and not torch.equal(value, state[f"pos_layer.{m.group(2)}"]):
            raise ValueError(f"{key} differs from pos_layer.{m.group(2)}; PS-ViT shares one position layer")
    for key in [k for k in out if k.endswith(".running_mean")]:
        out.setdefault(key.replace("running_mean", "num_batches_tracked"), torch.zeros((), dtype=torch.long))
    return out


def load_psvit_state(model: PSViT, state: dict[str, Tensor]) -> PSViT:
    """Load released PS-ViT weights (:func:`convert_state_dict`) into ``model`` (strict: ``ValueError`` naming missing
    or mis-shaped keys, e.g. a B/18 checkpoint's ``point_coord`` in a B/14, or sampling points of another input
    size). Returns ``model``."""
    state = convert_state_dict(state)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
              if k in own and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"the checkpoint does not fit this PS-ViT: missing keys {missing[:6]}, unexpected keys "
                         f"{unexpected[:6]}, shapes {shapes[:3]}")
    if not torch.allclose(state["point_coord"].to(own["point_coord"]), own["point_coord"]):
        raise ValueError(f"the checkpoint's sampling points (point_coord) are not this {model.img_size} px model's: it "
                         "was built for another input size")
    model.load_state_dict(state)
    return model


# ----------------------------------------------------------------------------------------------------------- FLOPs
@dataclass(frozen=True)
class PSViTGeometry:
    """What the FLOPs of a PS-ViT depend on."""

    img_size: int = 224
    num_points: int = 14
    dim: int = 384
    num_iters: int = 4
    total_depth: int = 14
    mlp_ratio: float = 3.0
    stem_widths: tuple[int, int] = (64, 256)
    stem_inner: int = 64
    in_chans: int = 3
    num_classes: int = 1000
    downsample: int = 4

    @classmethod
    def from_model(cls, model: PSViT) -> PSViTGeometry:
        return cls(model.img_size, model.num_points, model.embed_dim, model.num_iters, model.depth, model.mlp_ratio,
                   model.stem_widths, model.stem_inner, model.in_chans, model.num_classes, model.downsample)

    @property
    def depth(self) -> int:
        """The transformer module's layers (those :func:`apply` may sample in)."""
        return self.total_depth - self.num_iters

    @property
    def grid(self) -> Grid:
        return (self.num_points, self.num_points)

    @property
    def num_tokens(self) -> int:
        """The transformer module's tokens, the CLS included."""
        return self.num_points**2 + 1

    def at_grid(self, grid: Grid) -> PSViTGeometry:
        if tuple(grid) != self.grid:
            raise ValueError(f"token grid {tuple(grid)} is not this geometry's {self.grid}")
        return self

    def gmacs(self, tokens_per_block=None, layernorm: bool = True) -> float:
        """:func:`psvit_gmacs` with the transformer module's token counts per layer (each ``n`` or
        ``(n_in, n_out[, n_query])``, as :func:`vitbench.flops.vit_macs`; default dense)."""
        return psvit_gmacs(self, layernorm, tokens_per_block=tokens_per_block)


def conv_macs(pixels: int, kernel: int, c_in: int, c_out: int) -> float:
    return pixels * kernel * kernel * c_in * c_out


def stem_macs(geom: PSViTGeometry, batchnorm: bool) -> float:
    """The convolutional stem: conv 7x7 / 2, then two bottlenecks at the map size (max-pool and ReLU free)."""
    half = -(-geom.img_size // 2)
    pixels = (-(-half // 2)) ** 2
    (w0, w1), inner, bn = geom.stem_widths, geom.stem_inner, BN_PER_ELEMENT if batchnorm else 0
    macs = conv_macs(half * half, 7, geom.in_chans, w0) + bn * half * half * w0
    for c_in, c_out in ((w0, w1), (w1, geom.dim)):
        macs += pixels * (c_in * inner + 9 * inner * inner + inner * c_out) + bn * pixels * (2 * inner + c_out)
        macs += pixels * c_in * c_out + bn * pixels * c_out if c_in != c_out else 0.0  # the 1x1 shortcut
    return macs


def psvit_macs(geom: PSViTGeometry, layernorm: bool = True, batchnorm: bool | None = None,
               tokens_per_block=None) -> float:
    """MACs of one image through a PS-ViT: the stem, ``num_iters`` sampling iterations (position ``Linear(2, dim)``,
    one transformer layer on the ``P P`` tokens, offsets ``Linear(dim, 2)`` except in the last), the transformer
    module's layers (``tokens_per_block``: their token counts, ATS; default dense), the final LayerNorm over the
    last layer's tokens and the head. ``layernorm``: LayerNorm at 5 per element; ``batchnorm`` (default: as
    ``layernorm``): the stem's eval-mode BatchNorm at 2 per element (fvcore's). The bilinear sampling itself (about
    4 MACs per sampled value, 1.2 M at P = 14) is not counted, as neither ``FlopCounterMode`` nor the released
    op's count sees it; without norms the count is ``FlopCounterMode``'s (:func:`vitbench.flops.flop_counter_gmacs`)."""
    batchnorm = layernorm if batchnorm is None else batchnorm
    n, dim = geom.num_points**2, geom.dim
    macs = stem_macs(geom, batchnorm)
    for i in range(geom.num_iters):
        macs += linear_macs(n, 2, dim) + block_macs(dim, n, mlp_ratio=geom.mlp_ratio, layernorm=layernorm)
        macs += linear_macs(n, dim, 2) if i < geom.num_iters - 1 else 0.0
    counts = [geom.num_tokens] * geom.depth if tokens_per_block is None else list(tokens_per_block)
    if len(counts) != geom.depth:
        raise ValueError(f"need {geom.depth} token counts, got {len(counts)}")
    blocks, n_last = blocks_macs(dim, counts, geom.mlp_ratio, layernorm)
    macs += blocks + (layernorm_macs(geom.num_tokens if n_last is None else n_last, dim) if layernorm else 0.0)
    return macs + dim * geom.num_classes


def psvit_gmacs(geom: PSViTGeometry, layernorm: bool = True, batchnorm: bool | None = None,
                tokens_per_block=None) -> float:
    """:func:`psvit_macs` in G (the papers' "GFLOPs")."""
    return psvit_macs(geom, layernorm, batchnorm, tokens_per_block) / 1e9


# ------------------------------------------------------------------------------------------------------------- ATS
class ATSPSViT:
    """A PS-ViT whose transformer-module layers run on per-image token sets, ATS sampling in the layers of
    ``record``'s stages.

    Modifications: ``forward_features`` runs the stem and the progressive sampling module as PS-ViT does, then the
    transformer module through :func:`ats.patch.run_blocks` and the final norm (padded output, CLS first)."""

    record: ATSRecord

    def forward_features(self, x: Tensor, *, hidden: Tensor | None = None, start: int = 0) -> Tensor:
        """``hidden``: the output of the first ``start`` layers for ``x`` (see :func:`ats.patch.dense_hidden`)."""
        tokens = self.embed_tokens(x) if hidden is None else hidden
        return self.norm(run_blocks(self.blocks, tokens, self.record, self.token_grid(x), start, hidden is not None))


def check_structure(model: nn.Module) -> None:
    """Refuse what ATS cannot sample in: a PS-ViT whose transformer module is plain timm blocks."""
    if not isinstance(model, PSViT):
        raise TypeError(f"expected a PS-ViT, got {type(model).__name__}")
    check_blocks(model.blocks)


def apply(model: PSViT, stages=STAGES, rho: float | None = None, k=None, mode: str = "official", variant=(),
          seed: int = 0) -> PSViT:
    """:func:`ats.patch.apply` for a PS-ViT: ATS in the transformer module's layers ``stages`` (0-based; default
    1..9, the paper's), the same K schedule, modes and variants. Returns ``model``."""
    check_structure(model)
    return attach_ats(model, ATSPSViT, stages, rho, k, mode, variant, seed)
