"""Method-vs-dense speed comparisons shared by the packages' benchmarks (``packages/*/benchmarks``, ``nox -s bench``).

A benchmark builds a dense ViT and its method(s) on a copy of the same weights, then calls :func:`compare_methods`
once per batch size. Every callable (dense, ``torch.compile``d dense, each method eager and compiled) runs over the
same pool of images, ``batch_size`` images per forward, interleaved in one process (:func:`vitbench.throughput.compare`:
rotated order; speed-ups are ratios of median times, :data:`vitbench.throughput.LEGEND`). A row per callable gives
the speed-up over eager dense and over compiled dense, the method's ideal speed-up (dense GMACs / its mean GMACs on
the pool), their ratios and the host syncs of one forward. At batch 1 the pool holds :data:`MIN_IMAGES` images, so
that a method whose cost depends on the image (ATS, LF-ViT's early exit) is timed on a mix. Every model of a
comparison, dense and released code included, goes through :func:`laid_out`: by default its linear weights are stored
transposed (``--weight-layout``), so that all of them run the GEMM kernel that is fastest on CPU at small token counts
and none is favoured.

The compiled models are compiled once per batch size and reused by every repeat (``dynamic=False``: batch 1 and 32 get
their own static graph); inductor's on-disk cache makes a second benchmark process reuse what the first compiled.

``python -m vitbench.bench runs/bench/*.json`` prints the rows of several benchmark files as one table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import timm
import torch

from .cli import check_writable_file, run
from .outputs import check_own_json, has_keys
from .report import markdown_table, write_json
from .syncs import count_syncs
from .throughput import CLOCKS, LEGEND, compare, transpose_linear_weights, warn_if_loaded

MIN_IMAGES = 9  # at batch 1, nine forwards (LF-ViT: 2 of 9 = 22 % reach the focus stage)
# What every benchmark's --json holds (report): an existing file without these keys is another command's (an
# evaluation's results.json has no "benchmark") and never replaced, nor is another benchmark's.
OWN_JSON = has_keys("benchmark", "config", "environment", "rows")
COMPILE_CHOICES = ("none", "dense", "all")
WEIGHT_LAYOUTS = ("transposed", "timm")
COLUMNS = ["name", "batch_size", "ms_per_image", "speedup", "speedup_vs_compiled", "gmacs", "ideal_speedup",
           "fraction_of_ideal", "fraction_of_ideal_vs_compiled", "syncs", "vs_released", "vs_released_per_image",
           "vs_released_compiled"]  # a column is printed only when some row has it (gmacs: per image, optional)


@dataclass(frozen=True)
class Method:
    """A method timed against dense: ``fn(images) -> logits`` on one batch, ``ideal`` = dense GMACs / the method's
    mean GMACs per image on the pool, ``compiled`` its ``torch.compile``d form (``None``: not compiled)."""

    fn: Callable[[torch.Tensor], Any]
    ideal: float
    compiled: Callable[[torch.Tensor], Any] | None = None


@dataclass(frozen=True)
class BenchConfig:
    batch_sizes: tuple[int, ...] = (1, 32)
    compile: str = "dense"
    peak: float = 4.0
    weight_layout: str = "transposed"
    warmup: int = 1
    repeats: int = 5
    threads: int = 1
    clock: str = "thread"
    seed: int = 0
    json: str = ""
    benchmark: str = ""  # its name in the JSON and the table


def add_arguments(parser: argparse.ArgumentParser, json_default: str, **defaults: Any) -> None:
    """The flags every benchmark shares (read back with :func:`config`); ``defaults`` override
    :class:`BenchConfig`'s (e.g. ``compile="none"`` for a benchmark that would otherwise take long)."""
    d = BenchConfig(**defaults)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(d.batch_sizes),
                        help="images per forward, each timed on its own (default: 1 32); at batch 1 the pool holds "
                        f"{MIN_IMAGES} images")
    parser.add_argument("--compile", choices=COMPILE_CHOICES, default=d.compile,
                        help="what else to time torch.compile'd (inductor): dense only, or dense and every method "
                        f"(default: {d.compile}; 'all' adds several minutes of compiling per batch size on 2 cores)")
    parser.add_argument("--peak", type=float, default=d.peak,
                        help=f"scale of the random q/k projections, so attention is peaked (default: {d.peak:g})")
    parser.add_argument("--weight-layout", choices=WEIGHT_LAYOUTS, default=d.weight_layout,
                        help="how every timed model, dense and released code included, stores its linear weights: "
                        "transposed (column-major, vitbench.throughput.transpose_linear_weights: same values, a plain "
                        "NN GEMM, faster on CPU at the small token counts of batch 1) or timm's row-major layout "
                        f"(default: {d.weight_layout})")
    parser.add_argument("--warmup", type=int, default=d.warmup, help=f"untimed rounds (default: {d.warmup})")
    parser.add_argument("--repeats", type=int, default=d.repeats, help=f"timed rounds (default: {d.repeats})")
    parser.add_argument("--threads", type=int, default=d.threads,
                        help="torch intra-op threads, 0: torch's default (default: 1; on a shared CPU every "
                        "multi-threaded op waits for descheduled workers)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default=d.clock,
                        help="thread: CPU time of the timing thread, needs --threads 1 and is not inflated by other "
                        "processes; wall: elapsed time (default: thread)")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"weights and images seed (default: {d.seed})")
    parser.add_argument("--json", default=json_default, help=f"where to write the results (default: {json_default})")


