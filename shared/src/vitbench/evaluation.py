"""The evaluation harness every ``*-eval`` command shares: common flags, one config, one result schema, one timing run.

A method package adds its own flags and a list of :class:`Setting` (the dense model first); :func:`evaluate` runs
one labelled pass over the validation set per setting (the setting's ``run`` hook returns the logits and per-image
GFLOPs of a batch), then times every setting in ONE interleaved :func:`vitbench.throughput.compare` call, and
:func:`write_results` writes ``results.json`` / ``results.md`` in the schema :data:`RESULT_SCHEMA`. vitbench never
imports a method package.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import timm
import torch
from tqdm.auto import tqdm

from . import throughput
from .cli import check_writable, check_writable_file, flag_defaults
from .data import CorruptImageError, decode_message
from .dataspec import parse_data_spec
from .models import EMBEDDED_MODEL, check_finite, check_model_name, create_model
from .outputs import Interrupted, StagedOutputs, check_figure_names, check_json_target, check_output_folder
from .report import markdown_table, plain, write_json
from .sources import InputSpec, data_source
from .video import CorruptVideoError

DEVICE_HELP = "auto (CUDA when present), cpu, cuda or cuda:N"


def config_from_args(cls, ns: argparse.Namespace):
    """A frozen dataclass from the namespace entries named like its fields (lists become tuples)."""
    values = {f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


@dataclass(frozen=True)
class EvalConfig:
    """The options every ``*-eval`` shares (same names, meanings and defaults in the three packages)."""

    data: str = "digits"
    model: str = "vit_digits_patch8_112"
    checkpoint: str | None = None
    pretrained: bool = False
    num_classes: int | None = None
    img_size: int | None = None
    crop_pct: float | None = None
    batch_size: int = 64
    num_workers: int = 2
    limit: int | None = None
    skip_corrupt: bool = False
    device: str = "auto"
    amp: bool = False
    compile: bool = False
    output_dir: str = "runs/eval"
    json: str | None = None
    flops_only: bool = False
    throughput: bool = True
    throughput_batch: int = 32
    warmup: int = 2
    repeats: int = 5
    visualize: tuple[int, ...] = (0, 1, 2, 3)
    seed: int = 0

    def __post_init__(self):
        parse_data_spec(self.data)  # an unknown prefix fails here, before any work
        checks = [
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.num_workers >= 0, f"--num-workers must be >= 0, got {self.num_workers}"),
            (self.limit is None or self.limit >= 1, f"--limit must be >= 1, got {self.limit}"),
            (self.num_classes is None or self.num_classes >= 2, f"--num-classes must be >= 2, got {self.num_classes}"),
            (self.img_size is None or self.img_size >= 8, f"--img-size must be >= 8, got {self.img_size}"),
            (self.crop_pct is None or 0 < self.crop_pct <= 1, f"--crop-pct must be in (0, 1], got {self.crop_pct}"),
            (self.throughput_batch >= 1, f"--throughput-batch must be >= 1, got {self.throughput_batch}"),
            (self.warmup >= 0, f"--warmup must be >= 0, got {self.warmup}"),
            (self.repeats >= 1, f"--repeats must be >= 1, got {self.repeats}"),
            (all(i >= 0 for i in self.visualize), f"--visualize takes validation indices >= 0, got {self.visualize}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        resolve_device(self.device, check_only=True)

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> EvalConfig:
        return config_from_args(cls, ns)


def add_eval_args(parser: argparse.ArgumentParser, **defaults) -> argparse.ArgumentParser:
    """Add the common evaluation flags; ``defaults`` overrides :class:`EvalConfig` defaults per package."""
    d = flag_defaults(EvalConfig, defaults)
    g = parser.add_argument_group("data and model (common to every *-eval)")
    g.add_argument("--data", default=d["data"],
                   help="digits | imagefolder:PATH | hf:NAME[:CONFIG] | arrow:PATH | moving-digits | "
                        "videofolder:PATH (default: %(default)s)")
    g.add_argument("--model", default=d["model"], help="timm model name (default: %(default)s)")
    g.add_argument("--checkpoint", default=d["checkpoint"],
                   help="local .safetensors/.pth weights (default: the shipped weights of the embedded model)")
    g.add_argument("--pretrained", action="store_true", default=d["pretrained"],
                   help="timm's pretrained weights for --model (needs the Hub; default: off)")
    g.add_argument("--num-classes", type=int, default=d["num_classes"],
                   help="classifier size, e.g. 100 for an ImageNet-100 checkpoint (default: the model's)")
    g.add_argument("--img-size", type=int, default=d["img_size"],
                   help="input size, a multiple of the patch size (default: the model's)")
    g.add_argument("--crop-pct", type=float, default=d["crop_pct"],
                   help="centre-crop fraction (default: 0.875 for ImageNet-style data, 1.0 for digits)")
    g.add_argument("--batch-size", type=int, default=d["batch_size"], help="evaluation batch (default: %(default)s)")
    g.add_argument("--num-workers", type=int, default=d["num_workers"],
                   help="data-loading processes (default: %(default)s)")
    g.add_argument("--limit", type=int, default=d["limit"],
                   help="evaluate only the first N validation images (default: all)")
    g.add_argument("--skip-corrupt", action="store_true", default=d["skip_corrupt"],
                   help="check every image first; drop and count unreadable ones instead of failing (default: off)")
    g.add_argument("--device", default=d["device"], help=f"{DEVICE_HELP} (default: %(default)s)")
    g.add_argument("--amp", action="store_true", default=d["amp"],
                   help="autocast every pass and timing (fp16 on CUDA, bf16 on CPU; default: off)")
    g.add_argument("--compile", action="store_true", default=d["compile"],
                   help="torch.compile every timed model, the dense one included (default: off)")
    g.add_argument("--seed", type=int, default=d["seed"], help="seed of random variants (default: %(default)s)")
    g = parser.add_argument_group("outputs and timing (common to every *-eval)")
    g.add_argument("--output-dir", default=d["output_dir"],
                   help="results.json, results.md and figures go here (default: %(default)s)")
    g.add_argument("--json", default=d["json"], help="also write the results to this file (default: none)")
    g.add_argument("--flops-only", action="store_true", default=d["flops_only"],
                   help="no data, no weights: the rows' GFLOPs, measured fields null (default: off)")
    g.add_argument("--no-throughput", dest="throughput", action="store_false", default=d["throughput"],
                   help="skip the timing run (default: every setting timed against the dense model)")
    g.add_argument("--throughput-batch", type=int, default=d["throughput_batch"],
                   help="validation images per timed call (default: %(default)s)")
    g.add_argument("--warmup", type=int, default=d["warmup"], help="untimed calls per model (default: %(default)s)")
    g.add_argument("--repeats", type=int, default=d["repeats"],
                   help="timed calls per model, order rotated each repeat (default: %(default)s)")
    g.add_argument("--visualize", type=int, nargs="*", default=list(d["visualize"]), metavar="IDX",
                   help="validation indices drawn in the method's figures; none to skip (default: 0 1 2 3)")
    return parser


def build_parser(prog: str, description: str, output_dir: str) -> argparse.ArgumentParser:
    """An ``*-eval`` parser holding the common flags (the method adds its own group)."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_eval_args(parser, output_dir=output_dir)


