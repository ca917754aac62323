"""FLOPs of the video transformers (GMACs, the papers' convention) per view and per 1 x 3 views, dense or from the
per-clip token masks that ATS records, and the data-free ``ats-video-flops`` command.

Counting follows :mod:`vitbench.flops` (fvcore's conventions): linear and matmul MACs, LayerNorm at 5 per element,
softmax/GELU/additions free. A view is one clip; Tables 2 and 3 of the ATS paper report 1 temporal x 3 spatial
views, i.e. 3 x the per-view count.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import Tensor
from vitbench.cli import check_writable_file, run
from vitbench.flops import block_macs, layernorm_macs, linear_macs
from vitbench.report import markdown_table, write_json

from ..paper import VIDEO_GFLOPS
from .models import VIDEO_MODELS, VideoTransformer

VIEWS = 3  # 1 temporal clip x 3 spatial crops


@dataclass(frozen=True)
class VideoGeometry:
    """What the FLOPs of a TimeSformer or X-ViT depend on."""

    arch: str
    dim: int
    depth: int
    mlp_ratio: float
    patch_size: int
    in_chans: int
    num_classes: int
    frames: int
    grid: tuple[int, int]
    head_hidden: int = 0  # X-ViT consensus MLP width

    @property
    def patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @classmethod
    def from_model(cls, model: VideoTransformer) -> VideoGeometry:
        head_hidden = model.consensus.mlp_head[1].out_features if model.arch == "xvit" else 0
        mlp_ratio = model.blocks[0].mlp.fc1.out_features / model.embed_dim
        return cls(model.arch, model.embed_dim, len(model.blocks), mlp_ratio, model.patch_embed.patch_size[0],
                   model.patch_embed.proj.in_channels, model.num_classes, model.num_frames, tuple(model.grid),
                   head_hidden)

    @classmethod
    def of(cls, name: str) -> VideoGeometry:
        """The geometry of a registered name, without building the model."""
        if name not in VIDEO_MODELS:
            raise ValueError(f"unknown video model {name!r}; choose from {sorted(VIDEO_MODELS)}")
        model_cls, kw, _ = VIDEO_MODELS[name]
        g = kw["img_size"] // kw.get("patch_size", 16)
        dim = kw.get("embed_dim", 768)
        return cls(model_cls.arch, dim, kw.get("depth", 12), kw.get("mlp_ratio", 4.0), kw.get("patch_size", 16),
                   kw.get("in_chans", 3), kw.get("num_classes", 400), kw["num_frames"], (g, g),
                   dim if model_cls.arch == "xvit" else 0)


def _timesformer_block(g: VideoGeometry, n_in: Tensor, n_out: Tensor, m: Tensor, sampled: bool, ln) -> Tensor:
    """One divided space-time block. ``n_in``/``n_out`` ``[B, T]`` patches per frame entering/leaving,
    ``m`` ``[B, S]`` frames alive per patch position. Temporal attention on the ``n_in`` patches; spatial
    attention per frame on ``n_in + 1`` tokens (the CLS copy); MLP on the ``n_out`` patches + one CLS.
    An ATS stage computes the CLS score row plus the kept queries' rows and ``A V`` for those only."""
    C, T = g.dim, g.frames
    p_in, p_out = n_in.sum(-1), n_out.sum(-1)
    temporal = (ln(p_in, C) + linear_macs(p_in, C, 3 * C) + 2 * (m**2).sum(-1) * C
                + 2 * linear_macs(p_in, C, C))  # qkv, QK^T + AV, proj + temporal_fc
    frame_in = n_in + 1
    rows = (n_out + 2) if sampled else frame_in  # score row + kept queries (CLS among them)
    kept = (n_out + 1) if sampled else frame_in
    spatial = (ln(p_in + T, C) + linear_macs(p_in + T, C, 3 * C) + (rows * frame_in).sum(-1) * C
               + (kept * frame_in).sum(-1) * C + linear_macs(kept.sum(-1), C, C))
    mlp = ln(p_out + 1, C) + 2 * linear_macs(p_out + 1, C, g.mlp_ratio * C)
    return temporal + spatial + mlp


