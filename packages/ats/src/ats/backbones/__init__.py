"""ATS inside other backbone families of the paper, each a model on timm layers registered with timm, with its
checkpoint-layout converter and its ATS placement; every one uses the same :mod:`ats.sampling` functions and
records per-image token counts in :class:`ats.patch.ATSRecord`.

A backbone's ATS-able blocks are timm ``Block`` s in ``model.blocks`` on a token sequence with the CLS first; it
provides ``embed_tokens(x)`` (the input of those blocks) and ``token_grid(x)``, an ``apply`` and a FLOPs geometry
with ``depth``, ``num_tokens``, ``grid``, ``at_grid`` and ``gmacs(tokens_per_block, layernorm)``. :func:`apply`,
:func:`check_structure` and :func:`geometry` pick the backbone's (the timm ViT's for any other model).
"""

from __future__ import annotations

from torch import nn
from vitbench.flops import ViTGeometry

from .. import patch
from . import cvt


def apply(model: nn.Module, *args, **kwargs) -> nn.Module:
    """ATS on ``model``: :func:`ats.backbones.cvt.apply` for a CvT, :func:`ats.patch.apply` otherwise (the
    arguments and their defaults are theirs: CvT stage 3's blocks 0..8, a ViT's blocks 3..11)."""
    return (cvt.apply if isinstance(model, cvt.CvT) else patch.apply)(model, *args, **kwargs)


def check_structure(model: nn.Module) -> None:
    """The backbone's structure check (``TypeError`` / ``ValueError`` naming what ATS cannot patch)."""
    (cvt.check_structure if isinstance(model, cvt.CvT) else patch.check_structure)(model)


def geometry(model: nn.Module):
    """What ``model``'s FLOPs depend on: :class:`~ats.backbones.cvt.CvTGeometry` or
    :class:`~vitbench.flops.ViTGeometry`."""
    return cvt.CvTGeometry.from_model(model) if isinstance(model, cvt.CvT) else ViTGeometry.from_model(model)


def default_stages(model: nn.Module) -> tuple[int, ...]:
    """The paper's ATS blocks for ``model``: CvT stage 3's 0..8 (App. E.2), a ViT's 3..11."""
    return cvt.STAGES if isinstance(model, cvt.CvT) else tuple(range(3, 12))