def resolve_device(text: str, check_only: bool = False) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cpu``, ``cuda``, ``cuda:N`` as given (checked)."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    head, _, index = text.partition(":")
    if head not in ("cpu", "cuda") or (index and (head == "cpu" or not index.isdigit())):
        raise ValueError(f"--device {text!r}: use {DEVICE_HELP}")
    if head == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {text}: CUDA is not available on this machine; use --device cpu or auto")
    if head == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise ValueError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(text)


def prepare_outputs(cfg: EvalConfig) -> Path:
    """Prove the output folder and ``--json`` are writable and owned before any work: the folder is new, empty or
    an earlier evaluation's (never a training run's), and ``--json`` replaces no file but an earlier evaluation's
    result (never the folder's own ``results.json``). Returns the output folder."""
    folder = Path(cfg.output_dir)
    if folder.is_dir():
        check_output_folder(folder)
    if cfg.json:
        check_json_target(Path(cfg.json), folder)
    out = check_writable(cfg.output_dir, "--output-dir")
    if cfg.json:
        check_writable_file(cfg.json)
    return out


# --------------------------------------------------------------------------------------------------------------
# Models and data


def load_model(cfg: EvalConfig, **kwargs) -> torch.nn.Module:
    """``cfg.model`` with ``--checkpoint`` / ``--pretrained`` / the embedded weights, ``--num-classes`` and
    ``--img-size`` applied (``kwargs`` go to timm), in eval mode."""
    check_model_name(cfg.model)
    if cfg.num_classes is not None:
        kwargs["num_classes"] = cfg.num_classes
    if cfg.img_size is not None:
        kwargs["img_size"] = cfg.img_size
    embedded = cfg.model == EMBEDDED_MODEL and cfg.checkpoint is None and cfg.num_classes is None
    pretrained = cfg.pretrained or (embedded and not cfg.flops_only)
    if not (pretrained or cfg.checkpoint or cfg.flops_only):
        raise ValueError(f"no weights for {cfg.model}: give --checkpoint PATH or --pretrained")
    model = create_model(cfg.model, pretrained=pretrained, checkpoint=None if cfg.flops_only else cfg.checkpoint,
                         **kwargs)
    check_img_size(model, cfg.img_size)
    return model.eval()


