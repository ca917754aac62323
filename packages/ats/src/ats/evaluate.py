"""``ats-eval``: accuracy, mean per-image GFLOPs, throughput, kept-token histograms and visualisations of ATS.

Without arguments it evaluates the embedded default (``vit_digits_patch8_112`` with its shipped weights on the
embedded digits), all rows timed against the dense model in one run: off the shelf with the released
configuration (blocks 3..11) at rho 1 / 0.87 / 0.72 (the paper's 3.0 / 2.5 / 2.0 GFLOPs levels on DeiT-S, Fig. 5)
and at rho 1 in blocks 7..11 (the placement whose GFLOPs share is nearest the paper's 2.9 / 4.6), and with the
shipped fine-tuned weights at the configurations they were trained for: blocks 3..11 at rho 1 (Table 1) and
blocks 7..11 at rho 1 / 0.87 / 0.72. ``--finetuned PATH`` evaluates other fine-tuned weights next to the given
ones. ``--rho`` / ``--k`` give another sweep (shipped fine-tuned weights trained at the same ``--stages`` join it),
``--preset`` a paper table with its reported numbers, ``--flops-only`` the data-free upper bound (exact for
single-stage ATS at an absolute K). Video data (``--data moving-digits``: the embedded X-ViT;
``--data videofolder:PATH`` with a Kinetics ``--model`` and ``--checkpoint``) runs on 1 x 3 views
(:mod:`ats.video_eval`). Rows on the same weights run the dense blocks before their first ATS stage once per batch
(:class:`SharedBlocks`); the timing run times every row's whole forward.
"""

from __future__ import annotations

import argparse
import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from vitbench import evaluation as ev
from vitbench.cli import run as run_cli
from vitbench.flops import ViTGeometry

from . import patch
from .flops import dense_gmacs, per_image_gmacs, upper_bound_gmacs

MULTI = tuple(range(3, 12))
LATE = tuple(range(7, 12))
DEFAULT_RHO = (1.0, 0.87, 0.72)
WEIGHTS = Path(__file__).parent / "weights"
DENSE_PAPER = {"top1": 79.8, "gflops": 4.6}  # DeiT-S on ImageNet


@dataclass(frozen=True)
class Run:
    """One ATS configuration, with the paper's numbers (DeiT-S, ImageNet) when it is a paper setting."""

    stages: tuple[int, ...]
    k: float
    mode: str = "official"
    variant: tuple[str, ...] = ()
    series: str = "ATS"
    paper: tuple[tuple[str, float], ...] = ()
    paper_finetuned: tuple[tuple[str, float], ...] = ()
    placement_in_series: bool = False  # one series per placement ("ATS ... @ 7-11"), the points just rho / K

    @property
    def point(self) -> str:
        where = "" if self.stages == MULTI or self.placement_in_series else f" @ {_stage_text(self.stages)}"
        return (f"rho {self.k:g}" if self.k <= 1 else f"K {self.k:g}") + where

    def series_for(self, tag: str) -> str:
        """This run's series name with ``tag`` (``off-the-shelf``, ``fine-tuned`` or empty)."""
        name = f"{self.series} {tag}".strip()
        return f"{name} @ {_stage_text(self.stages)}" if self.placement_in_series else name

    @property
    def size(self) -> dict:
        """``{"rho": k}`` or ``{"k": k}`` (a value above 1 is an absolute K), as ``apply`` takes it."""
        return {"rho" if self.k <= 1 else "k": self.k}

    def params(self) -> dict:
        return {"stages": list(self.stages), **self.size, "mode": self.mode, "variant": list(self.variant)}


def _paper(top1, gflops):
    return tuple((k, v) for k, v in (("top1", top1), ("gflops", gflops)) if v is not None)


def _ms(rho, top1=None, g=None, series="ATS", ft=None, **kw) -> Run:
    return Run(MULTI, rho, series=series, paper=_paper(top1, g), paper_finetuned=_paper(ft, g if ft else None), **kw)


def _ss(k, stage=3, top1=None, g=None, series="ATS single-stage", **kw) -> Run:
    return Run((stage,), k, series=series, paper=_paper(top1, g), **kw)


