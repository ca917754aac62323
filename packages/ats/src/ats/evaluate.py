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
(:mod:`ats.video.evaluate`). Rows on the same weights run the dense blocks before their first ATS stage once per batch
(:class:`SharedBlocks`); the timing run times every row's whole forward.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from vitbench import cli
from vitbench import evaluation as ev
from vitbench.flops import ViTGeometry
from vitbench.localization import on_box_share, random_share
from vitbench.models import load_checkpoint

from . import patch
from .flops import dense_gmacs, per_image_gmacs, upper_bound_gmacs
from .options import SHIPPED, ATSEvalConfig, figure_slug, given_finetuned, parse_stages
from .paper import DENSE, FINETUNED, MULTI, PRESETS, Run, stage_text
from .video import evaluate as video_evaluate


def build_parser() -> argparse.ArgumentParser:
    d = ATSEvalConfig()
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
                   + " and ".join(f"{w.file} (blocks {stage_text(w.stages)})" for w in SHIPPED) + ")")
    return p


def _embedded(cfg: ev.EvalConfig) -> bool:
    return cfg.model == ev.EvalConfig.model and cfg.checkpoint is None and not cfg.flops_only


def finetuned_plans(cfg: ev.EvalConfig, opts: ATSEvalConfig) -> list[tuple[Path, tuple[Run, ...]]]:
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
            raise ValueError(f"--stages {stage_text(run.stages)}: {name} has blocks 0..{geom.depth - 1}")
        if run.k > geom.num_tokens:
            raise ValueError(f"--k {run.k:g} exceeds the {geom.num_tokens} tokens (CLS included) of {name}")


def build_settings(cfg, opts, model, finetuned, loader, spec) -> list[ev.Setting]:
    """Dense first, then every ATS configuration on the given weights and on each ``(model, runs, file name)`` of
    ``finetuned``."""
    from . import figures  # matplotlib: imported only where a pass over data draws figures

    geom = ViTGeometry.from_model(model)
    plans = [("", model, opts.runs(embedded=_embedded(cfg)), None)]
    plans += [("fine-tuned", m, runs, name) for m, runs, name in finetuned]
    for _, _, runs, _ in plans:
        _check_runs(runs, geom, cfg.model)
    dense_g = dense_gmacs(geom)
    shared = SharedBlocks({name or "": {min(run.stages) for run in runs} for _, _, runs, name in plans})
    settings = [ev.Setting("dense", "dense", "", {}, model, gflops=dense_g, paper=DENSE,
                           step=lambda x, y, i: (model.forward_head(model.norm(shared.hidden("", model, x, i,
                                                                                             geom.depth))),
                                                torch.tensor(dense_g)))]
    for tag, base, runs, name in plans:
        for run in runs:
            paper = dict(run.paper_finetuned if tag else run.paper)
            if tag and not paper and run.stages == MULTI and run.k in FINETUNED:
                paper = FINETUNED[run.k]
            m = _patched(base, run, cfg.seed)
            bound = upper_bound_gmacs(geom, m.record.config)
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
    model, stages = s.model, s.model.record.config.stages
    first = min(stages)
    counts, kept, on_object, at_random = [], {}, [], []

    def step(images, labels, index):
        h = shared.hidden(weights, model, images, index, first)
        logits = model.forward_head(model.forward_features(images, hidden=h, start=first))
        info = model.record
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

    s.step, s.finish = step, finish


def command(args: argparse.Namespace) -> int:
    cfg, opts = ev.EvalConfig.from_args(args), ATSEvalConfig.from_args(args)
    if video_evaluate.wants_video(cfg):  # clips: 1 x 3 views, Tables 2 / 3 / A.2
        return video_evaluate.evaluate_clips(cfg, opts)
    ev.prepare_outputs(cfg)
    model = ev.load_model(cfg)
    try:
        patch.check_structure(model)
    except TypeError as e:
        raise ValueError(f"{cfg.model}: {e}") from None
    finetuned = [(load_checkpoint(copy.deepcopy(model), path).eval(), runs, path.name)
                 for path, runs in finetuned_plans(cfg, opts)]
    if opts.preset:
        print(PRESETS[opts.preset][0])
    title = f"ATS on {cfg.model}, {cfg.data}: top-1 vs GFLOPs"
    ev.harness(cfg, opts, model, lambda loader, spec: build_settings(cfg, opts, model, finetuned, loader, spec),
           figure_patterns=("hist_*.png", "tokens_*.png"), sweep_title=title)
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(build_parser(), command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