def check_img_size(model: torch.nn.Module, img_size: int | None) -> None:
    """Refuse an input size the patch grid does not divide (it would silently be cropped)."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if img_size is not None and patch is not None and img_size % patch[0]:
        raise ValueError(f"--img-size {img_size} is not a multiple of the patch size {patch[0]}")


def build_loader(cfg: EvalConfig, model: torch.nn.Module):
    """The validation loader for ``model`` (its input size, mean and std; the dataset's crop) and that spec.

    Refuses a dataset whose class count differs from the model's classifier. Clips come in batches
    ``[B, V, C, T, H, W]`` (1 x V views); ``--batch-size`` counts clips."""
    source = data_source(cfg.data, model, cfg.img_size, crop_pct=cfg.crop_pct)
    spec = source.input
    loader = source.eval_loader(cfg.batch_size, cfg.num_workers, cfg.limit, cfg.skip_corrupt)
    classes = len(loader.dataset.classes)
    if getattr(model, "num_classes", classes) != classes:
        raise ValueError(f"{cfg.model} has {model.num_classes} classes but {cfg.data} has {classes}; "
                         "give --num-classes with a matching --checkpoint")
    if len(loader.dataset) == 0:
        raise ValueError(f"{cfg.data} has no validation images")
    beyond = [i for i in cfg.visualize if i >= len(loader.dataset)]
    n = len(loader.dataset)
    span = f"{n} images (indices 0 to {n - 1}{' with --limit' if cfg.limit else ''})"
    if beyond and len(beyond) == len(cfg.visualize):
        raise ValueError(f"--visualize {' '.join(map(str, beyond))}: the validation set has {span}")
    if beyond:
        status(f"--visualize {' '.join(map(str, beyond))}: not drawn, the validation set has {span}")
    return loader, spec


def timing_batch(loader, size: int, device: torch.device) -> torch.Tensor:
    """The first ``size`` validation images (repeated if the set is smaller): what every model is timed on."""
    images = []
    for batch in loader:
        images.append(batch[0])
        if sum(len(b) for b in images) >= size:
            break
    x = torch.cat(images)
    return x.repeat(-(-size // len(x)), *[1] * (x.dim() - 1))[:size].to(device)


# --------------------------------------------------------------------------------------------------------------
# Settings, rows and the schema

StepHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Setting:
    """One evaluated setting. ``step(images, labels, index) -> (logits [B, C], gflops [B])`` is the per-batch hook
    (it may record method state); ``finish(row, out_dir)`` fills ``row["extra"]`` / ``row["figures"]`` after the
    pass. ``timed`` is what the timing run calls (default ``model``); ``evaluate=False`` gives a timing-only row.
    ``gflops`` is the data-free count used by ``--flops-only``; ``extra`` the method fields known without data."""

    method: str
    series: str
    point: str
    params: dict
    model: torch.nn.Module
    step: StepHook | None = None
    gflops: float | None = None
    timed: Callable[[torch.Tensor], Any] | None = None
    finish: Callable[[dict, Path], None] | None = None
    paper: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    evaluate: bool = True

    @property
    def label(self) -> str:
        return f"{self.series} {self.point}".strip()


ROW_FIELDS = {
    "method": str, "series": str, "point": str, "label": str, "setting": dict, "top1": (float, type(None)),
    "top5": (float, type(None)), "images": (int, type(None)), "gflops": (float, type(None)),
    "gflops_saved": (float, type(None)), "img_s": (float, type(None)), "speedup": (float, type(None)),
    "speedup_spread": (list, type(None)), "ideal_speedup": (float, type(None)), "paper": dict, "figures": dict,
    "extra": dict,
}
RESULT_SCHEMA = {
    "config": dict,  # the resolved common config plus the method's own options under "method"
    "environment": dict,  # torch, timm, device, threads, amp, compile, git commit (None when unknown)
    "data": dict,  # spec, images evaluated, skipped (paths of unreadable files dropped by --skip-corrupt)
    "rows": list,  # one row per setting, ROW_FIELDS
}
ENVIRONMENT_FIELDS = ("torch", "timm", "device", "threads", "amp", "compile", "git_commit")


def validate_result(result: dict) -> None:
    """Raise ``ValueError`` naming the first field of ``result`` (a parsed results.json) off the schema."""
    def check(obj: dict, spec: dict, where: str) -> None:
        missing, extra = set(spec) - set(obj), set(obj) - set(spec)
        if missing or extra:
            raise ValueError(f"{where}: missing {sorted(missing)}, unexpected {sorted(extra)}")
        for key, kind in spec.items():
            value = obj[key]
            if isinstance(value, int) and not isinstance(value, bool) and kind in ((float, type(None)), float):
                continue  # JSON writes 2.0 as 2.0 but 2 as an int; both are numbers
            if not isinstance(value, kind):
                raise ValueError(f"{where}.{key}: {type(value).__name__} is not {kind}")

    check(result, RESULT_SCHEMA, "result")
    if set(result["environment"]) != set(ENVIRONMENT_FIELDS):
        raise ValueError(f"result.environment keys {sorted(result['environment'])} != {sorted(ENVIRONMENT_FIELDS)}")
    for i, row in enumerate(result["rows"]):
        check(row, ROW_FIELDS, f"rows[{i}]")
        spread = row["speedup_spread"]
        if spread is not None and (len(spread) != 2 or spread[0] > spread[1]):
            raise ValueError(f"rows[{i}].speedup_spread {spread} is not [min, max]")


def empty_row(s: Setting) -> dict:
    """The row of ``s`` with every measured field null."""
    return {**dict.fromkeys(ROW_FIELDS), "method": s.method, "series": s.series, "point": s.point,
            "label": s.label, "setting": dict(s.params), "gflops": s.gflops, "paper": dict(s.paper), "figures": {},
            "extra": dict(s.extra)}


def _fill_ratios(rows: list[dict]) -> None:
    dense = rows[0]["gflops"]
    for row in rows:
        if dense and row["gflops"]:
            row["gflops_saved"] = 100.0 * (1.0 - row["gflops"] / dense)
            row["ideal_speedup"] = dense / row["gflops"]


def status(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def autocast(device: torch.device, amp: bool):
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


def flops_rows(settings: Sequence[Setting]) -> list[dict]:
    """``--flops-only``: every setting's data-free GFLOPs, measured fields null."""
    rows = [empty_row(s) for s in settings]
    _fill_ratios(rows)
    return rows


def evaluate(cfg: EvalConfig, settings: Sequence[Setting], loader, device: torch.device,
             out_dir: Path, unit: str = "image") -> list[dict]:
    """One labelled pass over the data in which every batch goes through every setting (the images are loaded
    and decoded once, whatever the number of settings), then one timing run of them all; rows in the schema,
    dense row first. Figures go to ``out_dir``. Top-5 is null when the data has 5 classes or fewer (it would be
    100 %)."""
    rows = [empty_row(s) for s in settings]
    active = [(s, row, {"correct1": 0, "correct5": 0, "n": 0, "gflops": []})
              for s, row in zip(settings, rows) if s.evaluate]
    if active:
        status(f"evaluating {len(active)} setting(s) on {len(loader.dataset)} {unit}s: "
               + ", ".join(s.label for s, _, _ in active))
        for s, _, _ in active:
            s.model.to(device)
        with torch.inference_mode(), autocast(device, cfg.amp), corrupt_files_named():
            for images, labels, index in tqdm(loader, desc="batches", leave=False, file=sys.stderr):
                images, labels = images.to(device), labels.to(device)
                for s, _, acc in active:
                    logits, g = s.step(images, labels, index)
                    top = logits.topk(min(5, logits.shape[-1]), -1).indices
                    acc["correct1"] += int((top[:, 0] == labels).sum())
                    acc["correct5"] += int((top == labels[:, None]).any(-1).sum())
                    acc["n"] += len(labels)
                    acc["gflops"].append(torch.as_tensor(g, dtype=torch.float64).expand(len(labels)).cpu())
    top5 = len(getattr(loader.dataset, "classes", ())) > 5
    for s, row, acc in active:
        n = acc["n"]
        row.update(top1=100.0 * acc["correct1"] / n, top5=100.0 * acc["correct5"] / n if top5 else None, images=n,
                   gflops=float(torch.cat(acc["gflops"]).mean()))
        if s.finish:
            s.finish(row, out_dir)
    _fill_ratios(rows)
    if cfg.throughput:
        time_rows(cfg, settings, rows, timing_batch(loader, cfg.throughput_batch, device))
    return rows


@contextlib.contextmanager
def corrupt_files_named():
    """An unreadable file met during the pass (also inside a DataLoader worker, whose error carries the worker's
    traceback) becomes one line naming the file, with the ``--skip-corrupt`` hint."""
    try:
        yield
    except (CorruptImageError, CorruptVideoError) as e:
        line = decode_message(e)
        hint = "" if "--skip-corrupt" in line else "; drop unreadable files with --skip-corrupt"
        raise type(e)(line + hint) from None


def time_rows(cfg: EvalConfig, settings: Sequence[Setting], rows: list[dict], inputs: torch.Tensor,
              clock: str | Callable[[], float] = "wall") -> None:
    """Time every setting in ONE interleaved :func:`~vitbench.throughput.compare` call against the first (dense);
    fills ``img_s``, ``speedup`` (ratio of median times), ``speedup_spread`` ([min, max] of the per-repeat ratios) and
    ``extra.load_average`` (1/5/15-minute load average right after the timing run)."""
    fns = {}
    for s in settings:
        fn = s.timed or s.model.to(inputs.device)
        fns[s.label] = torch.compile(fn) if cfg.compile else fn
    if len(fns) != len(settings):
        raise ValueError(f"settings need distinct labels to be timed, got {[s.label for s in settings]}")
    status(f"timing {len(fns)} models x {cfg.repeats} repeats (batch {inputs.shape[0]}, {inputs.device}, "
           f"{'amp' if cfg.amp else 'fp32'}{', compiled' if cfg.compile else ''})")
    timed = {t["name"]: t for t in throughput.compare(fns, inputs, baseline=settings[0].label, warmup=cfg.warmup,
                                             repeats=cfg.repeats, amp=cfg.amp, clock=clock)}
    for s, row in zip(settings, rows):
        t = timed[s.label]
        row.update(img_s=t["img_s"], speedup=t["speedup"], speedup_spread=t["speedup_spread"])
        row["extra"]["load_average"] = t["load_average"]


def environment(cfg: EvalConfig, device: torch.device) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"torch": torch.__version__, "timm": timm.__version__, "device": str(device),
            "threads": torch.get_num_threads(), "amp": cfg.amp, "compile": cfg.compile, "git_commit": commit}