# Paper numbers: Table 1, Tables A.1/A.3/A.4, Fig. 5 and Fig. A.1 (text; the figures' other points are not
# printed in the paper, so only their GFLOPs levels are given). DeiT-S dense: 79.8 top-1, 4.6 GFLOPs. The
# default sweep: not fine-tuned rho 1 = 79.2 at 3.0 (Table A.4 / Fig. 5); fine-tuned rho 1 = 79.7 at 2.9 (Table 1).
DEFAULT_RUNS = (_ms(1.0, 79.2, 3.0), _ms(0.87, None, 2.5), _ms(0.72, None, 2.0))
PRESETS: dict[str, tuple[str, tuple[Run, ...]]] = {
    "table1": ("Table 1: fine-tuned multi-stage DeiT-S+ATS (use the fine-tuned checkpoint)",
               (_ms(1.0, 79.7, 2.9),)),
    "table-a1": ("Table A.1: throughput of DeiT-S+ATS vs DeiT-S (paper: 1403 vs 1010 img/s on an RTX6000)",
                 (_ms(1.0, 79.7, 2.9),)),
    "table-a3": ("Table A.3 / Fig. 5a: top-K vs inverse transform sampling (both fine-tuned)",
                 (_ms(0.865, 78.9, 2.9, series="ATS top-K", variant=("topk",)), _ms(1.0, 79.7, 2.9))),
    "fig5a": ("Fig. 5a: top-K (fixed rate, K_n = round(rho N_n)) vs inverse transform sampling, not fine-tuned",
              (_ms(0.865, None, 3.0, series="ATS top-K", variant=("topk",)),
               _ms(0.79, None, 2.5, series="ATS top-K", variant=("topk",)),
               _ms(0.665, None, 2.0, series="ATS top-K", variant=("topk",)), *DEFAULT_RUNS)),
    "table-a4": ("Table A.4: ATS placement at ~3 GFLOPs, not fine-tuned",
                 (_ss(130, 0, 73.1, 3.0), _ss(108, 3, 78.5, 3.0), _ss(56, 6, 77.4, 3.0), DEFAULT_RUNS[0])),
    "fig5b": ("Fig. 5b: multi-stage, not fine-tuned vs fine-tuned (give --finetuned PATH)", DEFAULT_RUNS),
    "fig5c": ("Fig. 5c: single-stage (block 3) vs multi-stage (blocks 3..11)",
              (_ss(108, 3, None, 3.0), _ss(78, 3, None, 2.5), _ss(48, 3, None, 2.0), *DEFAULT_RUNS)),
    "fig-a1": ("Fig. A.1: single-stage K sweep, fine-tuned (paper: K=48 -> 75% at 2 GFLOPs)",
               (_ss(108, 3, None, 3.0), _ss(78, 3, None, 2.5), _ss(48, 3, 75.0, 2.0))),
}
# Table 1: the fine-tuned rho 1 point.
FINETUNED_PAPER = {1.0: {"top1": 79.7, "gflops": 2.9}}


def _late(rho: float, ft=None) -> Run:
    return Run(LATE, rho, paper_finetuned=_paper(ft, 2.9 if ft else None), placement_in_series=True)


@dataclass(frozen=True)
class Shipped:
    """Fine-tuned ATS weights of the embedded model (their ``ats-train`` commands are in the README) and the
    configurations the no-argument run shows them at: the placement they were trained for."""

    file: str
    stages: tuple[int, ...]
    runs: tuple[Run, ...]

    @property
    def path(self) -> Path:
        return WEIGHTS / self.file


# The no-argument run: off the shelf, the default sweep plus blocks 7..11 at rho 1; fine-tuned, each shipped file.
EMBEDDED_RUNS = (*DEFAULT_RUNS, _late(1.0))
SHIPPED = (Shipped("vit_digits_patch8_112_ats.safetensors", MULTI, (DEFAULT_RUNS[0],)),
           Shipped("vit_digits_patch8_112_ats_7-11.safetensors", LATE, (_late(1.0, 79.7), _late(0.87), _late(0.72))))


