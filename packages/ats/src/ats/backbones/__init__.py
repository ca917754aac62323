"""ATS inside other backbone families of the paper, each a model on timm layers registered with timm, with its
checkpoint-layout converter and its ATS placement; every one uses the same :mod:`ats.sampling` functions and
records per-image token counts in :class:`ats.patch.ATSRecord`.

A backbone's ATS-able blocks are timm ``Block`` s in ``model.blocks`` on a token sequence with the CLS first; it
provides ``embed_tokens(x)`` (the input of those blocks) and ``token_grid(x)``, an ``apply`` and a FLOPs geometry
with ``depth``, ``num_tokens``, ``grid``, ``at_grid`` and ``gmacs(tokens_per_block, layernorm)``. :func:`apply`,
:func:`check_structure` and :func:`geometry` pick the backbone's (the timm ViT's for any other model).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn
from vitbench.flops import ViTGeometry
from vitbench.models import load_checkpoint, load_state, read_state_dict

from .. import patch
from . import cvt, evit, psvit


def apply(model: nn.Module, *args, **kwargs) -> nn.Module:
    """ATS on ``model``: :func:`ats.backbones.cvt.apply` for a CvT, :func:`ats.patch.apply` otherwise (the
    arguments and their defaults are theirs: CvT stage 3's blocks 0..8, a ViT's blocks 3..11)."""
    if isinstance(model, psvit.PSViT):  # the transformer module's layers 1..9
        return psvit.apply(model, *args, **kwargs)
    if isinstance(model, evit.EViT):  # blocks 4, 5, 7, 8, 10, 11 (Table A.5)
        return evit.apply(model, *args, **kwargs)
    return (cvt.apply if isinstance(model, cvt.CvT) else patch.apply)(model, *args, **kwargs)


def check_structure(model: nn.Module) -> None:
    """The backbone's structure check (``TypeError`` / ``ValueError`` naming what ATS cannot patch)."""
    if isinstance(model, psvit.PSViT):
        return psvit.check_structure(model)
    if isinstance(model, evit.EViT):
        return evit.check_structure(model)
    (cvt.check_structure if isinstance(model, cvt.CvT) else patch.check_structure)(model)


def geometry(model: nn.Module):
    """What ``model``'s FLOPs depend on: :class:`~ats.backbones.cvt.CvTGeometry` or
    :class:`~vitbench.flops.ViTGeometry` (or :class:`~ats.backbones.psvit.PSViTGeometry`)."""
    if isinstance(model, psvit.PSViT):
        return psvit.PSViTGeometry.from_model(model)
    if isinstance(model, evit.EViT):  # its reorganising blocks' counts
        return evit.EViTGeometry.from_model(model)
    return cvt.CvTGeometry.from_model(model) if isinstance(model, cvt.CvT) else ViTGeometry.from_model(model)


def default_stages(name: str) -> tuple[int, ...]:
    """The paper's ATS blocks for model ``name``, known before it is built: CvT stage 3's 0..8 (App. E.2), a ViT's
    3..11 (PS-ViT: its transformer module's 1..9)."""
    if name in psvit.PSVIT_MODELS:
        return psvit.STAGES
    if name in evit.EVIT_MODELS:  # EViT + ATS, Table A.5
        return evit.STAGES
    return cvt.STAGES if name in cvt.CVT_MODELS else tuple(range(3, 12))


def owns_weights(name: str) -> bool:
    """Whether model ``name`` reads its checkpoints through :func:`load_weights` (a CvT: the official and HF layouts)
    rather than vitbench's timm loader."""
    return name in cvt.CVT_MODELS or name in psvit.PSVIT_MODELS or name in evit.EVIT_MODELS


def ats_build_kwargs(name: str) -> dict:
    """What model ``name`` is built with to take ATS: a CvT's ``projection="linear"`` stage 3 (App. E.2)."""
    return {"projection": "linear"} if name in cvt.CVT_MODELS else {}


