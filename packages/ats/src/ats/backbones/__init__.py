"""ATS inside other backbone families of the paper, each a model on timm layers registered with timm, with its
checkpoint-layout converter and its ATS placement; every one uses the same :mod:`ats.sampling` functions and
records per-image token counts in :class:`ats.patch.ATSRecord`.

A backbone's ATS-able blocks are timm ``Block`` s in ``model.blocks`` on a token sequence with the CLS first; it
provides ``embed_tokens(x)`` (the input of those blocks) and ``token_grid(x)``, an ``apply`` and a FLOPs geometry
with ``depth``, ``num_tokens``, ``grid``, ``at_grid`` and ``gmacs(tokens_per_block, layernorm)``. Each family is one
:class:`Backbone` in :data:`BACKBONES`; :func:`for_model` and :func:`for_name` pick it (timm's ViT, :data:`VIT`, for
any other model). Adding a family is adding its record.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from vitbench.flops import ViTGeometry
from vitbench.models import load_checkpoint, load_state, read_state_dict

from .. import patch
from . import cvt, evit, psvit


def _first_stage(model: nn.Module, stages) -> int:
    return min(stages)


def _normed_head(model: nn.Module, hidden: Tensor) -> Tensor:
    return model.forward_head(model.norm(hidden))


def _itself(model: nn.Module) -> nn.Module:
    return model


@dataclass(frozen=True)
class Backbone:
    """One family's ATS integration: which models it covers, where the paper puts ATS, and how to patch, count,
    load and evaluate them."""

    model_class: type[nn.Module] | None  # None: timm's ViT (any model no other record claims)
    model_names: tuple[str, ...]  # its timm names, known before a model is built
    stages: tuple[int, ...]  # the paper's ATS blocks
    apply: Callable[..., nn.Module]
    check_structure: Callable[[nn.Module], None]  # TypeError / ValueError naming what ATS cannot patch
    geometry: Callable[[nn.Module], Any]  # what its FLOPs depend on
    load: Callable[[nn.Module, dict[str, Tensor], str | Path], nn.Module] | None = None  # its own layouts
    scope: str = "blocks"  # where its block indices count, for messages
    build_kwargs: Mapping[str, Any] = field(default_factory=dict)  # what a model is built with to take ATS
    rho: float = 1.0  # the paper's fine-tuned point; ats-eval's sweep without --rho / --k when not 1
    takes_k_rule: bool = False  # its apply takes k_rule (how rho sets K_n)
    resume_point: Callable[[nn.Module, Any], int] = _first_stage  # the block ATS rows may start from
    head: Callable[[nn.Module, Tensor], Tensor] = _normed_head  # logits from the output of all its blocks
    sampling_model: Callable[[nn.Module], nn.Module] = _itself  # the model ATS samples in (eval mode)

    @property
    def owns_weights(self) -> bool:
        """Whether it reads its checkpoints through :func:`load_weights` rather than vitbench's timm loader."""
        return self.load is not None

    def sweep(self, default: tuple[float, ...]) -> tuple[float, ...]:
        """The rho sweep ``ats-eval`` runs without ``--rho`` / ``--k``: the paper's point when it is not 1 (next
        to rho 1, K = N), ``default`` otherwise."""
        return default if self.rho == 1.0 else (self.rho,)

    def options(self, k_rule: str) -> dict:
        """Its own :func:`apply` arguments: an EViT's ``k_rule``."""
        return {"k_rule": k_rule} if self.takes_k_rule else {}


def _fitting(path: str | Path, family: str, load: Callable[[], nn.Module]) -> nn.Module:
    try:
        return load()
    except (ValueError, RuntimeError) as e:  # a foreign layout or mis-shaped tensors (another class count)
        raise ValueError(f"checkpoint {path} does not fit {family}: {str(e).splitlines()[0][:300]}") from None


def _load_psvit(model: psvit.PSViT, state: dict[str, Tensor], path: str | Path) -> nn.Module:
    """The released PS-ViT layout."""
    return _fitting(path, type(model).__name__, lambda: psvit.load_psvit_state(model, state))


def _load_evit(model: evit.EViT, state: dict[str, Tensor], path: str | Path) -> nn.Module:
    """The released EViT / DeiT layout, unknown keys refused by name."""
    def load() -> nn.Module:
        load_state(model, evit.convert_state_dict(state), path)
        return model

    return _fitting(path, "EViT", load)