@dataclass(frozen=True)
class ATSOptions:
    """ATS's own flags; the common ones are :class:`vitbench.evaluation.EvalConfig`."""

    stages: tuple[int, ...] = MULTI
    rho: tuple[float, ...] = ()
    k: tuple[float, ...] = ()
    mode: str = "official"
    variant: tuple[str, ...] = ()
    preset: str | None = None
    finetuned: str | None = None

    def __post_init__(self):
        if self.rho and self.k:
            raise ValueError("give --rho or --k, not both")
        if any(not (0 < r <= 1) for r in self.rho):  # also refuses nan
            raise ValueError(f"--rho values must be in (0, 1], got {list(self.rho)}")
        if any(not (math.isfinite(k) and k >= 2) for k in self.k):
            raise ValueError(f"--k values must be finite and >= 2 (K counts the CLS), got {list(self.k)}")
        if len(set(self.stages)) != len(self.stages) or any(s < 0 for s in self.stages):
            raise ValueError(f"--stages must be distinct block indices >= 0, got {list(self.stages)}")
        if self.preset and (self.rho or self.k):
            raise ValueError("--preset sets its own configurations; drop --rho/--k")

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> ATSOptions:
        return ev.config_from_args(cls, ns)

    @property
    def is_default(self) -> bool:
        return not (self.preset or self.rho or self.k or self.variant) and self.stages == MULTI \
            and self.mode == "official"

    def runs(self, embedded: bool = False) -> tuple[Run, ...]:
        """The configurations to evaluate (``embedded``: the no-argument run on the embedded model)."""
        if self.preset:
            return PRESETS[self.preset][1]
        if self.is_default:
            return EMBEDDED_RUNS if embedded else DEFAULT_RUNS
        series = "ATS " + "+".join(self.variant) if self.variant else "ATS"
        return tuple(Run(self.stages, float(v), self.mode, self.variant, series)
                     for v in (self.k or self.rho or DEFAULT_RHO))


def _stage_text(stages) -> str:
    s = list(stages)
    if len(s) > 1 and s == list(range(s[0], s[-1] + 1)):
        return f"{s[0]}-{s[-1]}"
    return ",".join(map(str, s))


def parse_stages(text: str) -> tuple[int, ...]:
    """``3-11`` -> 3..11, ``3`` -> (3,), ``0,3,6`` -> (0, 3, 6)."""
    try:
        if "-" in text:
            a, b = (int(v) for v in text.split("-"))
            if b < a:
                raise ValueError
            return tuple(range(a, b + 1))
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot parse stages {text!r}; use e.g. 3-11, 3 or 0,3,6") from None


def build_parser() -> argparse.ArgumentParser:
    d = ATSOptions()
    p = ev.build_parser("ats-eval", __doc__, "runs/ats-eval")
    g = p.add_argument_group("ATS")
    g.add_argument("--stages", type=parse_stages, default=d.stages,
                   help="ATS blocks, 0-based: 3-11, 3 or 0,3,6 (default: 3-11; TimeSformer: 3-5)")
    g.add_argument("--rho", type=float, nargs="+", default=[],
                   help="K_n = max(round(rho*N_n), 8); several = sweep (default: 1 0.87 0.72; video: 1)")
    g.add_argument("--k", type=float, nargs="+", default=[],
                   help="absolute K per stage (counts the CLS, at most the token count); several = sweep")
    g.add_argument("--mode", choices=patch.MODES, default=d.mode,
                   help="released-code or paper selection (default: %(default)s)")
    g.add_argument("--variant", nargs="+", default=[], choices=patch.VARIANTS,
                   help="ablations of Figs. 3/5a/A.4 (default: none)")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a paper table/figure's configurations, printed next to the paper's numbers: "
                   + "; ".join(f"{k}: {v[0]}" for k, v in PRESETS.items()).replace("%", "%%"))
    g.add_argument("--finetuned", default=None, metavar="PATH",
                   help="fine-tuned ATS weights of the same model, evaluated in the same run as a second series "
                   "(default for the embedded model: the shipped "
                   + " and ".join(f"{w.file} (blocks {_stage_text(w.stages)})" for w in SHIPPED) + ")")
    return p


def _embedded(cfg: ev.EvalConfig) -> bool:
    return cfg.model == ev.EvalConfig.model and cfg.checkpoint is None and not cfg.flops_only


def given_finetuned(opts: ATSOptions) -> Path | None:
    """``--finetuned PATH``, checked to exist (None when not given)."""
    if not opts.finetuned:
        return None
    path = Path(opts.finetuned)
    if not path.is_file():
        raise FileNotFoundError(f"--finetuned {path} not found")
    return path