def config(args: argparse.Namespace, benchmark: str) -> BenchConfig:
    """Checked :class:`BenchConfig` of the benchmark named ``benchmark`` from :func:`add_arguments`' flags
    (``ValueError`` on bad values, or on a ``--json`` file that is not an earlier result of this benchmark); sets the
    thread count."""
    if min(args.batch_sizes) < 1 or args.repeats < 1 or args.warmup < 0 or args.peak <= 0 or args.threads < 0:
        raise ValueError("--batch-sizes, --repeats and --peak must be positive, --warmup and --threads >= 0")
    if args.clock == "thread" and args.threads != 1:
        raise ValueError("--clock thread measures one thread's CPU time: use it with --threads 1")
    check_writable_file(args.json)
    check_own_json(args.json, lambda data: OWN_JSON(data) and data["benchmark"] == benchmark)
    if args.threads:
        torch.set_num_threads(args.threads)
    return BenchConfig(tuple(args.batch_sizes), args.compile, args.peak, args.weight_layout, args.warmup, args.repeats,
                       args.threads, args.clock, args.seed, args.json, benchmark)


def peaked(model: torch.nn.Module, peak: float) -> torch.nn.Module:
    """Scale the q and k projections of every block's attention (and temporal attention, in a video block) by
    ``peak`` (attention logits by ``peak**2``), in place, so that random weights give peaked attention as trained
    weights do; eval mode."""
    with torch.no_grad():
        for blk in model.blocks:
            for attn in (blk.attn, getattr(blk, "temporal_attn", None)):
                if attn is not None:
                    attn.qkv.weight[: 2 * attn.attn_dim] *= peak
    return model.eval()


def laid_out(model: torch.nn.Module | None, cfg: BenchConfig) -> torch.nn.Module | None:
    """``model`` with its linear weights in ``cfg.weight_layout`` (in place; ``None``, e.g. no released checkout, passes
    through): every model of a comparison goes through this, so that all of them run the same GEMM kernels."""
    return transpose_linear_weights(model) if model is not None and cfg.weight_layout == "transposed" else model


def pool_size(batch_size: int) -> int:
    """Images per timed round: ``batch_size`` rounded up to at least :data:`MIN_IMAGES`."""
    return batch_size * math.ceil(MIN_IMAGES / batch_size)


def images(batch_size: int, img_size: int, seed: int) -> torch.Tensor:
    """The pool of random images timed at ``batch_size``."""
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randn(pool_size(batch_size), 3, img_size, img_size, generator=gen)


def compile_dense(model: torch.nn.Module) -> Callable[[torch.Tensor], Any]:
    """The compiled baseline: one static graph per batch size."""
    return torch.compile(model, fullgraph=True, dynamic=False)


def _batched(fn: Callable[[torch.Tensor], Any], batch_size: int) -> Callable[[torch.Tensor], Any]:
    return lambda pool: [fn(chunk) for chunk in pool.split(batch_size)]


def compare_methods(dense: Callable[[torch.Tensor], Any], methods: dict[str, Method], pool: torch.Tensor,
                    batch_size: int, cfg: BenchConfig, dense_compiled: Callable[[torch.Tensor], Any] | None = None,
                    extra: dict[str, Callable[[torch.Tensor], Any]] | None = None) -> list[dict]:
    """Time dense, ``dense_compiled``, every method (and its compiled form when ``cfg.compile == "all"``) and the
    ``extra`` callables (e.g. a released implementation) over ``pool``, ``batch_size`` images per forward.

    Rows of :func:`vitbench.throughput.compare` (``median_ms``: one round over the pool) plus ``ms_per_image``,
    ``speedup_vs_compiled`` (compiled dense's median time / this row's), ``ideal_speedup``, ``fraction_of_ideal``
    (= speedup / ideal), ``fraction_of_ideal_vs_compiled``, ``compiled`` and ``syncs`` (host syncs of one forward of
    ``batch_size`` images)."""
    fns: dict[str, Callable[[torch.Tensor], Any]] = {"dense": dense}
    if dense_compiled is not None:
        fns["dense (compiled)"] = dense_compiled
    ideal = {}
    for name, m in methods.items():
        fns[name], ideal[name] = m.fn, m.ideal
        if cfg.compile == "all" and m.compiled is not None:
            fns[f"{name} (compiled)"], ideal[f"{name} (compiled)"] = m.compiled, m.ideal
    fns.update(extra or {})
    rows = compare({n: _batched(f, batch_size) for n, f in fns.items()}, pool, baseline="dense", warmup=cfg.warmup,
                   repeats=cfg.repeats, clock=cfg.clock)
    times = {r["name"]: r["times_ms"] for r in rows}
    for row in rows:
        row["batch_size"], row["images_per_round"] = batch_size, pool.shape[0]
        row["ms_per_image"] = row["median_ms"] / pool.shape[0]
        row["compiled"] = row["name"].endswith("(compiled)")
        row["syncs"] = count_syncs(fns[row["name"]], pool[:batch_size])["total"]
        if dense_compiled is not None:
            row["speedup_vs_compiled"] = median_ratio(times["dense (compiled)"], row["times_ms"])
        if row["name"] in ideal:
            row["ideal_speedup"] = ideal[row["name"]]
            row["fraction_of_ideal"] = row["speedup"] / ideal[row["name"]]
            if dense_compiled is not None:
                row["fraction_of_ideal_vs_compiled"] = row["speedup_vs_compiled"] / ideal[row["name"]]
    return rows


