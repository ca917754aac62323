"""``ats-eval``: accuracy, mean per-image GFLOPs, throughput, kept-token histograms and visualisations of ATS.

Without arguments it evaluates the embedded default (``--data digits --model vit_digits_patch8_112 --pretrained``)
with the released configuration (blocks 3..11) at rho 1 / 0.87 / 0.72 (the paper's 3.0 / 2.5 / 2.0 GFLOPs levels
on DeiT-S, Fig. 5), timed against the dense model in the same run. Give ``--rho`` or ``--k`` values for another
sweep (accuracy vs GFLOPs curve, paper Figs. 4/5), ``--preset`` for a paper table with its reported numbers, and
``--flops-only`` for the data-free upper bound (exact for single-stage ATS at an absolute K).
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import patch
from .flops import dense_gmacs, per_image_gmacs, upper_bound_gmacs

MULTI = tuple(range(3, 12))
DEFAULT_RHO = (1.0, 0.87, 0.72)


@dataclass(frozen=True)
class Run:
    """One ATS configuration to evaluate, with the paper's numbers when it is a paper setting."""

    name: str
    stages: tuple[int, ...]
    k: float
    mode: str = "official"
    variant: tuple[str, ...] = ()
    series: str = "ATS"
    paper_top1: float | None = None
    paper_gflops: float | None = None

    def config(self) -> patch.ATSConfig:
        return patch.ATSConfig(self.stages, (self.k,) * len(self.stages), self.mode, frozenset(self.variant))


def _ms(rho, top1=None, g=None, series="multi-stage", **kw) -> Run:
    return Run(f"multi-stage rho={rho:g}", MULTI, rho, series=series, paper_top1=top1, paper_gflops=g, **kw)


def _ss(k, stage=3, top1=None, g=None, series="single-stage", **kw) -> Run:
    return Run(f"stage {stage} K={k:g}", (stage,), k, series=series, paper_top1=top1, paper_gflops=g, **kw)


# Paper numbers: Table 1, Tables A.1/A.3/A.4, Fig. 5 and Fig. A.1 (text; the figures' other points are not
# printed in the paper, so only their GFLOPs levels are given). DeiT-S dense: 79.8 top-1, 4.6 GFLOPs.
PRESETS: dict[str, tuple[str, list[Run]]] = {
    "table1": ("Table 1: fine-tuned multi-stage DeiT-S+ATS (use the fine-tuned checkpoint)",
               [_ms(1.0, 79.7, 2.9)]),
    "table-a1": ("Table A.1: throughput of DeiT-S+ATS vs DeiT-S (paper: 1403 vs 1010 img/s on an RTX6000)",
                 [_ms(1.0, 79.7, 2.9)]),
    "table-a3": ("Table A.3 / Fig. 5a: top-K vs inverse transform sampling (both fine-tuned)",
                 [_ms(0.865, 78.9, 2.9, series="top-K", variant=("topk",)), _ms(1.0, 79.7, 2.9)]),
    "fig5a": ("Fig. 5a: top-K (fixed rate, K_n = round(rho N_n)) vs inverse transform sampling, not fine-tuned",
              [_ms(0.865, None, 3.0, series="top-K", variant=("topk",)),
               _ms(0.79, None, 2.5, series="top-K", variant=("topk",)),
               _ms(0.665, None, 2.0, series="top-K", variant=("topk",)),
               _ms(1.0, 79.2, 3.0), _ms(0.87, None, 2.5), _ms(0.72, None, 2.0)]),
    "table-a4": ("Table A.4: ATS placement at ~3 GFLOPs, not fine-tuned",
                 [_ss(130, 0, 73.1, 3.0), _ss(108, 3, 78.5, 3.0), _ss(56, 6, 77.4, 3.0), _ms(1.0, 79.2, 3.0)]),
    "fig5b": ("Fig. 5b: multi-stage, not fine-tuned vs fine-tuned (run once per checkpoint)",
              [_ms(1.0, None, 3.0), _ms(0.87, None, 2.5), _ms(0.72, None, 2.0)]),
    "fig5c": ("Fig. 5c: single-stage (block 3) vs multi-stage (blocks 3..11)",
              [_ss(108, 3, None, 3.0), _ss(78, 3, None, 2.5), _ss(48, 3, None, 2.0),
               _ms(1.0, 79.2, 3.0), _ms(0.87, None, 2.5), _ms(0.72, None, 2.0)]),
    "fig-a1": ("Fig. A.1: single-stage K sweep, fine-tuned (paper: K=48 -> 75% at 2 GFLOPs)",
               [_ss(108, 3, None, 3.0), _ss(78, 3, None, 2.5), _ss(48, 3, 75.0, 2.0)]),
}


