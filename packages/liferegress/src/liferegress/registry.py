"""The paper's Life-Regression configurations as timm names (``timm.create_model(name)`` after
``import liferegress``): Tables I-III's models at their keep rates (temperature 1.5, drop layers 4, 7, 10) and the
embedded backbone at the same keep rates. ``pretrained=True`` loads the dense model's weights with an untrained
predictor ``W`` (the start of training); ``checkpoint_path=`` (timm's) loads a trained Life-Regression model."""

from __future__ import annotations

import vitbench  # noqa: F401  (registers the embedded backbone, the dense model of three names below)
from vitbench.patching import register_method

from .patch import apply

RATES = {"rho09": 0.9, "rho08": 0.8, "rho07": 0.7}
SETTINGS = {
    "deit_small_patch16_224": ("rho09", "rho08", "rho07"),
    "deit_base_patch16_224": ("rho07",),
    "vit_tiny_patch16_224": ("rho07",),
    "vit_small_patch16_224": ("rho07",),
    "vit_base_patch16_224": ("rho07",),
    "vit_digits_patch8_112": ("rho09", "rho08", "rho07"),
}
METHOD_MODELS: dict[str, tuple[str, dict]] = {
    f"{dense}_liferegress_{tag}": (dense, {"keep_rate": RATES[tag], "temperature": 1.5})
    for dense, tags in SETTINGS.items() for tag in tags
}
for _name, (_dense, _config) in METHOD_MODELS.items():
    register_method(_name, _dense, apply, _config, __name__, "Life-Regression patch slimming")
