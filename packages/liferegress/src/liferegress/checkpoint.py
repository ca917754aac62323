"""Checkpoints of a patched model: the project's own layout and the released code's.

Own layout: the timm ``state_dict`` plus ``life_predictor.W`` (D x D), saved as safetensors with the Life Regression
config in the metadata. Released layout (``TimmVitAdapter``, optionally inside a Lightning checkpoint whose
``state_dict`` keys start with ``model.``): backbone under ``model.``, ``blocks.patch_life_predictor.W`` (1 x D x D),
``blocks.plugin_norm_layer.*`` (never trained, identity affine) and duplicate views ``blocks.head_blocks.*`` /
``blocks.tail_blocks.*`` of the backbone blocks.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from vitbench.models import load_state, read_state_dict

from .patch import is_patched

__all__ = ["convert_state_dict", "load_checkpoint", "save_checkpoint", "read_config"]

_RELEASED_W = "blocks.patch_life_predictor.W"
_META_KEY = "liferegress"


def read_config(path: str | Path) -> dict | None:
    """The Life Regression config stored in a checkpoint saved by ``save_checkpoint`` (``None`` if absent)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix != ".safetensors":
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"checkpoint {path} is not a valid safetensors file ({type(e).__name__}: {e})") from None
    return json.loads(meta[_META_KEY]) if _META_KEY in meta else None


def convert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a released-layout state dict to the project's layout; other layouts are returned unchanged."""
    w_keys = [k for k in state if k.endswith(_RELEASED_W)]
    if not w_keys:
        return dict(state)
    prefix = w_keys[0][: -len(_RELEASED_W)]
    norm_w = state.get(f"{prefix}blocks.plugin_norm_layer.weight")
    norm_b = state.get(f"{prefix}blocks.plugin_norm_layer.bias")
    if norm_w is not None and not (torch.all(norm_w == 1) and torch.all(norm_b == 0)):
        raise ValueError("released checkpoint has a trained plugin LayerNorm; only the identity (untrained) one "
                         "is supported")
    out = {}
    backbone = f"{prefix}model."
    for key, value in state.items():
        if key.startswith(backbone):
            out[key[len(backbone):]] = value
    out["life_predictor.W"] = state[w_keys[0]].reshape(state[w_keys[0]].shape[-2:])
    return out


def load_checkpoint(model: nn.Module, path: str | Path, strict: bool = True) -> list[str]:
    """Load either layout into a patched model; returns the missing keys (only ``life_predictor.W`` may be missing
    when ``strict=False``, e.g. a plain backbone checkpoint)."""
    if not is_patched(model):
        raise TypeError("call liferegress.apply(model, ...) before loading a Life Regression checkpoint")
    optional = () if strict else ("life_predictor.W",)
    return load_state(model, convert_state_dict(read_state_dict(path)), path, optional=optional)


def save_checkpoint(model: nn.Module, path: str | Path, extra: dict | None = None) -> Path:
    """Save a patched model as safetensors (project layout) with its config (and ``extra``) in the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**model.life_cfg.to_dict(), **(extra or {})}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state, str(tmp), metadata={_META_KEY: json.dumps(meta)})
    tmp.replace(path)
    return path
