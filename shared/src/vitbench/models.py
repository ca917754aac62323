"""The embedded backbone (a timm-registered ViT with the papers' token geometry) and checkpoint loading."""

from __future__ import annotations

import math
from pathlib import Path

import timm
import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

WEIGHTS_DIR = Path(__file__).parent / "weights"
DIGITS_MEAN = (0.5, 0.5, 0.5)
DIGITS_STD = (0.5, 0.5, 0.5)
EMBEDDED_WEIGHTS = WEIGHTS_DIR / "vit_digits_patch8_112.safetensors"

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
    """Read a state dict from ``.safetensors`` or a torch file, unwrapping ``{'model': ...}`` (DeiT),
    ``{'state_dict': ...}`` / ``{'model_state': ...}`` layouts and ``module.`` prefixes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{path} is not a valid safetensors file: {e}") from e
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path} could not be read as a torch checkpoint: {e}") from e
        for key in ("model", "state_dict", "model_state"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_checkpoint(model: torch.nn.Module, path: str | Path, strict: bool = True) -> torch.nn.Module:
    """Load ``path`` into ``model`` (weights cast to the model's dtype). Raises ``ValueError`` naming the missing,
    unexpected and mis-shaped keys instead of loading a partial model."""
    state = read_state_dict(path)
    own = model.state_dict()
    _resample_pos_embed(model, state)
    shape_errors = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                    for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if shape_errors or (strict and (missing or unexpected)):
        def head(keys):
            return ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")
        lines = [f"checkpoint {path} does not fit {type(model).__name__}:"]
        if shape_errors:
            lines.append(f"  shape mismatch: {head(shape_errors)}")
        if missing:
            lines.append(f"  missing keys: {head(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys: {head(unexpected)}")
        raise ValueError("\n".join(lines))
    state = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}
    model.load_state_dict(state, strict=strict)
    return model


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
    from timm.layers import resample_abs_pos_embed

    state["pos_embed"] = resample_abs_pos_embed(pos.float(), list(model.patch_embed.grid_size), (side, side),
                                                num_prefix_tokens=prefix).to(pos.dtype)


def create_model(name: str, pretrained: bool = False, checkpoint: str | Path | None = None, **kwargs):
    """``timm.create_model`` plus an optional local checkpoint (``.safetensors`` / ``.pth``)."""
    try:
        model = timm.create_model(name, pretrained=pretrained and checkpoint is None, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(f"unknown model {name!r}; see timm.list_models() or `vit_digits_patch8_112`") from e
        raise
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model


def save_weights(model: torch.nn.Module, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write the model's state dict as safetensors, atomically (optionally cast, e.g. to fp16 for shipping)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
             for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(path)
    return path