@dataclass(frozen=True)
class EvalConfig:
    data: str = "digits"
    model: str = "vit_digits_patch8_112"
    pretrained: bool = False
    checkpoint: str | None = None
    stages: tuple[int, ...] = MULTI
    rho: tuple[float, ...] = ()
    k: tuple[float, ...] = ()
    mode: str = "official"
    variant: tuple[str, ...] = ()
    preset: str | None = None
    flops_only: bool = False
    batch_size: int = 64
    limit: int | None = None
    num_workers: int = 2
    img_size: int | None = None
    crop_pct: float | None = None
    throughput: bool = True
    throughput_batch: int = 32
    repeats: int = 5
    visualize: tuple[int, ...] = (0, 1, 2, 3)
    output_dir: str = "runs/ats_eval"
    json: str | None = None
    cpu: bool = False
    runs: tuple[Run, ...] = field(default=(), repr=False)

    def __post_init__(self):
        if self.rho and self.k:
            raise ValueError("give --rho or --k, not both")
        if any(not 0 < r <= 1 for r in self.rho):
            raise ValueError(f"--rho values must be in (0, 1], got {self.rho}")
        if any(k < 2 for k in self.k):
            raise ValueError(f"--k values must be >= 2, got {self.k}")
        if self.batch_size < 1 or self.throughput_batch < 1 or self.repeats < 1:
            raise ValueError("--batch-size, --throughput-batch and --repeats must be >= 1")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown --preset {self.preset!r}; choose from {sorted(PRESETS)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError("--limit must be >= 1")

    def build_runs(self) -> tuple[Run, ...]:
        if self.preset:
            return tuple(PRESETS[self.preset][1])
        values = self.k or self.rho or DEFAULT_RHO
        series = "+".join(self.variant) or "ATS"
        label = "K" if self.k else "rho"
        return tuple(Run(f"{series} stages={_stage_text(self.stages)} {label}={v:g}", self.stages, float(v),
                         self.mode, self.variant, series) for v in values)


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
    d = EvalConfig()
    p = argparse.ArgumentParser(prog="ats-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--data", default=d.data, help="digits | imagefolder:PATH | hf:NAME[:CONFIG] | arrow:PATH")
    g.add_argument("--model", default=d.model, help="timm ViT with a CLS token")
    g.add_argument("--pretrained", action="store_true",
                   help="timm's pretrained weights (implied for the embedded default model without --checkpoint)")
    g.add_argument("--checkpoint", default=None, help="local .safetensors/.pth weights (e.g. an ats-train output)")
    g.add_argument("--img-size", type=int, default=None)
    g.add_argument("--crop-pct", type=float, default=None, help="eval crop (default: 0.875 ImageNet, 1.0 digits)")
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--limit", type=int, default=None, help="evaluate only the first N validation images")
    g.add_argument("--num-workers", type=int, default=d.num_workers)
    g.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is present")
    g = p.add_argument_group("ATS")
    g.add_argument("--stages", type=parse_stages, default=d.stages, help="ATS blocks, 0-based (default 3-11)")
    g.add_argument("--rho", type=float, nargs="+", default=[],
                   help="K_n = max(round(rho*N_n), 8); several = sweep (default 1 0.87 0.72)")
    g.add_argument("--k", type=float, nargs="+", default=[], help="absolute K per stage (counts the CLS); sweep")
    g.add_argument("--mode", choices=patch.MODES, default=d.mode, help="released-code or paper selection")
    g.add_argument("--variant", nargs="+", default=[], choices=patch.VARIANTS, help="ablations (Figs. 3/5a/A.4)")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a paper table/figure's configurations, printed next to the paper's numbers: "
                   + "; ".join(f"{k}: {v[0]}" for k, v in PRESETS.items()))
    g.add_argument("--flops-only", action="store_true",
                   help="no data: GFLOPs when every stage keeps K_n tokens (exact for single-stage absolute K)")
    g = p.add_argument_group("outputs")
    g.add_argument("--throughput", action=argparse.BooleanOptionalAction, default=d.throughput,
                   help="time every configuration against the dense model in the same run (default on)")
    g.add_argument("--throughput-batch", type=int, default=d.throughput_batch)
    g.add_argument("--repeats", type=int, default=d.repeats, help="timed repeats for --throughput")
    g.add_argument("--visualize", type=int, nargs="*", default=list(d.visualize),
                   help="validation indices to draw the kept tokens of (Figs. 2/7); none to skip")
    g.add_argument("--output-dir", default=d.output_dir, help="figures and results.json go here")
    g.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p


