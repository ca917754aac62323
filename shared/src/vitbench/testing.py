"""Helpers behind the test fixtures of vitbench and the method packages (tiny models, tiny image folders, the
checks every ``*-eval`` test makes). Not used by library code."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

from .cli import parse
from .evaluation import add_eval_args, validate_result


def spread_weights(model: torch.nn.Module, seed: int = 0, keep: tuple[str, ...] = ()) -> torch.nn.Module:
    """Seeded weights with enough spread that every part matters, set in name order from one generator: BatchNorm
    running variances in [0.5, 1.5), other vectors (norm affines, biases, running means) N(1 or 0, 0.3), matrices and
    kernels at their fan-in scale. ``num_batches_tracked`` and the tensors named in ``keep`` stay as they are.
    Returns ``model`` in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in sorted([*model.named_parameters(), *model.named_buffers()]):
            if name.endswith("num_batches_tracked") or name in keep:
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.dim() == 1:
                t.copy_(torch.randn(t.shape, generator=g) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
            else:
                t.copy_(torch.randn(t.shape, generator=g) * t[0].numel() ** -0.5)
    return model.eval()


def tiny_vit(img_size: int = 56, patch_size: int = 8, peak: float | None = 4.0, seed: int | None = 0, **kw):
    """A depth-12 timm ViT with a CLS token (embed 32, 2 heads, 10 classes) that runs in milliseconds (patch 8:
    56 px -> 7 x 7 grid, 112 px -> 14 x 14; patch 4 at 56 px: the papers' 14 x 14). ``peak`` spreads every
    parameter a little and sharpens the attention (scales the q/k weights), for token-selection tests; ``None``
    keeps timm's init. ``seed`` seeds the initialisation (``None``: the caller's RNG state)."""
    if seed is not None:
        torch.manual_seed(seed)
    cfg = dict(img_size=img_size, patch_size=patch_size, embed_dim=32, depth=12, num_heads=2, num_classes=10)
    model = VisionTransformer(**{**cfg, **kw}).eval()
    if peak is not None:
        with torch.no_grad():  # timm's init leaves biases/norms trivial; give every parameter some spread
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
            for blk in model.blocks:
                blk.attn.qkv.weight[: 2 * blk.attn.attn_dim] *= peak
    return model


def image_folder(root: Path, classes: int = 3, per_class: int = 2, size: int = 40, val_per_class: int | None = None,
                 coloured: bool = False) -> Path:
    """A tiny ImageNet-layout folder (``train/`` and ``val/``, ``classes`` classes of ``per_class`` training and
    ``val_per_class`` (default ``per_class``) validation images): random RGB, or with ``coloured`` one grey level per
    class plus a little noise, so a model can learn the classes in a few updates."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", per_class if val_per_class is None else val_per_class)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                if coloured:
                    noise = rng.integers(0, 30, (size, size, 3), np.uint8)
                    pixels = np.full((size, size, 3), 60 * c + 40, np.uint8) + noise
                else:
                    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def common_eval_options(parser: argparse.ArgumentParser) -> dict:
    """``{dest: (flags, default, help)}`` of the common evaluation flags in ``parser`` (``--output-dir``'s default
    left out: each package names its own folder)."""
    common = {a.dest for a in add_eval_args(argparse.ArgumentParser())._actions if a.dest != "help"}
    return {a.dest: (tuple(a.option_strings), None if a.dest == "output_dir" else a.default, a.help)
            for a in parser._actions if a.dest in common}


def read_valid_result(path: Path) -> dict:
    """A results JSON, checked against the one schema (:func:`vitbench.evaluation.validate_result`)."""
    result = json.loads(Path(path).read_text())
    validate_result(result)
    return result


def result_rows(main, tmp_path: Path, *argv: str) -> list[dict]:
    """The rows of an evaluation ``main([*argv, "--json", ..., "--output-dir", ...])`` into ``tmp_path``, which must
    exit 0, its JSON checked against the one schema (:func:`read_valid_result`)."""
    out = tmp_path / "r.json"
    assert main([*argv, "--json", str(out), "--output-dir", str(tmp_path / "o")]) == 0
    return read_valid_result(out)["rows"]


def one_line_error(main, argv: list[str], capsys, match: str) -> str:
    """Run a CLI ``main(argv)`` that must fail with exactly one ``prog: error: ...`` line (exit 2) containing
    ``match``; returns that line."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert match in lines[0], lines[0]
    return lines[0]


def exit_code(main, argv: list[str]) -> int | str | None:
    """A CLI ``main(argv)``'s exit code, also when argparse exits (a flag refused at parse time)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def run_script(prog: str, argv: list[str], capsys) -> tuple[int | str | None, str]:
    """The installed console script ``prog`` run in-process on ``argv``: its exit code (:func:`exit_code`) and what
    it printed on stderr."""
    (entry,) = importlib.metadata.entry_points(group="console_scripts", name=prog)
    capsys.readouterr()
    code = exit_code(entry.load(), argv)
    return code, capsys.readouterr().err


def error_line(err: str, prog: str) -> str:
    """The one ``prog: error: ...`` line of ``err`` (asserted: exactly one, no traceback)."""
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def parse_fails(parser: argparse.ArgumentParser, argv: list[str], capsys) -> str:
    """The one ``error:`` line of :func:`vitbench.cli.parse` refusing ``argv`` (asserted: exit 2, one line)."""
    try:
        parse(parser, argv)
    except SystemExit as e:
        assert e.code == 2, e.code
    else:
        raise AssertionError(f"{argv} was accepted")
    lines = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(lines) == 1
    return lines[0]


def compile_backends() -> list:
    """``torch.compile`` backends for compiled-equals-eager tests: ``aot_eager`` always (graph capture: fullgraph,
    guards, dynamic shapes); inductor (code generation, minutes on 2 cores) with ``VITBENCH_INDUCTOR_TESTS=1``."""
    import pytest  # deferred: only the test suites have pytest; the other helpers work without it

    inductor = pytest.mark.skipif(os.environ.get("VITBENCH_INDUCTOR_TESTS") != "1",
                                  reason="inductor compile takes minutes on 2 cores; set VITBENCH_INDUCTOR_TESTS=1")
    return ["aot_eager", pytest.param("inductor", marks=inductor)]
