"""Model-only throughput: fixed batch, warm-up, synchronised timing (CUDA only), median of repeats.

:func:`compare` interleaves several models in one process (round-robin per repeat), so slow drifts of a shared
machine hit every model alike, and reports img/s and the ratio to a named baseline (:data:`LEGEND`), with the load
average of the machine read right after the timing; it warns when that load exceeds the CPU count (other processes
then share the cores, and times are inflated and noisy: see the README's "Stable timings").

``clock="wall"`` (default) times with ``time.perf_counter``. ``clock="thread"`` times with the calling thread's CPU
time: with a single intra-op thread (``torch.set_num_threads(1)``) all the work runs on that thread, and other
processes on a shared CPU do not inflate it as they inflate wall-clock time. CPU only.

:func:`sweep` runs :func:`compare` at several batch sizes and adds, per model and batch, the host syncs of one forward
(:mod:`vitbench.syncs`), the CUDA-event time of the forward and the peak CUDA memory (on CUDA). :func:`prepare_model`
applies ``torch.compile`` and :func:`precision` the autocast dtype to every model of a comparison, dense included.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .cli import check_writable_file, run
from .flops import create_vit
from .outputs import check_own_json, has_keys
from .report import markdown_table, write_json
from .syncs import count_syncs


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


LEGEND = ("img_s: batch / median time of the repeats; speedup: the baseline's median time / this row's (= img_s / "
          "the baseline's img_s); spread: min-max of the per-repeat ratios (baseline time / this time in the same "
          "repeat)")


def repeat_ratios(reference: Sequence[float], times: Sequence[float]) -> list[float]:
    """``reference[r] / times[r]`` for every repeat ``r`` of one interleaved run (how many times faster ``times`` is);
    their min and max are the ``speedup_spread`` :func:`compare` reports."""
    return [ref / t for ref, t in zip(reference, times)]


def legend(load: list[float] | None = None, unit: str = "img_s") -> str:
    """:data:`LEGEND` with throughput named ``unit`` (``clip_s`` for clips) and, when given, the 1-minute ``load``
    while timing and the core count."""
    text = LEGEND.replace("img_s", unit)
    return text if load is None else f"{text}; load average {load[0]:.1f} on {os.cpu_count()} cores"


def load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages (``os.getloadavg``; None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def warn_if_loaded(load: list[float] | None, cores: int | None = None) -> bool:
    """Print one warning line to stderr when the 1-minute ``load`` exceeds ``cores`` (default: the CPU count);
    returns whether it did."""
    cores = cores or os.cpu_count() or 1
    if load is None or load[0] <= cores:
        return False
    print(f"warning: load average {load[0]:.1f} over the {cores} CPU cores while timing: other processes shared "
          "them, so times are inflated and noisy (stable timings: idle cores, OMP_NUM_THREADS=1 or --clock thread)",
          file=sys.stderr)
    return True


def compare(fns: Mapping[str, Callable[[torch.Tensor], Any]], inputs: torch.Tensor, baseline: str | None = None,
            warmup: int = 3, repeats: int = 10, amp: bool = False, clock: str | Callable[[], float] = "wall",
            inference: bool = True) -> list[dict]:
    """Time every ``fns[name](inputs)`` ``repeats`` times, interleaved, the order rotated by one each repeat (so no
    model always runs first or right after the same neighbour); rows of name, batch, median ms, img/s (batch / median
    time), ``speedup`` (the baseline's median time / this model's, so img_s / the baseline's img_s; default baseline
    the first entry), ``speedup_spread`` ([min, max] of the per-repeat ratios, baseline time / this time in the same
    repeat), ``times_ms`` (every repeat, in order) and ``load_average`` (1/5/15 min, read right after timing; a
    warning on stderr when it exceeds the CPU count).
    ``clock`` is ``"wall"``, ``"thread"`` or a callable returning seconds (a fake clock in tests).
    ``inference=False`` keeps autograd on, for timing training steps."""
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
    load = load_average()
    warn_if_loaded(load)
    base = times[baseline]
    rows = []
    for name in names:
        t = Timing(name, inputs.shape[0], statistics.median(times[name]), min(times[name]), repeats)
        ratios = repeat_ratios(base, times[name])
        rows.append({"name": name, "batch_size": t.batch_size, "median_ms": 1e3 * t.median_s,
                     "min_ms": 1e3 * t.min_s, "img_s": t.img_s, "speedup": statistics.median(base) / t.median_s,
                     "speedup_spread": [min(ratios), max(ratios)], "device": str(device), "amp": amp,
                     "clock": clock_name, "times_ms": [1e3 * x for x in times[name]], "load_average": load})
    return rows


def measure(fn: Callable[[torch.Tensor], Any], inputs: torch.Tensor, warmup: int = 3, repeats: int = 10,
            amp: bool = False, clock: str = "wall") -> dict:
    """Throughput of one callable (see :func:`compare`)."""
    return compare({"model": fn}, inputs, warmup=warmup, repeats=repeats, amp=amp, clock=clock)[0]


def transpose_linear_weights(model: torch.nn.Module) -> torch.nn.Module:
    """Store the weight of every ``nn.Linear`` in ``model`` transposed in memory (column-major), in place; return it.

    Values, shapes, dtypes and ``state_dict`` keys are unchanged, but ``F.linear`` then hands BLAS the weight as a
    row-major ``[in, out]`` matrix: a plain NN GEMM instead of the NT one of timm's layout. On CPU (MKL) that GEMM is
    much faster at the few dozen rows that token reduction leaves at batch 1, while at dense row counts the two
    layouts run alike (figures in ``docs/RESULTS.md``); results agree to float rounding (bitwise at most shapes). The
    layout survives ``.to``, ``copy.deepcopy`` and ``load_state_dict``; :func:`vitbench.models.save_weights` writes
    the usual contiguous tensors."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.data = module.weight.data.t().contiguous().t()
    return model