def clip_gmacs(g: VideoGeometry, alive: list[Tensor] | None = None, sampled: set[int] = frozenset(),
               layernorm: bool = True) -> Tensor:
    """``[B]`` GMACs of one view per clip. ``alive[i]`` ``[B, T, S]`` is block i's input mask and
    ``alive[depth]`` the output mask (None: dense, one clip); ``sampled`` the blocks that ran ATS.
    An X-ViT block is a ViT block per frame on ``n + 1`` tokens (the channel shift is free)."""
    if alive is None:
        alive = [torch.ones(1, g.frames, g.patches, dtype=torch.bool)] * (g.depth + 1)
    if len(alive) != g.depth + 1:
        raise ValueError(f"need {g.depth + 1} masks (block inputs and the output), got {len(alive)}")
    C, T = g.dim, g.frames

    def ln(n, dim):
        return layernorm_macs(n, dim) if layernorm else 0.0

    macs = torch.full((alive[0].shape[0],), float(T * g.patches * g.patch_size**2 * g.in_chans * C),
                      dtype=torch.float64, device=alive[0].device)
    for i in range(g.depth):
        n_in, n_out = (a.sum(-1).double() for a in (alive[i], alive[i + 1]))
        if g.arch == "timesformer":
            macs += _timesformer_block(g, n_in, n_out, alive[i].sum(1).double(), i in sampled, ln)
        else:
            a, b = n_in + 1, n_out + 1
            macs += block_macs(C, a, b, b + 1 if i in sampled else a, g.mlp_ratio, layernorm).sum(-1)
    last = alive[-1].sum((1, 2)).double()
    if g.arch == "timesformer":
        return (macs + ln(last + 1, C) + C * g.num_classes) / 1e9  # the released norm runs on every token
    macs += ln(last + T, C) + block_macs(C, T + 1, mlp_ratio=4.0, layernorm=layernorm)  # consensus block
    return (macs + ln(1, C) + C * g.head_hidden + g.head_hidden * g.num_classes) / 1e9


def recorded_gmacs(model: VideoTransformer, layernorm: bool = True) -> Tensor:
    """``[B]`` GMACs per clip of the last forward of an ATS-patched model (:mod:`ats.video.patch`)."""
    info = model.record
    return clip_gmacs(VideoGeometry.from_model(model), info.alive, set(info.config.stages), layernorm)


def dense_gmacs(name: str, layernorm: bool = True) -> float:
    """Dense GMACs of one view of a registered video model (no data, no weights)."""
    return float(clip_gmacs(VideoGeometry.of(name), layernorm=layernorm)[0])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ats-video-flops",
        description="Dense GFLOPs (= GMACs, the papers' convention) of the video backbones per view and per "
        "1 x 3 views (the ATS paper's Tables 2 and 3), counted analytically: no data, no weights.",
    )
    p.add_argument("--model", action="append", choices=sorted(VIDEO_MODELS), default=None,
                   help="registered video model (repeatable; default: every Kinetics configuration)")
    p.add_argument("--no-layernorm", action="store_true", help="do not count LayerNorm (5 MACs per element)")
    p.add_argument("--json", default=None, help="write the rows to this JSON file (default: none)")
    return p


def rows(names: list[str], layernorm: bool = True) -> list[dict]:
    out = []
    for name in names:
        g = VideoGeometry.of(name)
        view = dense_gmacs(name, layernorm)
        table, paper = VIDEO_GFLOPS.get(name, ("", None))
        cls_tokens = 1 if g.arch == "timesformer" else g.frames
        out.append({"model": name, "frames": g.frames, "img_size": g.grid[0] * g.patch_size,
                    "tokens_per_view": cls_tokens + g.frames * g.patches, "gflops_view": view,
                    "gflops_1x3": VIEWS * view,
                    "paper_1x3": paper, "paper_table": table,
                    "diff_pct": None if paper is None else 100 * (VIEWS * view - paper) / paper})
    return out


def command(args: argparse.Namespace) -> int:
    if args.json:
        check_writable_file(args.json)
    names = args.model or [n for n in VIDEO_MODELS if "digits" not in n]
    result = rows(names, not args.no_layernorm)
    print(markdown_table(result, ["model", "frames", "img_size", "tokens_per_view", "gflops_view", "gflops_1x3",
                                  "paper_table", "paper_1x3", "diff_pct"], digits=1))
    if args.json:
        write_json(args.json, {"layernorm": not args.no_layernorm, "views": VIEWS, "rows": result})
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