def _load_cvt(model: cvt.CvT, state: dict[str, Tensor], path: str | Path) -> nn.Module:
    """The official and HuggingFace layouts (:func:`~ats.backbones.cvt.load_cvt_state`: ``dw_bn`` weights, folded
    for a ``linear`` stage 3) and this package's own ``linear`` checkpoints (``ats-train`` output) as they are."""
    if any(".attn.qkv." in k for k in state):  # a linear stage 3 (ours): no conversion
        if model.projection != "linear":
            raise ValueError(f"checkpoint {path} has a linear stage 3 (an ATS CvT); it does not fit a dw_bn CvT")
        load_state(model, state, path)
        return model
    return _fitting(path, type(model).__name__, lambda: cvt.load_cvt_state(model, state))


def _cvt_linear(model: cvt.CvT) -> nn.Module:
    """For a ``dw_bn`` CvT a ``linear``-stage-3 copy with its weights folded
    (:func:`~ats.backbones.cvt.fold_projections`, the training-free start); a ``linear`` one itself."""
    if model.projection == "linear":
        return model
    qkv_bias = model.stages[0].blocks[0].attn.proj_q.bias is not None
    linear = cvt.CvT(model.img_size, model.in_chans, model.num_classes, model.depths, model.dims, model.heads,
                     model.mlp_ratio, qkv_bias, projection="linear", activation=model.activation, embed=model.embed)
    linear.pretrained_cfg = getattr(model, "pretrained_cfg", None)
    linear.load_state_dict(cvt.fold_projections(model.state_dict(), len(model.depths) - 1))
    return linear.to(next(model.parameters()).device).eval()


def _evit_resume_point(model: evit.EViT, stages) -> int:
    """No later than the first reorganising block: the kept tokens' original indices come from running it."""
    return min(min(stages), *model.drop_loc)


BACKBONES = (
    Backbone(cvt.CvT, tuple(cvt.CVT_MODELS), cvt.STAGES, cvt.apply, cvt.check_structure, cvt.CvTGeometry.from_model,
             _load_cvt, scope="stage-3 blocks", build_kwargs={"projection": "linear"},  # App. E.2
             head=lambda model, hidden: model.forward_head(hidden), sampling_model=_cvt_linear),
    Backbone(psvit.PSViT, tuple(psvit.PSVIT_MODELS), psvit.STAGES, psvit.apply, psvit.check_structure,
             psvit.PSViTGeometry.from_model, _load_psvit, scope="transformer-module layers"),
    Backbone(evit.EViT, tuple(evit.EVIT_MODELS), evit.STAGES, evit.apply, evit.check_structure,  # Table A.5
             evit.EViTGeometry.from_model, _load_evit, rho=evit.ATS_RHO, takes_k_rule=True,
             resume_point=_evit_resume_point),
)
VIT = Backbone(None, (), tuple(range(3, 12)), patch.apply, patch.check_structure, ViTGeometry.from_model)


def for_model(model: nn.Module) -> Backbone:
    """``model``'s family (:data:`VIT` for any model no other record claims)."""
    return next((b for b in BACKBONES if isinstance(model, b.model_class)), VIT)


def for_name(name: str) -> Backbone:
    """The family of the timm model ``name``, known before it is built."""
    return next((b for b in BACKBONES if name in b.model_names), VIT)


def apply(model: nn.Module, *args, **kwargs) -> nn.Module:
    """ATS on ``model`` with its family's ``apply`` (the arguments and their defaults are theirs: a ViT's blocks
    3..11, CvT stage 3's blocks 0..8, PS-ViT's layers 1..9, EViT's blocks 4, 5, 7, 8, 10, 11)."""
    return for_model(model).apply(model, *args, **kwargs)


def check_structure(model: nn.Module) -> None:
    """The family's structure check (``TypeError`` / ``ValueError`` naming what ATS cannot patch)."""
    for_model(model).check_structure(model)


def geometry(model: nn.Module):
    """What ``model``'s FLOPs depend on: :class:`~vitbench.flops.ViTGeometry` or its family's (e.g.
    :class:`~ats.backbones.cvt.CvTGeometry`)."""
    return for_model(model).geometry(model)


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load the checkpoint ``path`` into ``model`` (strict; ``ValueError`` naming the file when it does not fit):
    with its family's own layouts (a CvT: official and HuggingFace; PS-ViT and EViT: the released ones), or
    vitbench's loader."""
    family = for_model(model)
    if not family.owns_weights:
        return load_checkpoint(model, path)
    return family.load(model, read_state_dict(path), path)


def linear_variant(model: nn.Module) -> nn.Module:
    """The model ATS samples in: for a ``dw_bn`` CvT a ``linear``-stage-3 copy with its weights folded; ``model``
    itself otherwise."""
    return for_model(model).sampling_model(model)
