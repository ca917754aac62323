"""How a method attaches to a timm model: ToMe's subclass of the module's own class, and the one reading of timm
``Attention``'s packed q, k, v that the methods' attention layers share.

``attach(module, Mixin)`` swaps ``module.__class__`` for ``class (Mixin, type(module))``, made once per pair, so the
weights, ``state_dict`` keys and every method the mixin does not override (a subclass's included) stay as they were.
"""

from __future__ import annotations

from timm.layers import Attention
from torch import Tensor, nn

_CLASSES: dict[tuple[type, type], type] = {}


def mixin_class(mixin: type, base: type) -> type:
    """The class ``(mixin, base)``, created once and cached (``mixin`` itself where it already subclasses ``base``),
    named after both: ``LifeRegressionMixin`` on ``VisionTransformer`` -> ``LifeRegressionVisionTransformer``."""
    if issubclass(mixin, base):
        return mixin
    if (mixin, base) not in _CLASSES:
        name = mixin.__name__.removesuffix("Mixin") + base.__name__
        _CLASSES[mixin, base] = type(name, (mixin, base), {"__module__": mixin.__module__})
    return _CLASSES[mixin, base]


def attach(module: nn.Module, mixin: type) -> nn.Module:
    """Give ``module`` the behaviour of ``mixin`` in place (a no-op when it already has it); returns it."""
    if not isinstance(module, mixin):
        module.__class__ = mixin_class(mixin, type(module))
    return module


def qkv_heads(attn: Attention, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """timm ``Attention``'s packed ``qkv(x)`` ``[B, N, 3C]`` as q, k, v ``[B, H, N, d]``, q and k through the
    layer's ``q_norm`` / ``k_norm`` (as timm's ``Attention.forward``)."""
    B, N, _ = qkv.shape
    q, k, v = qkv.reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v