def config_from_args(ns: argparse.Namespace) -> EvalConfig:
    embedded_default = ns.model == EvalConfig.model and ns.checkpoint is None
    cfg = EvalConfig(ns.data, ns.model, ns.pretrained or embedded_default, ns.checkpoint, tuple(ns.stages),
                     tuple(ns.rho), tuple(ns.k),
                     ns.mode, tuple(ns.variant), ns.preset, ns.flops_only, ns.batch_size, ns.limit, ns.num_workers,
                     ns.img_size, ns.crop_pct, ns.throughput, ns.throughput_batch, ns.repeats, tuple(ns.visualize),
                     ns.output_dir, ns.json, ns.cpu)
    runs = cfg.build_runs()
    return EvalConfig(**{**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__}, "runs": runs})


def load_model(cfg: EvalConfig):
    import vitbench

    kwargs = {"img_size": cfg.img_size} if cfg.img_size else {}
    if not (cfg.pretrained or cfg.checkpoint or cfg.flops_only):
        raise SystemExit(f"ats-eval: give --pretrained or --checkpoint PATH for {cfg.model}")
    try:
        return vitbench.create_model(cfg.model, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint, **kwargs).eval()
    except FileNotFoundError as e:
        raise SystemExit(f"ats-eval: {e}") from None
    except ValueError as e:
        raise SystemExit(f"ats-eval: {e}") from None


def flops_rows(cfg: EvalConfig, model) -> list[dict]:
    from vitbench.flops import ViTGeometry

    geom = ViTGeometry.from_model(model)
    rows = [{"name": "dense", "gflops_upper_bound": dense_gmacs(geom)}]
    for run in cfg.runs:
        try:
            run_cfg = run.config()
        except ValueError as e:
            raise SystemExit(f"ats-eval: {e}") from None
        if any(s >= geom.depth for s in run.stages):
            raise SystemExit(f"ats-eval: stages {run.stages} outside the model's {geom.depth} blocks")
        rows.append({"name": run.name, "gflops_upper_bound": upper_bound_gmacs(geom, run_cfg),
                     "paper_gflops": run.paper_gflops})
    return rows


