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
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from vitbench.cli import run
from vitbench.models import load_state, read_state_dict

from .model import LFVisionTransformer

_OFFICIAL_TO_OURS = {"pos_embed_list.0": "pos_embed_coarse", "pos_embed_list.1": "pos_embed"}
_OURS_TO_OFFICIAL = {v: k for k, v in _OFFICIAL_TO_OURS.items()}


def from_official(state_dict: dict) -> dict:
    """Released layout -> ours (renames the two positional tables)."""
    return {_OFFICIAL_TO_OURS.get(k, k): v for k, v in state_dict.items()}


def to_official(state_dict: dict) -> dict:
    """Ours -> released layout, loadable by ``LFVisionTransformer`` of edgeai1/LF-ViT."""
    return {_OURS_TO_OFFICIAL.get(k, k): v for k, v in state_dict.items()}


def load_lfvit_checkpoint(model: LFVisionTransformer, path: str | Path, strict: bool = True) -> None:
    """Load LF-ViT weights in either layout (read and checked by :mod:`vitbench.models`)."""
    load_state(model, from_official(read_state_dict(path)), path, strict=strict)


def init_from_backbone(model: LFVisionTransformer, state_dict: dict) -> list[str]:
    """Initialise LF-ViT from a plain ViT/DeiT state dict (our option; the paper trains from scratch).

    Shared weights load as they are; the backbone's positional table is resized (bicubic, CLS entry kept) to
    the 2g x 2g fine table and the g x g coarse table. ``reuse_block`` keeps its fresh initialisation.
    Returns the keys left at initialisation.
    """
    state = dict(state_dict)
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


def command(args: argparse.Namespace) -> int:
    state = from_official(read_state_dict(args.src))
    if args.to == "official":
        state = to_official(state)
    dst = Path(args.dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(dst))
    else:
        torch.save({"model": state} if args.to == "official" else state, dst)
    print(f"wrote {dst} ({len(state)} tensors, {args.to} layout)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), command, argv)


if __name__ == "__main__":
    sys.exit(main())