def prepare_model(model: torch.nn.Module, device: torch.device, channels_last: bool = False,
                  compile: bool = False) -> Callable[[torch.Tensor], Any]:
    """Eval mode on ``device``, optionally channels-last and ``torch.compile``d."""
    model = model.eval().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if compile else model


# What every --json of vitbench-throughput holds: an existing file without these keys is another command's and never
# replaced.
OWN_JSON = has_keys("rows", "threads", "cores", "torch", "compile", "dtype", "device")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision(device: torch.device, dtype: str):
    """Autocast context for ``dtype`` (``fp32``: none; ``bf16`` on CPU and CUDA; ``fp16`` on CUDA only)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if dtype == "fp16" and device.type != "cuda":
        raise ValueError("fp16 autocast needs CUDA; use bf16 on CPU")
    if DTYPES[dtype] is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def cuda_event_ms(fn: Callable[[torch.Tensor], Any], inputs: torch.Tensor, warmup: int = 3,
                  repeats: int = 10) -> float:
    """Median device time of ``fn(inputs)`` in ms, between two CUDA events (host overhead between kernels counts,
    as it idles the GPU; nothing before the first kernel does)."""
    if inputs.device.type != "cuda":
        raise ValueError("CUDA-event timing needs a CUDA tensor")
    with torch.inference_mode():
        for _ in range(warmup):
            fn(inputs)
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(inputs)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_memory_mib(fn: Callable[[torch.Tensor], Any], inputs: torch.Tensor) -> float | None:
    """Peak CUDA memory allocated during one ``fn(inputs)`` in MiB (``None`` off CUDA)."""
    if inputs.device.type != "cuda":
        return None
    torch.cuda.synchronize(inputs.device)
    torch.cuda.reset_peak_memory_stats(inputs.device)
    with torch.inference_mode():
        fn(inputs)
    torch.cuda.synchronize(inputs.device)
    return torch.cuda.max_memory_allocated(inputs.device) / 2**20


def sweep(fns: Mapping[str, Callable[[torch.Tensor], Any]], make_inputs: Callable[[int], torch.Tensor],
          batch_sizes: Sequence[int], baseline: str | None = None, dtype: str = "fp32", warmup: int = 3,
          repeats: int = 10, clock: str = "wall", syncs: bool = True) -> list[dict]:
    """:func:`compare` at every batch size (``make_inputs(b)`` gives the batch) under the autocast ``dtype``; each row
    also carries ``dtype``, ``syncs`` (host syncs of one forward, counted on the device the models run on),
    ``cuda_ms`` (CUDA-event median) and ``peak_mib`` (peak CUDA memory; both ``None`` off CUDA)."""
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes must be positive, got {list(batch_sizes)}")
    rows = []
    for b in batch_sizes:
        inputs = make_inputs(b)
        with precision(inputs.device, dtype):
            table = compare(fns, inputs, baseline=baseline, warmup=warmup, repeats=repeats, clock=clock)
            for row in table:
                fn = fns[row["name"]]
                row["dtype"] = dtype
                row["syncs"] = count_syncs(fn, inputs)["total"] if syncs else None
                cuda = inputs.device.type == "cuda"
                row["cuda_ms"] = cuda_event_ms(fn, inputs, warmup=1, repeats=repeats) if cuda else None
                row["peak_mib"] = peak_memory_mib(fn, inputs)
        rows.extend(table)
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vitbench-throughput",
        description="Side-by-side model-only throughput of timm models in one process (random weights), with the "
        "host syncs of one forward, and on CUDA the CUDA-event time and peak memory.",
    )
    p.add_argument("--models", nargs="+", default=["deit_small_patch16_224"],
                   help="timm model names (default: deit_small_patch16_224)")
    p.add_argument("--baseline", default=None, help="model the speedups refer to (default: the first)")
    p.add_argument("--batch-sizes", "--batch-size", dest="batch_size", type=int, nargs="+", default=[32],
                   help="batch sizes to sweep, e.g. 1 8 32 128 (default: 32)")
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default: the first model's)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per model and batch (default: 3)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per model and batch (default: 10)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--amp", action="store_true", help="autocast: fp16 on CUDA, bf16 on CPU (same as --dtype)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="autocast dtype for every model (default: fp32; fp16 needs CUDA)")
    p.add_argument("--channels-last", action="store_true", help="channels-last input layout (default: off)")
    p.add_argument("--compile", action="store_true", help="torch.compile (inductor) every model (default: off)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall: elapsed time; thread: CPU time of the calling thread (CPU, sets 1 intra-op thread) "
                   "(default: wall)")
    p.add_argument("--no-syncs", action="store_true", help="do not count host syncs (default: count them)")
    p.add_argument("--json", default=None, help="write rows and settings to this JSON file (default: none)")
    return p


def _dtype(args: argparse.Namespace, device: torch.device) -> str:
    if args.amp and args.dtype is not None:
        raise ValueError("give --amp or --dtype, not both")
    if args.amp:
        return "fp16" if device.type == "cuda" else "bf16"
    return args.dtype or "fp32"


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), command, argv)


def command(args: argparse.Namespace) -> int:
    if any(b < 1 for b in args.batch_size) or args.repeats < 1 or args.warmup < 0:
        raise ValueError("--batch-sizes and --repeats must be >= 1 and --warmup >= 0")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise ValueError(f"--device {args.device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but CUDA is not available here")
    if args.clock == "thread" and device.type != "cpu":
        raise ValueError("--clock thread measures CPU time; use it with --device cpu")
    if args.baseline is not None and args.baseline not in args.models:
        raise ValueError(f"--baseline {args.baseline!r} is not among --models {args.models}")
    if len(set(args.models)) != len(args.models):
        raise ValueError(f"--models lists a model twice: {args.models}")
    dtype = _dtype(args, device)
    precision(device, dtype)  # validates the dtype for this device
    if args.json:
        check_writable_file(args.json)
        check_own_json(args.json, OWN_JSON)
    models = {name: create_vit(name, args.img_size) for name in args.models}
    sizes = {name: m.patch_embed.img_size[0] for name, m in models.items()}
    size = args.img_size or sizes[args.models[0]]
    if args.img_size is None and len(set(sizes.values())) > 1:
        raise ValueError(f"the models take different resolutions {sizes}; give --img-size")
    if args.clock == "thread":
        torch.set_num_threads(1)
    fns = {name: prepare_model(m, device, args.channels_last, args.compile) for name, m in models.items()}

    def make_inputs(b: int) -> torch.Tensor:
        x = torch.randn(b, 3, size, size, device=device)
        return x.to(memory_format=torch.channels_last) if args.channels_last else x

    rows = sweep(fns, make_inputs, args.batch_size, baseline=args.baseline, dtype=dtype, warmup=args.warmup,
                 repeats=args.repeats, clock=args.clock, syncs=not args.no_syncs)
    for row in rows:
        row["compiled"] = args.compile
    for row in rows:
        row["spread"] = "{:.2f}-{:.2f}".format(*row["speedup_spread"])
        row["load"] = None if row["load_average"] is None else row["load_average"][0]
    columns = ["name", "batch_size", "dtype", "median_ms", "img_s", "speedup", "spread", "load", "syncs"]
    columns += ["cuda_ms", "peak_mib"] if device.type == "cuda" else []
    print(markdown_table(rows, columns))
    print(f"{legend()}; load: the 1-minute load average right after timing, on {os.cpu_count()} cores")
    if args.json:
        write_json(args.json, {"rows": rows, "threads": torch.get_num_threads(), "cores": os.cpu_count(),
                               "torch": torch.__version__, "compile": args.compile, "dtype": dtype,
                               "device": str(device)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