def figure_slug(label: str) -> str:
    """A row label as a file-name part: ``ATS fine-tuned @ 7-11 rho 1`` -> ``ATS_fine-tuned_at_7-11_rho_1``."""
    return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in label.replace(" @ ", " at "))


def finetuned_plans(cfg: ev.EvalConfig, opts: ATSOptions) -> list[tuple[Path, tuple[Run, ...]]]:
    """The fine-tuned weights to evaluate and the runs for each: ``--finetuned`` at the requested runs; on the
    embedded default, each shipped file at its own runs (no arguments) or at the requested runs when it was
    trained at the requested ``--stages``."""
    given = given_finetuned(opts)
    if given is not None:
        return [(given, opts.runs())]
    if not _embedded(cfg) or opts.preset:
        return []
    plans = []
    for w in SHIPPED:
        if not (opts.is_default or w.stages == opts.stages):
            continue
        if w.path.is_file():
            plans.append((w.path, w.runs if opts.is_default else opts.runs()))
        else:
            ev.status(f"no fine-tuned ATS weights shipped ({w.file}); its fine-tuned rows skipped")
    return plans


def _patched(model, run: Run, seed: int):
    return patch.apply(copy.deepcopy(model), stages=run.stages, mode=run.mode, variant=run.variant, seed=seed,
                       **run.size).eval()


def _check_runs(runs, geom: ViTGeometry, name: str) -> None:
    for run in runs:
        if any(s >= geom.depth for s in run.stages):
            raise ValueError(f"--stages {_stage_text(run.stages)}: {name} has blocks 0..{geom.depth - 1}")
        if run.k > geom.num_tokens:
            raise ValueError(f"--k {run.k:g} exceeds the {geom.num_tokens} tokens (CLS included) of {name}")


def build_settings(cfg, opts, model, finetuned, loader, spec) -> list[ev.Setting]:
    """Dense first, then every ATS configuration on the given weights and on each ``(model, runs, file name)`` of
    ``finetuned``."""
    from . import figures

    geom = ViTGeometry.from_model(model)
    plans = [("", model, opts.runs(embedded=_embedded(cfg)), None)]
    plans += [("fine-tuned", m, runs, name) for m, runs, name in finetuned]
    for _, _, runs, _ in plans:
        _check_runs(runs, geom, cfg.model)
    dense_g = dense_gmacs(geom)
    shared = SharedBlocks({name or "": {min(run.stages) for run in runs} for _, _, runs, name in plans})
    settings = [ev.Setting("dense", "dense", "", {}, model, gflops=dense_g, paper=DENSE_PAPER,
                           run=lambda x, y, i: (model.forward_head(model.norm(shared.hidden("", model, x, i,
                                                                                             geom.depth))),
                                                torch.tensor(dense_g)))]
    for tag, base, runs, name in plans:
        for run in runs:
            paper = dict(run.paper_finetuned if tag else run.paper)
            if tag and not paper and run.stages == MULTI and run.k in FINETUNED_PAPER:
                paper = FINETUNED_PAPER[run.k]
            m = _patched(base, run, cfg.seed)
            bound = upper_bound_gmacs(geom, m.ats_info.config)
            params = {**run.params(), "weights": tag or "given", **({"weights_file": name} if name else {})}
            s = ev.Setting("ats", run.series_for(tag or ("off-the-shelf" if finetuned else "")), run.point, params,
                           m, gflops=bound, paper=paper, extra={"gflops_upper_bound": bound})
            if loader is not None:
                _attach_probe(s, geom, set(cfg.visualize), loader, spec, figures, cfg, shared, name or "")
            settings.append(s)
    return settings