def block_scope(model: nn.Module) -> str:
    """Where ``model``'s ATS block indices count, for messages: ``"stage-3 blocks"`` (CvT), ``"transformer-module
    layers"`` (PS-ViT) or ``"blocks"``."""
    if isinstance(model, psvit.PSViT):
        return "transformer-module layers"
    return "stage-3 blocks" if isinstance(model, cvt.CvT) else "blocks"


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load the checkpoint ``path`` into ``model`` (strict; ``ValueError`` naming the file when it does not fit).

    A CvT reads the official and HuggingFace layouts (:func:`~ats.backbones.cvt.load_cvt_state`: ``dw_bn`` weights,
    folded for a ``linear`` stage 3) and this package's own ``linear`` checkpoints (``ats-train`` output) as they are;
    any other model goes through vitbench's loader."""
    if isinstance(model, psvit.PSViT):  # the released layout
        try:
            return psvit.load_psvit_state(model, read_state_dict(path))
        except (ValueError, RuntimeError) as e:
            raise ValueError(f"checkpoint {path} does not fit {type(model).__name__}: "
                             f"{str(e).splitlines()[0][:300]}") from None
    if isinstance(model, evit.EViT):  # the released EViT / DeiT layout, unknown keys refused by name
        try:
            load_state(model, evit.convert_state_dict(read_state_dict(path)), path)
        except ValueError as e:
            raise ValueError(f"checkpoint {path} does not fit EViT: {str(e).splitlines()[0][:300]}") from None
        return model
    if not isinstance(model, cvt.CvT):
        return load_checkpoint(model, path)
    state = read_state_dict(path)
    if any(".attn.qkv." in k for k in state):  # a linear stage 3 (ours): no conversion
        if model.projection != "linear":
            raise ValueError(f"checkpoint {path} has a linear stage 3 (an ATS CvT); it does not fit a dw_bn CvT")
        load_state(model, state, path)
        return model
    try:
        return cvt.load_cvt_state(model, state)
    except (ValueError, RuntimeError) as e:  # a foreign layout or mis-shaped tensors (another class count)
        raise ValueError(f"checkpoint {path} does not fit {type(model).__name__}: {str(e).splitlines()[0][:300]}") \
            from None


def linear_variant(model: nn.Module) -> nn.Module:
    """The model ATS samples in, in eval mode: for a ``dw_bn`` CvT a ``linear``-stage-3 copy with its weights folded
    (:func:`~ats.backbones.cvt.fold_projections`, the training-free start); ``model`` itself otherwise."""
    if not isinstance(model, cvt.CvT) or model.projection == "linear":
        return model
    qkv_bias = model.stages[0].blocks[0].attn.proj_q.bias is not None
    linear = cvt.CvT(model.img_size, model.in_chans, model.num_classes, model.depths, model.dims, model.heads,
                     model.mlp_ratio, qkv_bias, projection="linear", activation=model.activation, embed=model.embed)
    linear.pretrained_cfg = getattr(model, "pretrained_cfg", None)
    linear.load_state_dict(cvt.fold_projections(model.state_dict(), len(model.depths) - 1))
    return linear.to(next(model.parameters()).device).eval()


def head_from_hidden(model: nn.Module, hidden):
    """Logits from the output of all of ``model``'s ATS-able blocks run dense (:func:`ats.patch.dense_hidden`)."""
    return model.forward_head(hidden if isinstance(model, cvt.CvT) else model.norm(hidden))


def resume_point(model: nn.Module, stages) -> int:
    """The block whose input the ATS rows of ``model`` may start from (:class:`ats.evaluate.SharedBlocks`): the
    first ATS stage, but no later than an EViT's first reorganising block (its kept tokens' original indices come
    from running it)."""
    first = min(stages)
    return min(first, *model.drop_loc) if isinstance(model, evit.EViT) else first


def apply_options(model: nn.Module, k_rule: str) -> dict:
    """Backbone-specific :func:`apply` arguments: an EViT's ``k_rule`` (how Table A.5's rho sets K_n)."""
    return {"k_rule": k_rule} if isinstance(model, evit.EViT) else {}


def default_rho(name: str, default: tuple[float, ...]) -> tuple[float, ...]:
    """The rho sweep ``ats-eval`` runs on model ``name`` without ``--rho`` / ``--k``: Table A.5's 0.7 for an EViT
    (next to rho 1, K = N), ``default`` otherwise."""
    return (evit.ATS_RHO,) if name in evit.EVIT_MODELS else default


def paper_rho(name: str) -> float:
    """The rho of the paper's fine-tuned ATS point for model ``name``: 0.7 for EViT (Table A.5), 1 otherwise."""
    return evit.ATS_RHO if name in evit.EVIT_MODELS else 1.0