def evaluate_run(model, loader, device, geom, keep_indices: set[int], img_size: int | None = None) -> dict:
    """One pass over ``loader``: top-1/top-5, per-image GMACs, per-block kept counts, kept tokens of chosen images,
    and on data with boxes (given ``img_size``) the share of the last stage's kept tokens on the object."""
    correct1 = correct5 = 0
    gmacs, counts, kept, on_object, at_random = [], [], {}, [], []
    from tqdm.auto import tqdm
    from vitbench.localization import on_box_share, random_share

    boxes_for = getattr(loader.dataset, "boxes_for", None) if img_size else None

    with torch.inference_mode():
        for images, labels, index in tqdm(loader, desc="eval", leave=False, file=sys.stderr):
            logits = model(images.to(device))
            labels = labels.to(device)
            top5 = logits.topk(min(5, logits.shape[-1]), -1).indices
            correct1 += (top5[:, 0] == labels).sum().item()
            correct5 += (top5 == labels[:, None]).any(-1).sum().item()
            info = getattr(model, "ats_info", None)
            if info is None:
                continue
            gmacs.append(per_image_gmacs(geom, info).cpu())
            counts.append(info.token_counts()[1].cpu())
            for j, i in enumerate(index.tolist()):
                if i in keep_indices:
                    kept[i] = {b: info.kept_indices(b)[j].cpu() for b in info.config.stages}
            boxes = boxes_for(index, img_size) if boxes_for else None
            if boxes is not None and info.config.stages:
                last = info.kept[info.config.stages[-1]].cpu()
                on_object.append(on_box_share(last, boxes, geom.grid, img_size))
                at_random.append(random_share(boxes, geom.grid, img_size))
    n = len(loader.dataset)
    out = {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "images": n}
    if gmacs:
        out.update(gmacs=torch.cat(gmacs), counts=torch.cat(counts), kept=kept)
    if on_object:
        out.update(on_object=100.0 * float(torch.cat(on_object).mean()),
                   on_object_random=100.0 * float(torch.cat(at_random).mean()))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        cfg = config_from_args(ns)
    except ValueError as e:
        parser.error(str(e))
    from vitbench.report import markdown_table, write_json

    model = load_model(cfg)
    try:
        patch._check_structure(model)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"ats-eval: {cfg.model}: {e}") from None
    out_dir = Path(cfg.output_dir)
    result: dict = {"config": {k: v for k, v in asdict(cfg).items() if k != "runs"},
                    "preset": PRESETS[cfg.preset][0] if cfg.preset else None}
    if cfg.flops_only:
        rows = flops_rows(cfg, model)
        result["rows"] = rows
        print(markdown_table(rows, ["name", "gflops_upper_bound", "paper_gflops"], digits=3))
        _write(result, cfg, out_dir, write_json)
        return 0
    rows = run_evaluation(cfg, model, out_dir)
    result["rows"] = rows
    if cfg.preset:
        print(f"\n{PRESETS[cfg.preset][0]}")
    columns = ["name", "top1", "paper_top1", "top5", "gflops", "gflops_upper_bound", "paper_gflops", "tokens_out"]
    if cfg.throughput:
        columns += ["img_s", "speedup", "ideal_speedup"]
    if any("on_object" in r for r in rows):
        columns += ["on_object", "on_object_random"]
    print(markdown_table(rows, columns, digits=2))
    _write(result, cfg, out_dir, write_json)
    return 0


def _write(result: dict, cfg: EvalConfig, out_dir: Path, write_json) -> None:
    write_json(out_dir / "results.json", result)
    if cfg.json:
        write_json(cfg.json, result)
    print(f"results: {out_dir / 'results.json'}" + (f" and {cfg.json}" if cfg.json else ""))