class SharedBlocks:
    """Per batch, the hidden states after the dense blocks that precede a first ATS stage, kept per weights (the
    name of a fine-tuned file, "" for the evaluated model): the dense row and every ATS row on the same weights run
    those blocks once per batch, so a rho sweep costs its ATS blocks only. Holds one batch; ``depths[weights]`` are
    the block counts some row resumes from."""

    def __init__(self, depths: dict[str, set[int]]):
        self.depths, self.index, self.store = depths, None, {}

    def hidden(self, weights: str, model: torch.nn.Module, x: torch.Tensor, index: torch.Tensor,
               stop: int) -> torch.Tensor:
        """Output of the first ``stop`` blocks of ``model`` (carrying ``weights``) on the batch ``x`` (dataset
        ``index``), computed from the deepest kept state and keeping those at ``depths[weights]``."""
        if self.index is None or not torch.equal(self.index, index):
            self.index, self.store = index, {}
        kept, wanted = self.store.setdefault(weights, {}), self.depths.get(weights, set())
        start = max((d for d in kept if d <= stop), default=0)
        h = kept.get(start)
        for d in sorted({d for d in wanted if start < d < stop} | {stop}):
            h, start = patch.dense_hidden(model, x, d, h, start), d
            if d in wanted:
                kept[d] = h
        return h


def _attach_probe(s: ev.Setting, geom, keep, loader, spec, figures, cfg, shared: SharedBlocks,
                  weights: str) -> None:
    """The per-batch hook (logits, per-image GMACs, kept-token counts, kept tokens of the drawn images, share of
    the last stage's tokens on the digit box) and the figures after the pass."""
    from vitbench.localization import on_box_share, random_share

    model, stages = s.model, s.model.ats_info.config.stages
    first = min(stages)
    counts, kept, on_object, at_random = [], {}, [], []

    def run(images, labels, index):
        h = shared.hidden(weights, model, images, index, first)
        logits = model.forward_head(model.forward_features(images, hidden=h, start=first))
        info = model.ats_info
        counts.append(info.token_counts()[1].cpu())
        for j, i in enumerate(index.tolist()):
            if i in keep:
                kept[i] = {b: info.kept_indices(b)[j].cpu() for b in stages}
        boxes = spec.boxes(loader.dataset, index)
        if boxes is not None:
            on_object.append(on_box_share(info.kept[stages[-1]].cpu(), boxes, geom.grid, spec.img_size))
            at_random.append(random_share(boxes, geom.grid, spec.img_size))
        return logits, per_image_gmacs(geom, info)

    def finish(row: dict, out_dir: Path) -> None:
        c = torch.cat(counts).double()
        row["extra"].update({"tokens_out_mean": [float(c[:, b].mean()) for b in stages],
                             "tokens_out_min": [int(c[:, b].min()) for b in stages],
                             "tokens_out_max": [int(c[:, b].max()) for b in stages]})
        if on_object:
            row["extra"].update(on_object=100.0 * float(torch.cat(on_object).mean()),
                                on_object_random=100.0 * float(torch.cat(at_random).mean()))
        slug = figure_slug(s.label)
        title = f"{cfg.model} + {s.label}, {cfg.data} ({row['images']} images)"
        row["figures"]["histogram"] = str(figures.token_histograms(torch.cat(counts), stages,
                                                                   out_dir / f"hist_{slug}.png", title))
        if kept:
            ds, idx = loader.dataset, sorted(kept)
            images = torch.stack([ds[i][0] for i in idx])
            row["figures"]["tokens"] = str(figures.kept_tokens(
                images, spec.mean, spec.std, [kept[i] for i in idx], stages, geom.grid, out_dir / f"tokens_{slug}.png",
                spec.boxes(ds, idx), idx, title))

    s.run, s.finish = run, finish


def body(args: argparse.Namespace) -> int:
    cfg, opts = ev.EvalConfig.from_args(args), ATSOptions.from_args(args)
    from . import video_eval

    if video_eval.wants_video(cfg):  # clips: 1 x 3 views, Tables 2 / 3 / A.2
        return video_eval.body(cfg, opts)
    ev.prepare_outputs(cfg)
    model = ev.load_model(cfg)
    try:
        patch._check_structure(model)
    except TypeError as e:
        raise ValueError(f"{cfg.model}: {e}") from None
    from vitbench.models import load_checkpoint

    finetuned = [(load_checkpoint(copy.deepcopy(model), path).eval(), runs, path.name)
                 for path, runs in finetuned_plans(cfg, opts)]
    if opts.preset:
        print(PRESETS[opts.preset][0])
    title = f"ATS on {cfg.model}, {cfg.data}: top-1 vs GFLOPs"
    ev.run(cfg, opts, model, lambda loader, spec: build_settings(cfg, opts, model, finetuned, loader, spec),
           figure_patterns=("hist_*.png", "tokens_*.png"), sweep_title=title)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
