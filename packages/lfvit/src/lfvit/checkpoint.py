"""Checkpoints: the released code's key layout <-> ours, loading, and initialisation from a plain ViT/DeiT.

The released ``LFVisionTransformer`` names everything as timm does except the positional tables:
``pos_embed_list.0`` (g x g + CLS) is our ``pos_embed_coarse`` and ``pos_embed_list.1`` (2g x 2g + CLS) our
``pos_embed``. ``reuse_block.0`` (LayerNorm) and ``reuse_block.1.fc1/fc2`` (Mlp) match one to one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed

from .model import LFVisionTransformer

_OFFICIAL_TO_OURS = {"pos_embed_list.0": "pos_embed_coarse", "pos_embed_list.1": "pos_embed"}
_OURS_TO_OFFICIAL = {v: k for k, v in _OFFICIAL_TO_OURS.items()}


def is_official_layout(state_dict: dict) -> bool:
    """True if the state dict uses the released code's ``pos_embed_list.*`` keys."""
    return any(k.startswith("pos_embed_list.") for k in state_dict)


def from_official(state_dict: dict) -> dict:
    """Released layout -> ours (renames the two positional tables, strips a DDP ``module.`` prefix)."""
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        out[_OFFICIAL_TO_OURS.get(key, key)] = value
    return out


def to_official(state_dict: dict) -> dict:
    """Ours -> released layout, loadable by ``LFVisionTransformer`` of edgeai1/LF-ViT."""
    return {_OURS_TO_OFFICIAL.get(k, k): v for k, v in state_dict.items()}


def read_state_dict(path: str | Path) -> dict:
    """Read a state dict from ``.safetensors`` or a torch file (``{'model': ...}``, ``{'state_dict': ...}`` or
    a bare state dict, as the released code and DeiT save them)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise ValueError(f"{path} is not a valid safetensors file: {exc}") from exc
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickled objects beyond tensors/containers
            raise ValueError(f"{path} is not a plain tensor checkpoint ({exc.__class__.__name__}: {exc})") from exc
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return obj[key]
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise ValueError(f"{path}: no state dict found (expected keys 'model' or 'state_dict', or a bare state dict)")


def load_lfvit_checkpoint(model: LFVisionTransformer, path: str | Path, strict: bool = True) -> None:
    """Load LF-ViT weights in either layout; shape mismatches raise with the offending keys."""
    state = from_official(read_state_dict(path))
    own = model.state_dict()
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise ValueError(f"{path} does not fit this model (wrong geometry or g?):\n  " + "\n  ".join(bad))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise ValueError(f"{path} is not an LF-ViT checkpoint for this model: missing {missing}, "
                         f"unexpected {unexpected}")


def init_from_backbone(model: LFVisionTransformer, state_dict: dict) -> list[str]:
    """Initialise LF-ViT from a plain ViT/DeiT state dict (our option; the paper trains from scratch).

    Shared weights load as they are; the backbone's positional table is resized (bicubic, CLS entry kept) to
    the 2g x 2g fine table and the g x g coarse table. ``reuse_block`` keeps its fresh initialisation.
    Returns the keys left at initialisation.
    """
    state = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if "pos_embed" not in state:
        raise ValueError("backbone state dict has no 'pos_embed'")
    pos = state.pop("pos_embed")
    g = model.grid
    for name, side in (("pos_embed", 2 * g), ("pos_embed_coarse", g)):
        state[name] = resample_abs_pos_embed(pos, new_size=(side, side), num_prefix_tokens=1)
    own = model.state_dict()
    if state.get("head.weight") is not None and state["head.weight"].shape != own["head.weight"].shape:
        raise ValueError(f"backbone head has {state['head.weight'].shape[0]} classes, model {model.num_classes}")
    bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise ValueError(f"backbone does not match the LF-ViT geometry: {bad}")
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise ValueError(f"backbone has keys LF-ViT does not know: {unexpected}")
    model.load_state_dict(state, strict=False)
    return sorted(k for k in own if k not in state)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lfvit.checkpoint",
                                description="Convert LF-ViT checkpoints between the released layout "
                                            "(pos_embed_list.0/1) and ours (pos_embed_coarse/pos_embed).")
    p.add_argument("src", help="input checkpoint (.pth/.pt or .safetensors)")
    p.add_argument("dst", help="output file (.safetensors or .pth)")
    p.add_argument("--to", choices=("official", "lfvit"), required=True,
                   help="official: released layout saved as {'model': state_dict}; lfvit: ours")
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    state = from_official(read_state_dict(ns.src))
    if ns.to == "official":
        state = to_official(state)
    dst = Path(ns.dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in state.items()}, str(dst))
    else:
        torch.save({"model": state} if ns.to == "official" else state, dst)
    print(f"wrote {dst} ({len(state)} tensors, {ns.to} layout)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
