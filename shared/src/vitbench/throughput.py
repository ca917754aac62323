"""Model-only throughput: fixed batch, warm-up, synchronised timing (CUDA only), median of repeats.

:func:`compare` interleaves several models in one process (round-robin per repeat), so slow drifts of a shared
machine hit every model alike, and reports img/s and the ratio to a named baseline.

``clock="wall"`` (default) times with ``time.perf_counter``. ``clock="thread"`` times with the calling thread's CPU
time: with a single intra-op thread (``torch.set_num_threads(1)``) all the work runs on that thread, and other
processes on a shared CPU do not inflate it as they inflate wall-clock time. CPU only.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable, Mapping

import torch


@dataclass(frozen=True)
class Timing:
    name: str
    batch_size: int
    median_s: float
    min_s: float
    repeats: int

    @property
    def img_s(self) -> float:
        return self.batch_size / self.median_s


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _context(device: torch.device, amp: bool):
    if not amp:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def compare(fns: Mapping[str, Callable[[torch.Tensor], Any]], inputs: torch.Tensor, baseline: str | None = None,
            warmup: int = 3, repeats: int = 10, amp: bool = False, clock: str | Callable[[], float] = "wall",
            inference: bool = True) -> list[dict]:
    """Time every ``fns[name](inputs)`` ``repeats`` times, interleaved, the order rotated by one each repeat (so no
    model always runs first or right after the same neighbour); rows of name, batch, median ms, img/s, ``speedup``
    (the median over repeats of the baseline's time / this model's time in that repeat; default baseline the first
    entry) and ``speedup_spread`` ([min, max] of those per-repeat ratios). ``clock`` is ``"wall"``, ``"thread"`` or
    a callable returning seconds (a fake clock in tests). ``inference=False`` keeps autograd on, for timing
    training steps."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    if callable(clock):
        now, clock_name = clock, getattr(clock, "__name__", "custom")
    elif clock in CLOCKS:
        now, clock_name = CLOCKS[clock], clock
    else:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)} or a callable, got {clock!r}")
    if clock == "thread" and (inputs.device.type != "cpu" or torch.get_num_threads() != 1):
        raise ValueError("clock='thread' measures the CPU work of one thread: needs a CPU tensor and "
                         "torch.set_num_threads(1)")
    if not fns:
        raise ValueError("nothing to time")
    baseline = baseline or next(iter(fns))
    if baseline not in fns:
        raise ValueError(f"baseline {baseline!r} is not among {list(fns)}")
    device = inputs.device
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode(inference), _context(device, amp):
        for _ in range(warmup):
            for fn in fns.values():
                fn(inputs)
        _sync(device)
        for r in range(repeats):
            for name in names[r % len(names):] + names[: r % len(names)]:
                _sync(device)
                start = now()
                fns[name](inputs)
                _sync(device)
                times[name].append(now() - start)
    base = times[baseline]
    rows = []
    for name in names:
        t = Timing(name, inputs.shape[0], statistics.median(times[name]), min(times[name]), repeats)
        ratios = [b / x for b, x in zip(base, times[name])]
        rows.append({"name": name, "batch_size": t.batch_size, "median_ms": 1e3 * t.median_s,
                     "min_ms": 1e3 * t.min_s, "img_s": t.img_s, "speedup": statistics.median(ratios),
                     "speedup_spread": [min(ratios), max(ratios)], "device": str(device), "amp": amp,
                     "clock": clock_name})
    return rows


def measure(fn: Callable[[torch.Tensor], Any], inputs: torch.Tensor, warmup: int = 3, repeats: int = 10,
            amp: bool = False, clock: str = "wall") -> dict:
    """Throughput of one callable (see :func:`compare`)."""
    return compare({"model": fn}, inputs, warmup=warmup, repeats=repeats, amp=amp, clock=clock)[0]


def prepare_model(model: torch.nn.Module, device: torch.device, channels_last: bool = False,
                  compile: bool = False) -> Callable[[torch.Tensor], Any]:
    """Eval mode on ``device``, optionally channels-last and ``torch.compile``d."""
    model = model.eval().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if compile else model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vitbench-throughput",
        description="Side-by-side model-only throughput of timm models in one process (random weights).",
    )
    p.add_argument("--models", nargs="+", default=["deit_small_patch16_224"], help="timm model names")
    p.add_argument("--baseline", default=None, help="model the speedups refer to (default: the first)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true", help="autocast (fp16 on CUDA, bf16 on CPU)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall: elapsed time; thread: CPU time of the calling thread (CPU, sets 1 intra-op thread)")
    p.add_argument("--json", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    import timm

    from . import models  # noqa: F401  (registers the embedded backbone)
    from .report import markdown_table, write_json

    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if args.clock == "thread":
        torch.set_num_threads(1)
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    fns, size = {}, None
    for name in args.models:
        model = timm.create_model(name, pretrained=False, **kwargs)
        size = size or model.patch_embed.img_size[0]
        fns[name] = prepare_model(model, device, args.channels_last, args.compile)
    inputs = torch.randn(args.batch_size, 3, size, size, device=device)
    rows = compare(fns, inputs, baseline=args.baseline, warmup=args.warmup, repeats=args.repeats, amp=args.amp,
                   clock=args.clock)
    print(markdown_table(rows, ["name", "batch_size", "median_ms", "img_s", "speedup", "device"]))
    if args.json:
        write_json(args.json, {"rows": rows, "threads": torch.get_num_threads()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