def add_released_argument(parser: argparse.ArgumentParser, repository: str, env: str) -> None:
    """``--released PATH``: a checkout of the released code, timed beside the methods (default ``$env``)."""
    parser.add_argument("--released", default=os.environ.get(env), metavar="PATH",
                        help=f"checkout of {repository}, imported from there at run time and timed on the same "
                        f"weights (default: ${env}; without it that row is skipped)")


def released_path(path: str | None, marker: str) -> Path | None:
    """The ``--released`` checkout, ``None`` when none is given; ``ValueError`` when ``path/marker`` is missing."""
    if path is None:
        return None
    if not (Path(path) / marker).is_file():
        raise ValueError(f"--released {path}: no {marker} there (give a checkout of the released repository)")
    return Path(path)


def median_ratio(reference_ms: Sequence[float], times_ms: Sequence[float]) -> float:
    """How many times faster ``times_ms`` is than ``reference_ms``: the ratio of their medians (as ``speedup``)."""
    return statistics.median(reference_ms) / statistics.median(times_ms)


def speedups_over(rows: list[dict], reference: str, key: str, prefix: str) -> None:
    """Set ``row[key]``, the speed-up over the row ``reference`` (ratio of median times), on every row whose name starts
    with ``prefix`` (in place; rows of one :func:`compare_methods` call; nothing when ``reference`` was not timed)."""
    ref = next((r for r in rows if r["name"] == reference), None)
    if ref is None:
        return
    for row in rows:
        if row["name"].startswith(prefix):
            row[key] = median_ratio(ref["times_ms"], row["times_ms"])


def environment(cfg: BenchConfig) -> dict:
    """What the figures depend on: threads, clock, versions, CPU and the load average while they were taken."""

    return {"threads": torch.get_num_threads(), "clock": cfg.clock, "torch": torch.__version__,
            "timm": timm.__version__, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "loadavg": os.getloadavg()}


def report(rows: list[dict], cfg: BenchConfig, **extra: Any) -> None:
    """Print the table and write ``{"benchmark", "config", "environment", "rows", **extra}`` to ``cfg.json``."""
    benchmark, env = cfg.benchmark, environment(cfg)
    write_json(cfg.json, {"benchmark": benchmark, "config": asdict(cfg), "environment": env, "rows": rows, **extra})
    print(markdown_table(rows, [c for c in COLUMNS if any(c in r for r in rows)], digits=3))
    print(f"speedup*: the reference's median time / this row's; {LEGEND.split('; ')[-1]}")
    print(f"{benchmark}: {env['threads']} thread(s), {cfg.clock} clock, load average {env['loadavg'][0]:.1f} "
          f"on {env['cores']} cores, torch {env['torch']}; JSON: {cfg.json}")
    warn_if_loaded(env["loadavg"], env["cores"])


def summary(paths: Sequence[str | os.PathLike]) -> str:
    """One Markdown table of the rows of several :func:`report` files."""
    rows = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        if "benchmark" not in data:
            raise ValueError(f"{path}: not a benchmark result (no 'benchmark' key)")
        rows += [{"benchmark": data["benchmark"], **r} for r in data["rows"]]
    return markdown_table(rows, ["benchmark", *(c for c in COLUMNS if any(c in r for r in rows))], digits=3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vitbench.bench",
                                description="Print the rows of several benchmark JSON files as one table.")
    p.add_argument("paths", nargs="+", help="benchmark JSON files (e.g. runs/bench/*.json)")
    return run(p, lambda args: print(summary(args.paths)), argv)


if __name__ == "__main__":
    sys.exit(main())
