"""``ats-eval``: accuracy, mean per-image GFLOPs, throughput, kept-token histograms and visualisations of ATS.

Without arguments it evaluates the embedded default (``vit_digits_patch8_112`` with its shipped weights on the
embedded digits), all rows timed against the dense model in one run: off the shelf with the released
configuration (blocks 3..11) at rho 1 / 0.87 / 0.72 (the paper's 3.0 / 2.5 / 2.0 GFLOPs levels on DeiT-S, Fig. 5)
and at rho 1 in blocks 7..11 (the placement whose GFLOPs share is nearest the paper's 2.9 / 4.6), and with the
shipped fine-tuned weights at the configurations they were trained for: blocks 3..11 at rho 1 (Table 1) and
blocks 7..11 at rho 1 / 0.87 / 0.72. ``--finetuned PATH`` evaluates other fine-tuned weights next to the given
ones. ``--rho`` / ``--k`` give another sweep (shipped fine-tuned weights trained at the same ``--stages`` join it),
``--preset`` a paper table with its reported numbers, ``--flops-only`` the data-free upper bound (exact for
single-stage ATS at an absolute K). ``--baselines evit`` adds EViT (static token pruning, keep 0.7) and EViT + ATS
(Table A.5) on the embedded backbone, off the shelf and fine-tuned (:mod:`ats.baselines`); ``--model
evit_deit_small_patch16_224`` evaluates EViT-DeiT-S and ATS inside it (``--k-rule``). Video data (``--data
moving-digits``: the embedded X-ViT; ``--data videofolder:PATH`` with a Kinetics ``--model`` and ``--checkpoint``)
runs on 1 x 3 views
(:mod:`ats.video.evaluate`). Rows on the same weights run the dense blocks before their first ATS stage once per batch
(:class:`SharedBlocks`); the timing run times every row's whole forward.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from pathlib import Path

import torch
from vitbench import cli
from vitbench import evaluation as ev
from vitbench.localization import on_box_share, random_share
from vitbench.video import is_video

from . import backbones, baselines, patch
from .backbones import evit
from .flops import dense_gmacs, per_image_gmacs, upper_bound_gmacs
from .options import (BASELINES, SHIPPED, SHIPPED_ATS, ATSEvalConfig, figure_slug, given_finetuned,
                      parse_stages, shipped_dense)
from .paper import (DEFAULT_RHO, FINETUNED, MULTI, PRESETS, Run, cvt_finetuned_paper, dense_paper,
                    evit_finetuned_paper, reports_deit_s, stage_text)
from .video import evaluate as video_evaluate


def build_parser() -> argparse.ArgumentParser:
    d = ATSEvalConfig()
    p = ev.build_parser("ats-eval", __doc__, "runs/ats-eval")
    g = p.add_argument_group("ATS")
    g.add_argument("--stages", type=parse_stages, default=d.stages,
                   help="ATS blocks, 0-based: 3-11, 3 or 0,3,6 (default: 3-11; TimeSformer: 3-5; CvT: stage 3's "
                   "blocks, stage-local, default 0-8)")
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
    g.add_argument("--k-rule", choices=evit.K_RULES, default=d.k_rule,
                   help="EViT + ATS (--model evit_*, --baselines evit): how rho sets K_n of Table A.5's K_n = "
                   "round(0.7 x input tokens): evit = rho x the tokens EViT alone gives block n (98, 98, 70, 70, 50, "
                   "50 at 224 px), compound = rho x the tokens that actually enter it (default: %(default)s)")
    g.add_argument("--baselines", nargs="+", choices=BASELINES, default=[],
                   help="on the embedded default, add EViT at keep 0.7 (off the shelf and the shipped fine-tuned "
                   "weights) and EViT + ATS (Table A.5, off the shelf and fine-tuned) to the rows (default: none)")
    return p


def _embedded(cfg: ev.EvalConfig) -> bool:
    return cfg.model == ev.EvalConfig.model and cfg.checkpoint is None and not cfg.flops_only


def finetuned_plans(cfg: ev.EvalConfig, opts: ATSEvalConfig,
                    runs: tuple[Run, ...] | None = None) -> list[tuple[Path, tuple[Run, ...]]]:
    """The fine-tuned weights to evaluate and the runs for each: ``--finetuned`` at the requested runs (``runs``,
    default ``opts.runs()``); on the embedded default, each shipped file at its own runs (no arguments) or at the
    requested runs when it was trained at the requested ``--stages``; on another embedded backbone (the CvT) its
    shipped file at ``runs`` when they are at its stages."""
    runs = opts.runs() if runs is None else runs
    given = given_finetuned(opts)
    if given is not None:
        return [(given, runs)]
    if cfg.model in SHIPPED_ATS:
        w = SHIPPED_ATS[cfg.model]
        if cfg.checkpoint is not None or cfg.flops_only or any(r.stages != w.stages for r in runs):
            return []
        if w.path.is_file():
            return [(w.path, runs)]
        ev.status(f"no fine-tuned ATS weights shipped for {cfg.model} yet ({w.file}); its fine-tuned rows skipped")
        return []
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


def load_model(cfg: ev.EvalConfig) -> torch.nn.Module:
    """The dense model as given, in eval mode: vitbench's loader, or for a backbone that reads its own checkpoints
    (a CvT: official / HuggingFace layouts) :func:`ats.backbones.load_weights` with ``--checkpoint`` or the shipped
    weights of an embedded one."""
    if not backbones.for_name(cfg.model).owns_weights:
        return ev.load_model(cfg)
    if cfg.pretrained:
        raise ValueError(f"timm has no pretrained weights for {cfg.model}; give --checkpoint PATH "
                         "(the authors' weights: official or HuggingFace CvT, released PS-ViT)")
    model = ev.load_model(dataclasses.replace(cfg, checkpoint=None, flops_only=True))  # built, not loaded
    if cfg.flops_only:
        return model
    return backbones.load_weights(model, cfg.checkpoint or shipped_dense(cfg.model)).eval()


def model_runs(cfg: ev.EvalConfig, opts: ATSEvalConfig) -> tuple[Run, ...]:
    """The ATS configurations for ``cfg.model``: :meth:`ATSEvalConfig.runs` on a ViT; on another backbone (CvT) rho 1
    (K = N) and the requested ``--rho`` / ``--k`` (default 1 / 0.87 / 0.72) in ``--stages`` (default: the backbone's,
    :attr:`ats.backbones.Backbone.stages`), the paper's fine-tuned point on rho 1 at the paper's placement."""
    family = backbones.for_name(cfg.model)
    default = family.stages
    if default == MULTI:
        runs = opts.runs(embedded=_embedded(cfg))
        if reports_deit_s(cfg.model, cfg.img_size):
            return runs
        return tuple(dataclasses.replace(r, paper=(), paper_finetuned=()) for r in runs)  # DeiT-S's numbers
    if opts.preset:
        raise ValueError(f"--preset {opts.preset} is a DeiT-S configuration; drop it for {cfg.model}")
    stages = default if opts.stages == MULTI else opts.stages
    paper_ft = (cvt_finetuned_paper(cfg.model) or evit_finetuned_paper(cfg.model)) if stages == default and \
        not opts.variant and dense_paper(cfg.model, cfg.img_size) else ()
    series = "ATS " + "+".join(opts.variant) if opts.variant else "ATS"
    series += f" k-rule {opts.k_rule}" if family.takes_k_rule else ""  # how rho sets an EViT's K_n
    at = family.rho  # the paper's fine-tuned point: rho 1 (CvT), 0.7 (EViT, Table A.5)
    sweep = opts.k or opts.rho or family.sweep(DEFAULT_RHO)
    return tuple(Run(tuple(stages), v, opts.mode, opts.variant, series, paper_finetuned=paper_ft if v == at else ())
                 for v in dict.fromkeys((1.0, *map(float, sweep))))


def _patched(model, run: Run, seed: int, k_rule: str = "evit"):
    return backbones.apply(copy.deepcopy(model), stages=run.stages, mode=run.mode, variant=run.variant, seed=seed,
                           **run.size, **backbones.for_model(model).options(k_rule)).eval()


def _check_runs(runs, geom, name: str, scope: str = "blocks") -> None:
    for run in runs:
        if any(s >= geom.depth for s in run.stages):
            raise ValueError(f"--stages {stage_text(run.stages)}: {name} has {scope} 0..{geom.depth - 1}")
        if run.k > geom.num_tokens:
            raise ValueError(f"--k {run.k:g} exceeds the {geom.num_tokens} tokens (CLS included) of {name}")


def dense_settings(cfg, model, base, geom, shared: SharedBlocks) -> list[ev.Setting]:
    """The dense row (the model as given, the paper's dense numbers beside it) and, when ATS runs on another
    model (a CvT's linear stage 3, weights folded), that model dense: what ATS starts from."""
    dense_g, paper = dense_gmacs(backbones.geometry(model)), dense_paper(cfg.model, cfg.img_size)

    def on_base(gflops):
        return lambda x, y, i: (backbones.for_model(base).head(base, shared.hidden("", base, x, i, geom.depth)),
                                torch.tensor(gflops))

    if base is model:
        return [ev.Setting("dense", "dense", "", {}, model, gflops=dense_g, paper=paper,
                           step=on_base(dense_g))]
    linear_g = dense_gmacs(geom)
    return [ev.Setting("dense", "dense", "", {"weights": "given"}, model, gflops=dense_g, paper=paper,
                       step=lambda x, y, i: (model(x), torch.tensor(dense_g))),
            ev.Setting("dense", "dense linear stage 3", "", {"weights": "folded"}, base, gflops=linear_g,
                       step=on_base(linear_g))]


def build_settings(cfg, opts, model, finetuned, loader, spec, base=None, runs=None) -> list[ev.Setting]:
    """Dense first, then every ATS configuration (``runs``, default :meth:`ATSEvalConfig.runs`) on ``base`` (the
    model ATS samples in, default ``model``) and on each ``(model, runs, file name)`` of ``finetuned``. Without
    data or fine-tuned weights, a paper's fine-tuned point (``Run.paper_finetuned``) gets a row at its data-free
    count."""
    from . import figures  # matplotlib: imported only where a pass over data draws figures

    base = model if base is None else base
    runs = opts.runs(embedded=_embedded(cfg)) if runs is None else runs
    family = backbones.for_model(base)
    geom = family.geometry(base)
    plans = [("", base, runs, None)]
    plans += [("fine-tuned", m, r, name) for m, r, name in finetuned]
    reference = tuple(r for r in runs if r.paper_finetuned)
    if cfg.flops_only and not finetuned and reference and family is not backbones.VIT:  # CvT, PS-ViT, EViT
        plans.append(("fine-tuned", base, reference, None))
    for _, _, rs, _ in plans:
        _check_runs(rs, geom, cfg.model, family.scope)
    shared = SharedBlocks({name or "": {family.resume_point(w, run.stages) for run in rs}
                           for _, w, rs, name in plans})
    settings = dense_settings(cfg, model, base, geom, shared)
    for tag, weights, rs, name in plans:
        for run in rs:
            paper = dict(run.paper_finetuned if tag else run.paper)
            if tag and not paper and run.stages == MULTI and run.k in FINETUNED and reports_deit_s(cfg.model,
                                                                                                     cfg.img_size):
                paper = FINETUNED[run.k]
            m = _patched(weights, run, cfg.seed, opts.k_rule)
            bound = upper_bound_gmacs(geom, m.record.config)
            params = {**run.params(), "weights": tag or "given", **({"weights_file": name} if name else {}),
                      **family.options(opts.k_rule)}
            series = run.series_for(tag or ("off-the-shelf" if len(plans) > 1 else ""))
            s = ev.Setting("ats", series, run.point, params, m, gflops=bound, paper=paper,
                           extra={"gflops_upper_bound": bound})
            if loader is not None:
                _attach_probe(s, geom, set(cfg.visualize), loader, spec, figures, cfg, shared, name or "")
            settings.append(s)
    if "evit" in opts.baselines:  # EViT and EViT + ATS beside ATS (Table A.5)
        probe = None if loader is None else (lambda s, g, key: _attach_probe(s, g, set(cfg.visualize), loader, spec,
                                                                             figures, cfg, shared, key))
        settings += baselines.evit_settings(shared, opts.k_rule, cfg.seed, probe)
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
    first = backbones.for_model(model).resume_point(model, stages)
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
        if kept and not (spec.img_size % geom.grid[0] or spec.img_size % geom.grid[1]):  # maps need whole cells
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
    if opts.baselines and not _embedded(cfg):
        raise ValueError(f"--baselines {' '.join(opts.baselines)} runs on the embedded default only (no --model, "
                         "--checkpoint or --flops-only); for EViT on ImageNet give --model evit_deit_small_patch16_224")
    ev.prepare_outputs(cfg)
    model = load_model(cfg)
    base = backbones.linear_variant(model)  # what ATS samples in: a CvT's linear stage 3 (folded), a ViT itself
    try:
        backbones.check_structure(base)
    except TypeError as e:
        raise ValueError(f"{cfg.model}: {e}") from None
    runs = model_runs(cfg, opts)
    plan_runs = None if backbones.for_name(cfg.model).stages == MULTI else runs  # a ViT's files: opts.runs()
    finetuned = [(backbones.load_weights(copy.deepcopy(base), path).eval(), r, path.name)
                 for path, r in finetuned_plans(cfg, opts, plan_runs)]
    if opts.preset:
        print(PRESETS[opts.preset][0])
    title = f"ATS on {cfg.model}, {cfg.data}: top-1 vs GFLOPs"
    ev.harness(cfg, opts, model,
               lambda loader, spec: build_settings(cfg, opts, model, finetuned, loader, spec, base, runs),
               figure_patterns=("hist_*.png", "tokens_*.png"), sweep_title=title)
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(build_parser(), command, argv, check=check_input)


def check_input(args: argparse.Namespace) -> None:
    """``--img-size`` against the model that will run (video data without ``--model``: the embedded X-ViT), before
    any work; the embedded models' shipped weights take their own size only."""
    model = args.model
    if model == ev.EvalConfig.model and is_video(args.data):
        model = video_evaluate.EMBEDDED_MODEL
    cli.check_eval_input(args, model, shipped=model in (ev.EvalConfig.model, video_evaluate.EMBEDDED_MODEL)
                         or cli.has_shipped_weights(model))


if __name__ == "__main__":
    raise SystemExit(main())
