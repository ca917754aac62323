"""How a method attaches to a timm model: ToMe's subclass of the module's own class, and the one reading of timm
``Attention``'s packed q, k, v that the methods' attention layers share.

``attach(module, Mixin)`` swaps ``module.__class__`` for ``class (Mixin, type(module))``, made once per pair, so the
weights, ``state_dict`` keys and every method the mixin does not override (a subclass's included) stay as they were.
``register_method`` names a method's configuration of a timm model as a timm model of its own.
"""

from __future__ import annotations

from collections.abc import Callable

import timm
from timm.layers import Attention
from timm.models import register_model
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


def register_method(name: str, dense: str, apply: Callable[..., nn.Module], config: dict, module: str,
                    doc: str) -> Callable[..., nn.Module]:
    """Register ``name`` with timm as ``apply(timm.create_model(dense, ...), **config)``: ``pretrained=True`` (and a
    pretrained tag, ``pretrained_cfg_overlay``, ``num_classes``, ...) load and build the dense model exactly as
    ``timm.create_model(dense, ...)`` does, and ``checkpoint_path=`` (timm's) then loads the method's trained
    weights. ``module`` and ``doc`` describe the entry in ``timm.list_models`` / its ``__doc__``."""

    def create(pretrained: bool = False, **kwargs) -> nn.Module:
        return apply(timm.create_model(dense, pretrained=pretrained, **kwargs), **config)

    create.__name__, create.__module__ = name, module
    create.__doc__ = f"{doc} on {dense}: {config}."
    return register_model(create)
