"""Registering this package's models with timm (``timm.create_model(name)``): models without shipped weights, whose
``pretrained=True`` says where the authors' weights are loaded from instead."""

from __future__ import annotations

from collections.abc import Callable

from timm.models import build_model_with_cfg, register_model
from torch import nn


def register_unshipped(name: str, cls: type[nn.Module], kwargs: dict, module: str, load_hint: str) -> Callable:
    """Register ``name`` (built as ``cls(**kwargs, **overrides)`` with its ``default_cfgs`` entry of ``module``) with
    timm; ``pretrained=True`` raises ``FileNotFoundError`` pointing to ``load_hint``. Returns the builder."""

    def create(pretrained: bool = False, **overrides) -> nn.Module:
        if pretrained:
            raise FileNotFoundError(f"no weights are shipped for {name}; build it with pretrained=False and load "
                                    f"{load_hint}")
        return build_model_with_cfg(cls, name, False, **{**kwargs, **overrides})

    create.__name__ = name
    create.__doc__ = f"{cls.__name__} {kwargs} ({module})."
    create.__module__ = module
    return register_model(create)