MD_COLUMNS = ("label", "top1", "top5", "gflops", "gflops_saved", "img_s", "speedup", "ideal_speedup")


def markdown(rows: list[dict], unit: str = "image") -> str:
    """The human table: measured fields, the spread of the speedup, the paper's numbers beside them. Throughput is
    headed by the unit counted (``img_s`` for images, ``clip_s`` for clips; the JSON field stays ``img_s``)."""
    keys = list(dict.fromkeys(k for r in rows for k in r["paper"]))
    shown = []
    for r in rows:
        spread = r["speedup_spread"]
        shown.append({**{c: r[c] for c in MD_COLUMNS},
                      "spread": None if spread is None else f"{spread[0]:.2f}-{spread[1]:.2f}",
                      **{f"paper {k}": r["paper"].get(k) for k in keys}})
    columns = [*MD_COLUMNS, "spread", *(f"paper {k}" for k in keys)]
    headers = [("clip_s" if unit == "clip" else c) if c == "img_s" else c for c in columns]
    return markdown_table(shown, columns, digits=3, headers=headers)


def write_results(cfg: EvalConfig, method_options: Any, rows: list[dict], device: torch.device,
                  stage: StagedOutputs, dataset=None, unit: str = "image") -> dict:
    """results.json + results.md (and ``--json``) written into the staging folder beside the output folder, then
    every file of the run moved into place at once; prints the table and every file written. Files an earlier
    evaluation listed that this one did not write are removed then, and files of another origin named."""
    for row in rows:
        row["figures"] = {k: str(stage.final(v)) for k, v in row["figures"].items()}
    result = {"config": {**asdict(cfg), "method": asdict(method_options) if method_options is not None else {}},
              "environment": environment(cfg, device),
              "data": {"spec": cfg.data, "images": len(dataset) if dataset is not None else None,
                       "skipped": list(getattr(dataset, "skipped", []) or [])},
              "rows": rows}
    text = json.dumps(plain(result), indent=2) + "\n"  # what results.json and --json hold
    validate_result(json.loads(text))
    table = markdown(rows, unit)
    print(table)
    if any(r["img_s"] is not None for r in rows):
        load = next((r["extra"].get("load_average") for r in rows if r["img_s"] is not None), None)
        print(throughput.legend(load, "clip_s" if unit == "clip" else "img_s"))
    write_json(stage.dir / "results.json", result)
    (stage.dir / "results.md").write_text(table + "\n")
    stage.write_json_copy(text)
    written = stage.commit()
    mine = {p.resolve() for p in written}
    others = sorted(p.name for p in stage.out.iterdir() if p.is_file() and not p.name.startswith(".")
                    and p.resolve() not in mine)
    if result["data"]["skipped"]:
        status(f"skipped {len(result['data']['skipped'])} unreadable {unit}(s): "
               + ", ".join(result["data"]["skipped"][:5]))
    status("wrote " + ", ".join(str(p) for p in written))
    if stage.removed:
        status(f"removed the earlier evaluation's {', '.join(stage.removed)}")
    if others:
        status(f"not written by this run, left as they were: {', '.join(others)}")
    return result


