"""Adaptive Token Sampling (Fayyaz et al., ECCV 2022) for timm Vision Transformers."""

from .patch import MODES, VARIANTS, ATSConfig, ATSInfo, apply

__all__ = ["MODES", "VARIANTS", "ATSConfig", "ATSInfo", "apply"]
__version__ = "0.1.0"
