"""Registering this package's models with timm (``timm.create_model(name)``): models without shipped weights, whose
``pretrained=True`` says where the authors' weights are loaded from instead, and the paper's ATS configurations of
timm ViTs (``METHOD_MODELS``)."""

from __future__ import annotations

from collections.abc import Callable

import vitbench  # noqa: F401  (registers the embedded backbone, the dense model of two names below)
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn
from vitbench.patching import register_method

from . import patch
from .paper import MULTI


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


def register_unshipped_models(models: dict[str, tuple[type[nn.Module], dict, dict]], namespace: dict,
                              load_hint: str) -> None:
    """Register every ``name: (cls, kwargs, pretrained config)`` of ``models`` with :func:`register_unshipped`: their
    ``default_cfgs`` (``<name>.untrained``, the input size from ``kwargs["img_size"]`` when given) go into the
    module ``namespace`` first, where timm reads them, and the builders become the module's attributes."""
    namespace["default_cfgs"] = generate_default_cfgs({
        f"{name}.untrained": dict(cfg, **({"input_size": (3, kw["img_size"], kw["img_size"])} if "img_size" in kw
                                          else {}))
        for name, (_, kw, cfg) in models.items()})
    for name, (cls, kwargs, _) in models.items():
        namespace[name] = register_unshipped(name, cls, kwargs, namespace["__name__"], load_hint)


# The paper's ATS configurations as timm names (``timm.create_model(name)`` after ``import ats``): multi-stage ATS in
# blocks 3..11, released selection, at the rho of Fig. 5's 3.0 / 2.5 / 2.0 GFLOPs levels on DeiT-S (rho 1: Tables 1
# and A.4), on DeiT-S and on the embedded backbone. ``pretrained=True`` loads the dense model's weights (ATS has no
# parameters: the off-the-shelf setting); ``checkpoint_path=`` loads fine-tuned weights.
RHOS = {"rho1": 1.0, "rho087": 0.87, "rho072": 0.72}
METHOD_MODELS: dict[str, tuple[str, dict]] = {
    f"{dense}_ats_{tag}": (dense, {"stages": MULTI, "rho": rho, "mode": "official"})
    for dense in ("deit_small_patch16_224", "vit_digits_patch8_112") for tag, rho in RHOS.items()
}
for _name, (_dense, _config) in METHOD_MODELS.items():
    register_method(_name, _dense, patch.apply, _config, __name__, "Multi-stage ATS (blocks 3..11)")
