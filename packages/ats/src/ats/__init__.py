"""Adaptive Token Sampling (Fayyaz et al., ECCV 2022) for timm Vision Transformers and the paper's other backbones
(:mod:`ats.backbones`, registered with timm on import)."""

from .backbones import apply, check_structure
from .patch import MODES, VARIANTS, ATSConfig, ATSRecord

__all__ = ["MODES", "VARIANTS", "ATSConfig", "ATSRecord", "apply", "check_structure"]
__version__ = "0.1.0"
