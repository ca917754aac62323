"""EViT (Liang et al., ICLR 2022) next to ATS on the embedded default (``ats-eval --baselines evit``): the static
token pruning ATS claims to beat, and ATS inside it (the ATS paper's Table A.5), in the same pass over the data and
the same timing run as the ATS rows.

Rows: EViT at keep 0.7 (blocks 3, 6, 9) on the embedded backbone's own weights (off the shelf) and on the shipped
EViT weights fine-tuned with ``ats-train --model evit_digits_patch8_112 --no-ats``; EViT + ATS (blocks 4, 5, 7, 8,
10, 11, Table A.5's rho 0.7 read by ``--k-rule``) on the fine-tuned EViT weights, and on the shipped EViT + ATS
weights fine-tuned from them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch
import vitbench
from vitbench import evaluation as ev
from vitbench.models import EMBEDDED_WEIGHTS

from . import backbones
from .backbones import evit
from .flops import dense_gmacs, upper_bound_gmacs
from .options import SHIPPED_ATS, SHIPPED_DENSE, WEIGHTS

EVIT_MODEL = "evit_digits_patch8_112"


def resume_point(model: evit.EViT) -> int:
    """Where EViT + ATS rows start from (:attr:`ats.backbones.Backbone.resume_point` at Table A.5's blocks)."""
    return backbones.for_model(model).resume_point(model, evit.STAGES)


def evit_model(path: Path) -> evit.EViT:
    """The embedded EViT (keep 0.7) with the weights ``path``, in eval mode."""
    return backbones.load_weights(vitbench.create_model(EVIT_MODEL), path).eval()


def shipped(path: Path, what: str) -> bool:
    """Whether ``path`` is shipped (a status line saying which rows are skipped when not)."""
    if not path.is_file():
        ev.status(f"no {what} weights shipped ({path.name}); its rows skipped")
    return path.is_file()


def evit_weights() -> list[tuple[str, str, Path]]:
    """``(series tag, weights key, path)`` of the EViT weights evaluated: the backbone's own, the shipped
    fine-tuned EViT (when present)."""
    out = [("off-the-shelf", "evit:backbone", EMBEDDED_WEIGHTS)]
    fine = WEIGHTS / SHIPPED_DENSE[EVIT_MODEL]
    return out + ([("fine-tuned", "evit:fine-tuned", fine)] if shipped(fine, "fine-tuned EViT") else [])


def dense_row(tag: str, key: str, model: evit.EViT, shared) -> ev.Setting:
    """EViT alone: its blocks run through the shared per-batch hidden states (:class:`ats.evaluate.SharedBlocks`)."""
    g = dense_gmacs(backbones.geometry(model))

    def step(x, y, index):
        hidden = shared.hidden(key, model, x, index, len(model.blocks))
        return backbones.for_model(model).head(model, hidden), torch.tensor(g)

    params = {"keep_rate": model.keep_rate, "drop_loc": list(model.drop_loc), "weights": tag, "model": EVIT_MODEL}
    return ev.Setting("evit", f"EViT {tag}", f"keep {model.keep_rate:g}", params, model, gflops=g, step=step)


def ats_row(tag: str, key: str, model: evit.EViT, k_rule: str, seed: int, probe: Callable | None) -> ev.Setting:
    """EViT + ATS at Table A.5's configuration on ``model``'s weights (``probe(setting, geometry, key)`` attaches
    the per-batch hook of the ATS rows: per-image GFLOPs, kept-token counts and figures)."""
    m = backbones.apply(copy.deepcopy(model), stages=evit.STAGES, rho=evit.ATS_RHO, k_rule=k_rule, seed=seed).eval()
    geom = backbones.geometry(m)
    bound = upper_bound_gmacs(geom, m.record.config)
    params = {"stages": list(evit.STAGES), "rho": evit.ATS_RHO, "k_rule": k_rule, "k": list(m.record.config.k),
              "keep_rate": model.keep_rate, "weights": tag, "model": EVIT_MODEL}
    s = ev.Setting("evit_ats", f"EViT + ATS {tag}", f"rho {evit.ATS_RHO:g}", params, m, gflops=bound,
                   extra={"gflops_upper_bound": bound})
    if probe is not None:
        probe(s, geom, key)
    return s


def evit_settings(shared, k_rule: str, seed: int, probe: Callable | None) -> list[ev.Setting]:
    """The EViT and EViT + ATS rows (see the module docstring); ``shared`` learns the EViT weights' keys."""
    rows, fine = [], None
    for tag, key, path in evit_weights():
        model = evit_model(path)
        shared.depths[key] = {resume_point(model), len(model.blocks)}
        rows.append(dense_row(tag, key, model, shared))
        fine = model if tag == "fine-tuned" else fine
    if fine is not None:
        rows.append(ats_row("off-the-shelf", "evit:fine-tuned", fine, k_rule, seed, probe))
        tuned = SHIPPED_ATS[EVIT_MODEL].path
        if shipped(tuned, "fine-tuned EViT + ATS"):
            shared.depths["evit:ats"] = {resume_point(fine)}
            rows.append(ats_row("fine-tuned", "evit:ats", evit_model(tuned), k_rule, seed, probe))
    return rows