def run_evaluation(cfg: EvalConfig, model, out_dir: Path) -> list[dict]:
    import vitbench
    from vitbench.engine import resolve_input
    from vitbench.flops import ViTGeometry

    from . import figures

    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu")
    model = model.to(device)
    img_size, mean, std, dd = resolve_input(model, cfg.data, cfg.img_size)
    try:
        loader = vitbench.build_eval_loader(cfg.data, img_size, mean, std, batch_size=cfg.batch_size,
                                            crop_pct=cfg.crop_pct if cfg.crop_pct else dd.crop_pct,
                                            num_workers=cfg.num_workers, limit=cfg.limit)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"ats-eval: {e}") from None
    n_classes = len(loader.dataset.classes)
    if model.num_classes != n_classes:
        raise SystemExit(f"ats-eval: {cfg.model} has {model.num_classes} classes but {cfg.data} has {n_classes}")
    geom = ViTGeometry.from_model(model)
    dense = copy.deepcopy(model)
    keep = {i for i in cfg.visualize if i < len(loader.dataset)}
    base = evaluate_run(dense, loader, device, geom, set())
    rows = [{"name": "dense", "series": "dense", "top1": base["top1"], "top5": base["top5"],
             "gflops": dense_gmacs(geom), "gflops_upper_bound": dense_gmacs(geom), "images": base["images"]}]
    patched = patch.apply(model, stages=())
    timing_batch = next(iter(loader))[0][: cfg.throughput_batch].to(device) if cfg.throughput else None
    for run in cfg.runs:
        patched.ats_info = patch.ATSInfo(run.config())
        res = evaluate_run(patched, loader, device, geom, keep, img_size)
        counts = res["counts"].double()
        row = {"name": run.name, "series": run.series, "stages": list(run.stages), "k": run.k, "mode": run.mode,
               "variant": list(run.variant), "top1": res["top1"], "top5": res["top5"],
               "gflops": float(res["gmacs"].mean()), "gflops_upper_bound": upper_bound_gmacs(geom, run.config()),
               "paper_top1": run.paper_top1, "paper_gflops": run.paper_gflops, "images": res["images"],
               "tokens_out": " ".join(f"{counts[:, b].mean():.0f}" for b in run.stages),
               "tokens_out_mean": [float(counts[:, b].mean()) for b in run.stages],
               "tokens_out_min": [int(counts[:, b].min()) for b in run.stages],
               "tokens_out_max": [int(counts[:, b].max()) for b in run.stages]}
        if "on_object" in res:
            row.update(on_object=res["on_object"], on_object_random=res["on_object_random"])
        slug = _slug(run.name)
        row["histogram_png"] = str(figures.token_histograms(res["counts"], run.stages, out_dir / f"hist_{slug}.png",
                                                            run.name))
        if res["kept"]:
            ds = loader.dataset
            idx = sorted(res["kept"])
            images = torch.stack([ds[i][0] for i in idx])
            boxes = ds.boxes_for(idx, img_size) if hasattr(ds, "boxes_for") else None
            row["tokens_png"] = str(figures.kept_tokens(images, mean, std, [res["kept"][i] for i in idx], run.stages,
                                                        geom.grid, out_dir / f"tokens_{slug}.png", boxes, idx))
            row["kept_tokens"] = {str(i): {str(b): v.tolist() for b, v in res["kept"][i].items()} for i in idx}
        if timing_batch is not None:
            row.update(_throughput(dense, patched, timing_batch, cfg.repeats, rows[0], row))
        rows.append(row)
    if len(rows) > 2:
        rows[0]["sweep_png"] = str(figures.accuracy_vs_gflops(rows, out_dir / "accuracy_vs_gflops.png"))
    return rows


def _throughput(dense, patched, batch, repeats, dense_row, row) -> dict:
    from vitbench.throughput import compare

    timed = compare({"dense": dense, "ats": patched}, batch, baseline="dense", warmup=2, repeats=repeats)
    with torch.inference_mode():
        patched(batch)
    dense_row.setdefault("img_s", timed[0]["img_s"])
    return {"img_s": timed[1]["img_s"], "dense_img_s": timed[0]["img_s"], "speedup": timed[1]["speedup"],
            "ideal_speedup": dense_row["gflops"] / row["gflops"], "throughput_batch": batch.shape[0]}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-.=" else "_" for c in name)


if __name__ == "__main__":
    raise SystemExit(main())
