"""LF-ViT (Hu et al., AAAI'24): localization on a half-resolution image, focus on the NGCA region."""

from . import checkpoint
from .model import LFOutput, LFRecord, LFVisionTransformer, check_eta

__all__ = ["LFOutput", "LFRecord", "LFVisionTransformer", "check_eta", "checkpoint"]
