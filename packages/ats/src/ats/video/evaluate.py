"""The video side of ``ats-eval`` (Tables 2, 3 and A.2 of the ATS paper), on :mod:`vitbench.evaluation`.

Clips are tested as the papers do, 1 temporal x 3 spatial views: the views are folded into the batch, the
softmax is averaged over them (:func:`vitbench.video.views_forward`) and a clip's GFLOPs are the sum over its
views of the counts :func:`ats.video.flops.recorded_gmacs` makes from the tokens ATS kept. The flags are the
image path's (``--rho`` / ``--k``, ``--stages``, ``--mode``, ``--checkpoint``, ``--finetuned``, ``--limit``,
``--no-throughput``, ...); ``--batch-size`` and ``--throughput-batch`` count clips. Video data without
``--model`` selects the embedded ``xvit_digits_patch8_64``; without ``--checkpoint`` it runs on its shipped
weights, with the shipped ATS fine-tuned weights as a second series.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import timm
import torch
from vitbench import evaluation as ev
from vitbench.figures import save
from vitbench.video import is_video, views_forward

from ..options import WEIGHTS as WEIGHTS_DIR
from ..options import ATSEvalConfig, figure_slug, given_finetuned
from ..paper import MULTI, VIDEO, Run, stage_text
from ..patch import schedule
from .checkpoint import load_video_checkpoint
from .flops import VIEWS, VideoGeometry, clip_gmacs, recorded_gmacs
from .models import VIDEO_MODELS, VideoTransformer
from .patch import STAGES, apply

EMBEDDED_MODEL = "xvit_digits_patch8_64"
SHIPPED_MODELS = (EMBEDDED_MODEL, "timesformer_digits_patch8_64")  # dense and ATS fine-tuned weights in ats/weights
WEIGHTS = WEIGHTS_DIR / f"{EMBEDDED_MODEL}.safetensors"
FINETUNED_WEIGHTS = WEIGHTS_DIR / f"{EMBEDDED_MODEL}_ats.safetensors"


def shipped_weights(name: str, finetuned: bool = False) -> Path:
    """Where the shipped dense (or ATS fine-tuned) weights of an embedded video model live."""
    return WEIGHTS_DIR / f"{name}{'_ats' if finetuned else ''}.safetensors"
DEFAULT_RHO = (1.0,)  # K = all tokens: the setting the ATS weights are fine-tuned in (App. E.4)


def wants_video(cfg: ev.EvalConfig) -> bool:
    """Whether ``ats-eval`` runs the video path: a video model or video data."""
    return cfg.model in VIDEO_MODELS or is_video(cfg.data)


def check_inputs(cfg: ev.EvalConfig, opts: ATSEvalConfig) -> None:
    if cfg.model not in VIDEO_MODELS:
        raise ValueError(f"{cfg.data} is video data: give a video --model ({', '.join(sorted(VIDEO_MODELS))})")
    if not is_video(cfg.data):
        raise ValueError(f"{cfg.model} is a video model: give --data moving-digits or --data videofolder:PATH")
    if opts.preset or opts.variant:
        raise ValueError("--preset and --variant are the image tables and ablations; video takes --rho/--k")
    if cfg.pretrained:
        raise ValueError(f"no pretrained weights are shipped for {cfg.model}; give --checkpoint PATH (the authors' "
                         ".pyth, loaded through ats.video.load_released, or an ats-train output)")


def create_model(cfg: ev.EvalConfig) -> VideoTransformer:
    """``cfg.model`` (``--num-classes``, ``--img-size`` applied), weights not loaded yet."""
    kwargs = {k: v for k, v in (("num_classes", cfg.num_classes), ("img_size", cfg.img_size)) if v is not None}
    model = timm.create_model(cfg.model, **kwargs)
    ev.check_img_size(model, cfg.img_size)
    return model.eval()


def load_weights(cfg: ev.EvalConfig, model: VideoTransformer) -> VideoTransformer:
    """``--checkpoint`` (any layout :func:`ats.load_video_checkpoint` reads) or, for the embedded model,
    its shipped weights; nothing with ``--flops-only``."""
    if cfg.flops_only:
        return model
    path = cfg.checkpoint
    if path is None and cfg.model in SHIPPED_MODELS and cfg.num_classes is None and cfg.img_size is None:
        weights = shipped_weights(cfg.model)
        if not weights.is_file():
            raise FileNotFoundError(f"the embedded video weights are not installed ({weights}); train them with "
                                    "ats-train (see the ATS README, Video) or pass --checkpoint")
        path = weights
    if path is None:
        raise ValueError(f"no weights for {cfg.model}: give --checkpoint PATH")
    return load_video_checkpoint(model, str(path)).eval()


def runs(opts: ATSEvalConfig, model: VideoTransformer, paper: tuple | None) -> list[Run]:
    """The ATS configurations: ``--stages`` (default: the paper's blocks for the model), ``--rho`` / ``--k``
    (default rho 1), checked against the model's blocks and tokens before any data is read."""
    stages = STAGES[model.arch] if opts.stages == MULTI else opts.stages
    values = opts.k or opts.rho or DEFAULT_RHO
    tokens = 1 + model.num_frames * model.grid[0] * model.grid[1]
    for v in values:
        if v > 1 and v > tokens:
            raise ValueError(f"--k {v:g} exceeds the {tokens} patch tokens + CLS of a {model.num_frames}-frame view")
        schedule(stages, v if v <= 1 else None, v if v > 1 else None, len(model.blocks))
    ats_paper = () if paper is None else (("top1", paper[2][0]), ("gflops", paper[2][1]))
    return [Run(tuple(stages), float(v), opts.mode, series="ATS", paper_finetuned=ats_paper) for v in values]


def finetuned_path(cfg: ev.EvalConfig, opts: ATSEvalConfig) -> Path | None:
    given = given_finetuned(opts)
    if given is not None:
        return given
    if cfg.model in SHIPPED_MODELS and cfg.checkpoint is None and not cfg.flops_only:
        weights = shipped_weights(cfg.model, finetuned=True)
        if weights.is_file():
            return weights
        ev.status(f"no fine-tuned ATS weights shipped ({weights.name}); fine-tuned rows skipped")
    return None


def _fold(model):
    """What the timing run calls: a batch of clips' views folded into the batch."""
    return lambda clips: model(clips.flatten(0, 1))


def build_settings(cfg, model, finetuned, ats_runs, paper, loader) -> list[ev.Setting]:
    """Dense first, then every ATS configuration on the given weights and, with ``finetuned``, on those."""
    geom = VideoGeometry.from_model(model)
    dense_g = VIEWS * float(clip_gmacs(geom)[0])
    dense_paper = {} if paper is None else {"top1": paper[1][0], "gflops": paper[1][1]}
    settings = [ev.Setting("dense", "dense", "", {"views": VIEWS}, model, gflops=dense_g, paper=dense_paper,
                           step=lambda x, y, i: (views_forward(model, x), torch.tensor(dense_g)),
                           timed=_fold(model))]
    bases = [("", model)] + ([("fine-tuned", finetuned)] if finetuned is not None else [])
    for tag, base in bases:
        for r in ats_runs:
            m = apply(copy.deepcopy(base), stages=r.stages, mode=r.mode, **r.size).eval()
            series = r.series_for(tag or ("off-the-shelf" if finetuned is not None else ""))
            s = ev.Setting("ats", series, r.point, {**r.params(), "views": VIEWS, "weights": tag or "given"}, m,
                           paper=dict(r.paper_finetuned) if tag else {}, timed=_fold(m))
            if loader is not None:
                _attach_probe(s, cfg)
            settings.append(s)
    return settings


def _attach_probe(s: ev.Setting, cfg: ev.EvalConfig) -> None:
    """Per batch: view-averaged logits, per-clip GMACs summed over the views, kept patches per frame; after the
    pass the token statistics and the kept-tokens-over-frames figure."""
    model, stages = s.model, s.model.record.config.stages
    counts, per_frame = [], []

    def step(clips, labels, index):
        logits = views_forward(model, clips)
        info = model.record
        B = clips.shape[0]
        counts.append(torch.stack([info.tokens_out[b] for b in stages], -1).reshape(B, -1, len(stages)).cpu())
        per_frame.append(torch.stack([info.kept_per_frame(b) for b in stages], 1).reshape(B, -1, len(stages),
                                                                                            model.num_frames).cpu())
        return logits, recorded_gmacs(model).reshape(B, -1).sum(1)

    def finish(row: dict, out_dir: Path) -> None:
        c = torch.cat(counts).double().flatten(0, 1)  # [clips x views, stages]
        f = torch.cat(per_frame).double().flatten(0, 1)  # [clips x views, stages, T]
        row["extra"].update({"tokens_out_mean": c.mean(0).tolist(), "tokens_out_min": c.amin(0).int().tolist(),
                             "tokens_out_max": c.amax(0).int().tolist(),
                             "kept_per_frame_mean": f.mean(0).tolist()})
        slug = figure_slug(s.label)
        title = f"{cfg.model} + {s.label}, {cfg.data} ({row['images']} clips x {VIEWS} views)"
        row["figures"]["frames"] = str(kept_over_frames(f, stages, model.grid[0] * model.grid[1],
                                                        out_dir / f"frames_{slug}.png", title))

    s.step, s.finish = step, finish


def kept_over_frames(per_frame: torch.Tensor, stages, patches: int, path: Path, title: str) -> Path:
    """Kept patch tokens of every frame (mean over views, band: 10th-90th percentile), one line per ATS block."""
    import matplotlib.pyplot as plt  # deferred: only a pass over data draws figures

    fig, ax = plt.subplots(figsize=(7.2, 3.8))
    frames = torch.arange(per_frame.shape[-1])
    for j, block in enumerate(stages):
        values = per_frame[:, j]
        line, = ax.plot(frames, values.mean(0), marker="o", markersize=3, label=f"block {block}")
        lo, hi = values.quantile(0.1, 0), values.quantile(0.9, 0)
        ax.fill_between(frames, lo, hi, color=line.get_color(), alpha=0.12)
    ax.axhline(patches, color="black", lw=0.8, ls="--", label=f"all {patches} patches")
    ax.set_xlabel("frame")
    ax.set_ylabel("patch tokens kept (mean over views)")
    ax.set_ylim(0, patches * 1.05)
    ax.set_title(f"{title}\nkept tokens over frames per ATS block (band: 10th-90th percentile)", fontsize=8)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # beside, not over, the curves
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save(fig, path)


def evaluate_clips(cfg: ev.EvalConfig, opts: ATSEvalConfig) -> int:
    """``ats-eval`` on video data or a video model."""
    if is_video(cfg.data) and cfg.model == ev.EvalConfig.model:  # video data, no --model: the embedded one
        cfg = dataclasses.replace(cfg, model=EMBEDDED_MODEL)
        ev.status(f"video data: model {EMBEDDED_MODEL}")
    check_inputs(cfg, opts)
    ev.prepare_outputs(cfg)
    model = create_model(cfg)
    paper = VIDEO.get((cfg.model, model.num_classes))
    ats_runs = runs(opts, model, paper)
    load_weights(cfg, model)
    path = finetuned_path(cfg, opts)
    finetuned = None if path is None else load_video_checkpoint(copy.deepcopy(model), str(path)).eval()
    if paper is not None:
        ev.status(f"paper: {paper[0]}, 1 x 3 views")
    title = (f"ATS on {cfg.model} (blocks {stage_text(ats_runs[0].stages)}), {cfg.data}, 1 x {VIEWS} views: "
             "top-1 vs GFLOPs per clip")
    ev.harness(cfg, opts, model, lambda loader, spec: build_settings(cfg, model, finetuned, ats_runs, paper, loader),
           figure_patterns=("frames_*.png",), sweep_title=title, sweep_unit="clip")
    return 0