def check_weights(settings: Sequence[Setting], checked: Sequence[torch.nn.Module] = ()) -> None:
    """Refuse settings whose weights hold NaN or infinite values, naming the first bad tensor (whatever loaded
    them: a checkpoint, timm's pretrained weights, a method's fine-tuned files); models in ``checked`` were."""
    seen = {id(m) for m in checked}
    for s in settings:
        if id(s.model) not in seen:
            seen.add(id(s.model))
            check_finite(s.model, f"the weights of {s.label!r}")


@contextlib.contextmanager
def interruption(stage: StagedOutputs):
    """SIGTERM raised as an interruption like Ctrl-C (SIGINT); either ends as :class:`~vitbench.outputs.Interrupted`
    saying what became of the outputs (``vitbench.cli.run`` prints one line and exits 130 / 143)."""
    received: list[str] = []

    def on_sigterm(signum, frame):
        received.append("SIGTERM")
        raise KeyboardInterrupt

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if in_main else None
    try:
        yield
    except KeyboardInterrupt:
        name = received[0] if received else "SIGINT"
        done = (f"; the results were written to {stage.out} before it stopped" if stage.committed else
                f"; nothing written, the earlier files in {stage.out} are untouched")
        raise Interrupted(name, done) from None
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def harness(cfg: EvalConfig, options: Any, model: torch.nn.Module,
        make_settings: Callable[[Any, InputSpec | None], list[Setting]],
        figure_patterns: Sequence[str] = (), sweep_title: str | None = None, sweep_unit: str = "image") -> dict:
    """The whole ``*-eval`` flow after parsing: outputs checked, ``--flops-only`` rows or the data, the settings'
    weights checked for non-finite values, their passes, one timing run, the accuracy-vs-GFLOPs figure (when
    ``sweep_title``; GFLOPs per ``sweep_unit``), results written. Every file goes to a staging folder first and
    is moved into ``--output-dir`` only when all are complete, so a failed or interrupted run leaves the earlier
    files as they were. ``figure_patterns`` (the method's figure names, e.g. ``hist_*.png``): files so named in the
    folder that no earlier evaluation listed in its results.json are refused up front, never replaced.

    ``make_settings(loader, input_spec)`` builds the method's settings, dense first (``loader`` and
    ``input_spec`` are None for ``--flops-only``)."""
    out_dir = prepare_outputs(cfg)
    check_figure_names(out_dir, [*figure_patterns, "accuracy_vs_gflops.png"])
    device = resolve_device(cfg.device)
    stage = StagedOutputs(out_dir, Path(cfg.json) if cfg.json else None)
    with interruption(stage), stage:
        if cfg.flops_only:
            return write_results(cfg, options, flops_rows(make_settings(None, None)), device, stage)
        check_finite(model, f"the weights of {cfg.model}")
        status(f"loading the validation set of {cfg.data}" + (" (checking every file)" if cfg.skip_corrupt else ""))
        loader, spec = build_loader(cfg, model)
        settings = make_settings(loader, spec)
        check_weights(settings, checked=[model])
        rows = evaluate(cfg, settings, loader, device, stage.dir, sweep_unit)
        if sweep_title and sum(r["top1"] is not None for r in rows) > 2:
            from .figures import accuracy_vs_gflops  # deferred: matplotlib takes a second to import

            path = accuracy_vs_gflops(rows, stage.dir / "accuracy_vs_gflops.png", sweep_title, sweep_unit)
            rows[0]["figures"]["accuracy_vs_gflops"] = str(path)
        return write_results(cfg, options, rows, device, stage, loader.dataset, sweep_unit)
