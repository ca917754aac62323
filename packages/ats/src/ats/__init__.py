"""Adaptive Token Sampling (Fayyaz et al., ECCV 2022) for timm Vision Transformers."""

from . import backbones  # noqa: F401  (registers the CvT models with timm)
from .patch import MODES, VARIANTS, ATSConfig, ATSRecord, apply, check_structure

__all__ = ["MODES", "VARIANTS", "ATSConfig", "ATSRecord", "apply", "check_structure"]
__version__ = "0.1.0"
