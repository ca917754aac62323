"""Soft-weighted attention (Eq. 6) on the fused kernel, also when the weights need a gradient.

``softmax(h + log β)`` equals Eq. 6's weighted softmax, so the forward is one ``scaled_dot_product_attention`` with an
additive key bias. torch's CPU kernels fall back to the unfused math path (materialising B x H x N x N) as soon as
that bias requires a gradient, which stage 1 needs (``W`` gets its gradient only through ``log β``). The gradient of
a per-key bias has a closed form, so we keep the fused kernel:

    dm_j = Σ_h Σ_i dz_hij = Σ_h ( v_hj · dV_hj - (Pᵀ D)_hj ),   D_hi = dO_hi · O_hi,

with ``dV = Pᵀ dO`` from the fused backward and ``Pᵀ D`` from the same backward through one extra all-zero value
channel whose output gradient is ``D`` (q and k get a zero channel too, which leaves ``q·k`` unchanged).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention
from vitbench.patching import qkv_heads

__all__ = ["key_bias_attention", "LifeRegressionAttention"]


class _KeyBiasAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, scale):
        d = q.shape[-1]
        with torch.enable_grad():
            q0, k0 = q.detach().requires_grad_(), k.detach().requires_grad_()
            v1 = F.pad(v.detach(), (0, 1)).requires_grad_()
            leaves = (q0, k0, v1)
            out = F.scaled_dot_product_attention(F.pad(q0, (0, 1)), F.pad(k0, (0, 1)), v1,
                                                 attn_mask=bias.detach().to(q.dtype), scale=scale)
        ctx.graph = (leaves, out)
        ctx.save_for_backward(v)
        ctx.bias_shape, ctx.bias_dtype = bias.shape, bias.dtype
        return out[..., :d].detach()

    @staticmethod
    def backward(ctx, grad_out):
        (v,) = ctx.saved_tensors
        leaves, out = ctx.graph
        d = v.shape[-1]
        row = (grad_out * out[..., :d].detach()).sum(-1, keepdim=True)  # D_hi
        dq, dk, dv1 = torch.autograd.grad(out, leaves, torch.cat((grad_out, row), -1))
        del ctx.graph
        dv, pt_row = dv1[..., :d], dv1[..., d]
        dbias = ((v * dv).sum(-1) - pt_row).sum(1)  # (B, N): summed over heads and queries
        return dq, dk, dv, dbias.reshape(ctx.bias_shape).to(ctx.bias_dtype), None


def key_bias_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                       scale: float | None = None) -> torch.Tensor:
    """``softmax(q kᵀ scale + bias) v`` for a per-image key bias ``bias`` of shape (B, 1, 1, N), fused forward and
    backward (no dropout). ``q, k, v``: (B, H, N, d)."""
    if bias.dim() != 4 or bias.shape[1:3] != (1, 1):
        raise ValueError(f"expected a (B, 1, 1, N) key bias, got {tuple(bias.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _KeyBiasAttention.apply(q, k, v, bias, scale)


class LifeRegressionAttention(Attention):
    """timm ``Attention`` with one modification: a (B, 1, 1, N) ``attn_mask`` that requires a gradient (soft weights
    while training ``W``) goes through :func:`key_bias_attention`; every other call is timm's ``forward``.

    Attached with ``vitbench.patching.attach(blk.attn, LifeRegressionAttention)``; it already subclasses timm's
    ``Attention``, so a plain ``Attention`` becomes exactly this class.
    """

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        needs_grad = attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled()
        dropout = self.training and self.attn_drop.p > 0
        if not needs_grad or dropout or is_causal or not self.fused_attn:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        # Note: from timm.layers.attention.Attention.forward, with the fused call replaced.
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = qkv_heads(self, self.qkv(x))
        x = key_bias_attention(q, k, v, attn_mask, self.scale)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))
