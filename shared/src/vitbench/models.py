"""The embedded backbone (a timm-registered ViT with the papers' token geometry), model-name resolution with the
``vitbench.models`` plugins, and checkpoint loading.

Plugins: a package that registers timm models of its own (e.g. ``ats``, whose ``ats.backbones`` registers the CvT
models) declares a module under the ``vitbench.models`` entry-point group::

    [project.entry-points."vitbench.models"]
    ats = "ats.backbones"

Before vitbench gives up on a model name timm does not know (:func:`is_model`, :func:`check_model_name`,
:func:`create_model`, ``vitbench-flops``, the training configuration), it imports every module of that group once
(:func:`load_model_plugins`), so ``--model cvt_13_224`` works without vitbench naming any method package.
"""

from __future__ import annotations

import argparse
import math
import os
import warnings
from textwrap import shorten
from collections.abc import Iterable
from importlib.metadata import entry_points
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models import build_model_with_cfg, generate_default_cfgs, load_state_dict, register_model
from timm.models.vision_transformer import VisionTransformer

WEIGHTS_DIR = Path(__file__).parent / "weights"
DIGITS_MEAN = (0.5, 0.5, 0.5)
DIGITS_STD = (0.5, 0.5, 0.5)
EMBEDDED_MODEL = "vit_digits_patch8_112"
EMBEDDED_WEIGHTS = WEIGHTS_DIR / f"{EMBEDDED_MODEL}.safetensors"
PLUGIN_GROUP = "vitbench.models"
LOADED_PLUGINS: set[str] = set()  # entry-point values already imported (each is imported once)

default_cfgs = generate_default_cfgs(
    {
        "vit_digits_patch8_112.embedded": {
            "file": str(EMBEDDED_WEIGHTS),
            "num_classes": 10,
            "input_size": (3, 112, 112),
            "pool_size": None,
            "crop_pct": 1.0,
            "interpolation": "bicubic",
            "mean": DIGITS_MEAN,
            "std": DIGITS_STD,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
            "license": "apache-2.0",
        }
    }
)


@register_model
def vit_digits_patch8_112(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The embedded default backbone: DeiT-style ViT, 112 px, patch 8 (14 x 14 grid, 7 x 7 at 56 px), depth 12,
    width 64, 2 heads, 10 classes. ``pretrained=True`` loads the weights shipped with vitbench."""
    if pretrained and not EMBEDDED_WEIGHTS.is_file():
        raise FileNotFoundError(
            f"the embedded backbone weights are not installed ({EMBEDDED_WEIGHTS}); train them with "
            "`vitbench-train` (see the vitbench README) or pass a checkpoint"
        )
    args = dict(img_size=112, patch_size=8, embed_dim=64, depth=12, num_heads=2, mlp_ratio=4.0, num_classes=10)
    return build_model_with_cfg(VisionTransformer, "vit_digits_patch8_112", pretrained, **dict(args, **kwargs))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The one checkpoint reader: timm's ``load_state_dict`` (``.safetensors`` or a torch file; unwraps
    ``{'state_dict': ...}`` / ``{'model': ...}`` (DeiT, the released LF-ViT code), ``{'model_state': ...}``
    (PySlowFast: TimeSformer, X-ViT) and ``module.`` / ``_orig_mod.``
    prefixes). Unreadable files raise ``ValueError`` naming the file, a missing one ``FileNotFoundError``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # DeiT checkpoints carry their args
            state = load_state_dict(str(path), use_ema=False, weights_only=True)
    except Exception as e:  # safetensors and torch.load raise their own error types
        kind = "a valid safetensors file" if path.suffix == ".safetensors" else "readable as a torch checkpoint"
        raise ValueError(f"checkpoint {path} is not {kind} ({type(e).__name__}: {str(e)[:200]})") from None
    if isinstance(state, dict) and isinstance(state.get("model_state"), dict):  # PySlowFast (TimeSformer, X-ViT)
        state = state["model_state"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} does not hold a state dict of tensors")
    check_finite(state.items(), f"checkpoint {path}")
    return state


def first_non_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> tuple[str, int, int] | None:
    """``(name, non-finite count, size)`` of the first floating tensor holding a NaN or an infinity; None when all
    are finite. One host sync per tensor: meant for loading and saving, not for every step."""
    for name, t in tensors:
        if t.is_floating_point() or t.is_complex():
            bad = int((~torch.isfinite(t.detach())).sum())
            if bad:
                return name, bad, t.numel()
    return None


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]] | torch.nn.Module, what: str) -> None:
    """Refuse weights holding NaN or infinite values (``ValueError`` naming the first bad tensor): what every
    command checks of the weights it loads, before any evaluation or training. ``tensors``: ``(name, tensor)``
    pairs (``state.items()``) or a module (its parameters and buffers)."""
    if isinstance(tensors, torch.nn.Module):
        tensors = list(tensors.named_parameters()) + list(tensors.named_buffers())
    found = first_non_finite(tensors)
    if found:
        name, bad, size = found
        raise ValueError(f"{what} holds non-finite weights: {name} has {bad} NaN/inf value(s) of {size} "
                         "(a diverged or damaged run); give intact weights")


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path,
                     optional: tuple[str, ...] = (), strict: bool = True) -> list[str]:
    """The one strict key/shape report: raises ``ValueError`` naming the mis-shaped, missing and unexpected keys
    (``optional`` keys may be missing; ``strict=False`` allows any missing or unexpected key but never a wrong
    shape). Returns the missing keys."""
    own = model.state_dict()
    shape_errors = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                    for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    required = [k for k in missing if k not in optional]
    if shape_errors or (strict and (required or unexpected)):
        def head(keys):
            return ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")
        lines = []
        if shape_errors:
            lines.append(f"shape mismatch: {head(shape_errors)}"
                         + ("; for another class count give --num-classes" if any("head." in e for e in
                                                                               shape_errors) else ""))
        if required:
            lines.append(f"missing keys: {head(required)}")
        if unexpected:
            lines.append(f"unexpected keys: {head(unexpected)}")
        raise ValueError(f"checkpoint {path} does not fit {type(model).__name__}: " + "; ".join(lines))
    return missing


def load_checkpoint(model: torch.nn.Module, path: str | Path, strict: bool = True) -> torch.nn.Module:
    """Load ``path`` into ``model`` (weights cast to the model's dtype; a square ``pos_embed`` grid resampled to the
    model's). Raises ``ValueError`` naming the missing, unexpected and mis-shaped keys instead of loading a partial
    model."""
    state = read_state_dict(path)
    _resample_pos_embed(model, state)
    load_state(model, state, path, strict=strict)
    return model


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path,
               optional: tuple[str, ...] = (), strict: bool = True) -> list[str]:
    """:func:`check_state_dict`, then load ``state`` cast to the model's dtypes. Returns the missing keys."""
    missing = check_state_dict(model, state, path, optional, strict)
    own = model.state_dict()
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items() if k in own}, strict=False)
    return missing


