"""Reading video checkpoints into :mod:`ats.video.models`: the authors' released Kinetics checkpoints, an image
ViT as the initialisation of a video model, or this package's own layout (``ats-train`` outputs, shipped weights)."""

from __future__ import annotations

from timm.layers import resample_abs_pos_embed
from torch import Tensor
from vitbench.models import load_state, read_state_dict

from .models import ARCHS, VideoTransformer

# Released checkpoint layouts -> these modules.
RELEASED_PREFIXES = {"timesformer": "model.", "xvit": "base_model."}


def convert_released(state: dict[str, Tensor], arch: str) -> dict[str, Tensor]:
    """Map a released checkpoint's ``model_state`` to this module's keys.

    * TimeSformer (facebookresearch/TimeSformer ``lib/models/vit.py``): the wrapper ``vit_base_patch16_224``
      holds the network as ``model``, so ``model.<key>`` -> ``<key>``; every other name is identical
      (``blocks.i.{norm1, attn.qkv, attn.proj, temporal_norm1, temporal_attn.qkv, temporal_attn.proj,
      temporal_fc, norm2, mlp.fc1, mlp.fc2}``, ``cls_token``, ``pos_embed``, ``time_embed``, ``norm``, ``head``).
    * X-ViT (1adrianb/video-transformers ``XVIT``): ``base_model.<key>`` -> ``<key>`` (the per-frame ViT, whose
      ``head`` is a parameter-free Dropout), ``consensus.*`` unchanged (``VitHead``); ``new_fc.*``, built but
      unused with the ``vit`` consensus, is dropped.

    A ``module.`` prefix (DDP) is removed first. Unknown keys raise ``ValueError``.
    """
    if arch not in RELEASED_PREFIXES:
        raise ValueError(f"unknown video architecture {arch!r}; expected one of {ARCHS}")
    prefix = RELEASED_PREFIXES[arch]
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith(prefix):
            out[key[len(prefix):]] = value
        elif arch == "xvit" and key.startswith("consensus."):
            out[key] = value
        elif arch == "xvit" and key.startswith("new_fc."):
            continue
        else:
            raise ValueError(f"unexpected key {key!r} in a released {arch} checkpoint")
    return out


def load_released(model: VideoTransformer, path: str) -> VideoTransformer:
    """Load an authors' checkpoint (``{'model_state': ...}`` .pyth) into ``model``; positional tables must match."""
    state = convert_released(read_state_dict(path), model.arch)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit {type(model).__name__}: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    return model


def inflate_image_state(model: VideoTransformer, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """An image ViT's weights (timm layout) as the initialisation of a video model of the same width and depth,
    as both video papers start from ImageNet ViTs: the positional table resampled to the model's grid (timm's
    ``resample_abs_pos_embed``); TimeSformer's temporal attention and its norm copied from the spatial ones (the
    released ``load_pretrained``), ``temporal_fc`` left at its initialisation (zero after block 0); X-ViT's
    blocks are the image blocks, its temporal head new. An image ``head`` that does not fit is dropped. Returns
    the state and the keys that keep their initialisation."""
    state = dict(state)
    pos = state.get("pos_embed")
    if pos is not None and pos.shape != model.pos_embed.shape:
        side = int(round((pos.shape[1] - 1) ** 0.5))
        state["pos_embed"] = resample_abs_pos_embed(pos.float(), list(model.grid), (side, side),
                                                    num_prefix_tokens=1).to(pos.dtype)
    if model.arch == "timesformer":
        for key in list(state):
            if key.startswith("blocks.") and (".attn." in key or ".norm1." in key):
                state[key.replace(".attn.", ".temporal_attn.").replace(".norm1.", ".temporal_norm1.")] = state[key]
    own = model.state_dict()
    state = {k: v for k, v in state.items()
             if not (k.startswith("head.") and (k not in own or own[k].shape != v.shape))}
    return state, sorted(set(own) - set(state))


def load_video_checkpoint(model: VideoTransformer, path: str) -> VideoTransformer:
    """The one video checkpoint reader, by the file's key layout: the authors' released checkpoints
    (:func:`load_released`), an image ViT of the same width and depth (:func:`inflate_image_state`), or this
    module's own layout (``ats-train`` outputs, shipped weights; strict)."""
    state = read_state_dict(path)
    if any(k.startswith(("model.", "base_model.")) for k in state):
        return load_released(model, path)
    optional: list[str] = []
    if not any(k in state for k in ("time_embed", "temp_embed")):
        state, optional = inflate_image_state(model, state)
    load_state(model, state, path, optional=tuple(optional))
    return model