def _resample_pos_embed(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Fine-tuning at another resolution (as DeiT does at 384 px): interpolate a checkpoint's square
    ``pos_embed`` grid to the model's, in place."""
    pos, own = state.get("pos_embed"), getattr(model, "pos_embed", None)
    if pos is None or not isinstance(own, torch.Tensor) or pos.shape == own.shape or pos.ndim != 3:
        return
    prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
    side = math.isqrt(pos.shape[1] - prefix)
    if side * side != pos.shape[1] - prefix or pos.shape[2] != own.shape[2]:
        return  # not a square grid of the same width: reported as a shape mismatch
    state["pos_embed"] = resample_abs_pos_embed(pos.float(), list(model.patch_embed.grid_size), (side, side),
                                                num_prefix_tokens=prefix).to(pos.dtype)


def load_model_plugins() -> list[str]:
    """Import the modules registered under the ``vitbench.models`` entry-point group that are not imported yet (they
    register their models with timm). Returns the entry-point values imported by this call. A plugin that fails to
    import is reported with a warning naming it and skipped (its models then stay unknown)."""
    loaded = []
    for ep in entry_points(group=PLUGIN_GROUP):
        if ep.value in LOADED_PLUGINS:
            continue
        LOADED_PLUGINS.add(ep.value)
        try:
            ep.load()
        except Exception as e:  # any error of a third-party import: report it, keep the other plugins
            warnings.warn(f"{PLUGIN_GROUP} plugin {ep.name} = {ep.value!r} failed to import "
                          f"({type(e).__name__}: {e}); its models are not registered", stacklevel=2)
            continue
        loaded.append(ep.value)
    return loaded


def is_model(name: str) -> bool:
    """``timm.is_model``, after importing the ``vitbench.models`` plugins when timm does not know ``name`` yet."""
    if timm.is_model(name):
        return True
    return bool(load_model_plugins()) and timm.is_model(name)


def check_model_name(name: str) -> None:
    """Refuse a name neither timm nor a ``vitbench.models`` plugin knows (``ValueError``), before any weights are
    looked for."""
    if not is_model(name):
        raise ValueError(f"unknown model {name!r}; see timm.list_models() or `{EMBEDDED_MODEL}`")


def create_model(name: str, pretrained: bool = False, checkpoint: str | Path | None = None, **kwargs):
    """``timm.create_model`` plus an optional local checkpoint (``.safetensors`` / ``.pth``). An unknown name or
    pretrained weights that cannot be downloaded raise one clear error (suggesting ``--checkpoint``)."""
    check_model_name(name)
    try:
        model = timm.create_model(name, pretrained=pretrained and checkpoint is None, **kwargs)
    except (OSError, ValueError) as e:
        if not pretrained:
            raise
        why = shorten(str(e), 160, placeholder=" ...")  # whole words: the message is read, not parsed
        raise OSError(f"could not fetch pretrained weights for {name} ({type(e).__name__}: {why}); "
                      "without the Hub pass --checkpoint PATH (set HF_HUB_OFFLINE=1 to fail fast)") from None
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model


def save_weights(model: torch.nn.Module, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write the model's state dict as safetensors, atomically (optionally cast, e.g. to fp16 for shipping)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
             for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)  # safetensors creates the file owner-only; give it the usual permissions
    tmp.replace(path)
    return path
