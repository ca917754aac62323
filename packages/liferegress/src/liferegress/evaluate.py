"""``liferegress-eval``: accuracy, GFLOPs, throughput vs the unpruned backbone, keep-rate sweep and life maps.

Without arguments it evaluates the embedded default: the shipped Life-Regression weights of
``vit_digits_patch8_112`` on the embedded digits validation set at keep rates 0.9/0.8/0.7 (Table III's sweep).
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .checkpoint import load_checkpoint, read_config
from .flops import model_gmacs
from .paper import paper_row
from .patch import apply, set_mode

EMBEDDED_MODEL = "vit_digits_patch8_112"
WEIGHTS_DIR = Path(__file__).parent / "weights"
EMBEDDED_CHECKPOINT = WEIGHTS_DIR / "vit_digits_patch8_112_liferegress.safetensors"


@dataclass(frozen=True)
class EvalConfig:
    data: str = "digits"
    model: str = EMBEDDED_MODEL
    checkpoint: str | None = None
    backbone_checkpoint: str | None = None
    backbone_pretrained: bool = False
    keep_rates: tuple[float, ...] = (0.9, 0.8, 0.7)
    temperature: float | None = None
    mode: str = "hard"
    flops_only: bool = False
    batch_size: int = 128
    limit_val: int | None = None
    crop_pct: float | None = None
    num_workers: int = 2
    device: str = "cpu"
    throughput: bool = True
    throughput_batch: int = 32
    warmup: int = 3
    repeats: int = 10
    vis_images: tuple[int, ...] = (0, 1, 2, 3)
    output_dir: str = "runs/liferegress-eval"
    json: str | None = None

    def __post_init__(self):
        for rho in self.keep_rates:
            if not 0.0 < rho <= 1.0:
                raise ValueError(f"--keep-rate values must be in (0, 1], got {rho}")
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")
        if self.batch_size < 1 or self.throughput_batch < 1 or self.repeats < 1 or self.warmup < 0:
            raise ValueError("--batch-size, --throughput-batch and --repeats must be >= 1, --warmup >= 0")
        if any(i < 0 for i in self.vis_images):
            raise ValueError("--vis-images takes non-negative validation indices")

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> EvalConfig:
        d = vars(ns).copy()
        d["keep_rates"] = tuple(d.pop("keep_rate"))
        d["vis_images"] = tuple(d["vis_images"])
        return cls(**d)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="liferegress-eval",
        description="Evaluate a Life-Regression model: top-1/top-5 per keep rate, GFLOPs (= GMACs), throughput "
        "against the unpruned backbone in the same process, life maps (PNG). JSON + Markdown. Without arguments: "
        "the embedded default (shipped weights of vit_digits_patch8_112 on the embedded digits).",
    )
    p.add_argument("--data", default="digits", help="digits | imagefolder:PATH | hf:NAME[:CONFIG] | arrow:PATH")
    p.add_argument("--model", default=EMBEDDED_MODEL, help="timm architecture (e.g. deit_small_patch16_224)")
    p.add_argument("--checkpoint", default=None,
                   help="Life-Regression checkpoint: this project's .safetensors or the released code's "
                   "Lightning .ckpt (default for the embedded model: the shipped weights)")
    p.add_argument("--backbone-checkpoint", default=None,
                   help="weights of the unpruned baseline row (default: the backbone inside --checkpoint)")
    p.add_argument("--backbone-pretrained", action="store_true",
                   help="use timm's pretrained weights of --model for the unpruned baseline row")
    p.add_argument("--keep-rate", type=float, nargs="+", default=[0.9, 0.8, 0.7],
                   help="keep rate(s) rho; several values give the Table III sweep")
    p.add_argument("--temperature", type=float, default=None,
                   help="U (only used with --mode soft; default: the checkpoint's, else 1.5)")
    p.add_argument("--mode", choices=["hard", "soft", "mask"], default="hard",
                   help="hard pruning (inference), soft weights, or 0/1 weights without pruning")
    p.add_argument("--flops-only", action="store_true", help="only print GFLOPs (no data, no weights)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--limit-val", type=int, default=None, help="evaluate only the first N validation images")
    p.add_argument("--crop-pct", type=float, default=None,
                   help="eval center-crop fraction (default: the dataset's; the released code used 0.9)")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-throughput", dest="throughput", action="store_false", help="skip the throughput run")
    p.add_argument("--throughput-batch", type=int, default=32)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--vis-images", type=int, nargs="*", default=[0, 1, 2, 3],
                   help="validation indices drawn as life maps (Fig. 4) at the last keep rate; none to skip")
    p.add_argument("--output-dir", default="runs/liferegress-eval")
    p.add_argument("--json", default=None, help="results JSON (default: OUTPUT_DIR/results.json)")
    return p


def _resolve_checkpoint(cfg: EvalConfig) -> str | None:
    if cfg.checkpoint is not None:
        if not Path(cfg.checkpoint).is_file():
            raise FileNotFoundError(f"--checkpoint {cfg.checkpoint} does not exist")
        return cfg.checkpoint
    if cfg.model == EMBEDDED_MODEL and cfg.data == "digits":
        if not EMBEDDED_CHECKPOINT.is_file():
            raise FileNotFoundError(
                f"the embedded Life-Regression weights are not shipped yet ({EMBEDDED_CHECKPOINT}); train them with "
                "`liferegress-train` and pass --checkpoint runs/liferegress-train/model.safetensors"
            )
        return str(EMBEDDED_CHECKPOINT)
    raise ValueError(f"--checkpoint is required for {cfg.model} on {cfg.data} (or use --flops-only)")


def build_models(cfg: EvalConfig, checkpoint: str | None) -> tuple[torch.nn.Module, dict[float, torch.nn.Module]]:
    """The unpruned backbone and one patched model per keep rate, all with the checkpoint's weights."""
    import timm
    import vitbench  # noqa: F401  (registers the embedded backbone)
    from vitbench.models import load_checkpoint as load_backbone

    try:
        backbone = timm.create_model(cfg.model, pretrained=False)
    except RuntimeError as err:
        raise ValueError(f"unknown model {cfg.model!r}: {err}") from err
    stored = read_config(checkpoint) if checkpoint else None
    temperature = cfg.temperature or (stored or {}).get("temperature", 1.5)
    template = apply(copy.deepcopy(backbone), keep_rate=cfg.keep_rates[0], temperature=temperature)
    if checkpoint:
        load_checkpoint(template, checkpoint)
    backbone.load_state_dict({k: v for k, v in template.state_dict().items() if not k.startswith("life_predictor.")})
    if cfg.backbone_checkpoint:
        load_backbone(backbone, cfg.backbone_checkpoint)
    elif cfg.backbone_pretrained:
        backbone = timm.create_model(cfg.model, pretrained=True)
    patched = {}
    for rho in cfg.keep_rates:
        model = apply(copy.deepcopy(template), keep_rate=rho, temperature=temperature)
        patched[rho] = set_mode(model, cfg.mode).eval()
    return backbone.eval(), patched


def evaluate(cfg: EvalConfig) -> dict:
    from vitbench.engine import evaluate_classifier, resolve_input
    from vitbench.flops import ViTGeometry

    import timm
    import vitbench  # noqa: F401

    out = Path(cfg.output_dir)
    if cfg.flops_only:
        try:
            backbone = timm.create_model(cfg.model, pretrained=False)
        except RuntimeError as err:
            raise ValueError(f"unknown model {cfg.model!r}: {err}") from err
        rows = [{"name": "backbone", "keep_rate": 1.0, "tokens": "-", "gflops": model_gmacs(backbone),
                 **paper_row(cfg.model, None)}]
        for rho in cfg.keep_rates:
            m = apply(copy.deepcopy(backbone), keep_rate=rho)
            rows.append({"name": "liferegress", "keep_rate": rho, "tokens": "/".join(map(str, m.life_cfg.keep_counts)),
                         "gflops": model_gmacs(m), **paper_row(cfg.model, rho)})
        return {"config": asdict(cfg), "rows": rows}

    checkpoint = _resolve_checkpoint(cfg)
    device = torch.device(cfg.device)
    backbone, patched = build_models(cfg, checkpoint)
    geom = ViTGeometry.from_model(backbone)
    img_size, mean, std, dd = resolve_input(backbone, cfg.data)
    from vitbench.data import build_eval_loader

    loader = build_eval_loader(cfg.data, img_size, mean, std, batch_size=cfg.batch_size, crop_pct=cfg.crop_pct,
                               num_workers=cfg.num_workers, limit=cfg.limit_val)
    dataset = loader.dataset
    boxes_ok = dataset.boxes is not None and (cfg.crop_pct in (None, 1.0)) and dd.crop_pct == 1.0

    rows = []
    metrics = evaluate_classifier(backbone.to(device), loader)
    rows.append({"name": "backbone", "keep_rate": 1.0, "tokens": "-", "gflops": model_gmacs(backbone), **metrics,
                 **paper_row(cfg.model, None)})
    for rho, model in patched.items():
        lives = []

        def forward(m, images, lives=lives):
            logits = m(images)
            lives.append(m.life_info.lives[:, 1:].clamp(m.life_cfg.t_base, m.life_cfg.depth).mean(1).cpu())
            return logits

        metrics = evaluate_classifier(model.to(device), loader, forward=forward)
        row = {"name": f"liferegress ({cfg.mode})", "keep_rate": rho,
               "tokens": "/".join(map(str, model.life_cfg.keep_counts)), "gflops": model_gmacs(model), **metrics,
               "mean_clamped_life": torch.cat(lives).mean().item(), **paper_row(cfg.model, rho)}
        if boxes_ok and cfg.mode == "hard":
            row.update(_localization(model, loader, dataset, geom, img_size, device))
        rows.append(row)

    throughput = []
    if cfg.throughput:
        from vitbench.throughput import compare

        fns = {"backbone": backbone.to(device)}
        fns.update({f"liferegress rho={rho}": m.to(device) for rho, m in patched.items()})
        inputs = torch.randn(cfg.throughput_batch, 3, img_size, img_size, device=device)
        throughput = compare(fns, inputs, baseline="backbone", warmup=cfg.warmup, repeats=cfg.repeats)
        by_name = {r["name"]: r for r in throughput}
        rows[0].update(img_s=by_name["backbone"]["img_s"], speedup=1.0)
        for row, rho in zip(rows[1:], patched):
            r = by_name[f"liferegress rho={rho}"]
            row.update(img_s=r["img_s"], speedup=r["speedup"])

    figures = []
    if cfg.vis_images:
        figures.append(str(_life_maps(cfg, patched[cfg.keep_rates[-1]], dataset, geom, mean, std, device, out)))
    return {"config": asdict(cfg), "checkpoint": checkpoint, "img_size": img_size, "rows": rows,
            "throughput": throughput, "threads": torch.get_num_threads(), "figures": figures}


def _localization(model, loader, dataset, geom, img_size, device) -> dict:
    """Digits only: share of the finally kept patches inside the digit's box vs the share of all patches there."""
    from vitbench.localization import on_box_share, random_share

    in_box, chance = [], []
    with torch.inference_mode():
        for images, _, indices in loader:
            model(images.to(device))
            boxes = dataset.boxes_for(indices, img_size)
            in_box.append(on_box_share(model.life_info.kept_indices[-1].cpu(), boxes, geom.grid, img_size))
            chance.append(random_share(boxes, geom.grid, img_size))
    return {"kept_in_box": torch.cat(in_box).mean().item(), "all_in_box": torch.cat(chance).mean().item()}


def _life_maps(cfg, model, dataset, geom, mean, std, device, out: Path) -> Path:
    from .vis import plot_life_maps

    idx = [i for i in cfg.vis_images if i < len(dataset)]
    if not idx:
        raise ValueError(f"--vis-images {list(cfg.vis_images)}: the validation set has {len(dataset)} images")
    items = [dataset[i] for i in idx]
    images = torch.stack([it[0] for it in items]).to(device)
    with torch.inference_mode():
        preds = model(images).argmax(1).cpu()
    info = model.life_info
    shown = images.cpu() * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    titles = [f"#{i}: label {dataset.classes[it[1]]}, pred {dataset.classes[p]}" for i, it, p in zip(idx, items, preds)]
    c = model.life_cfg
    return plot_life_maps(shown, info.lives.cpu(), tuple(k.cpu() for k in info.kept_indices), geom.grid, c.t_base,
                          c.depth, c.drop_layers, out / f"life_maps_rho{c.keep_rate}.png", titles)


COLUMNS = ["name", "keep_rate", "tokens", "gflops", "paper_gflops", "top1", "paper_top1", "top5", "paper_top5",
           "img_s", "speedup", "paper_img_s", "mean_clamped_life", "kept_in_box", "all_in_box"]


def main(argv: list[str] | None = None) -> int:
    from vitbench.report import markdown_table, write_json

    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        cfg = EvalConfig.from_args(ns)
        result = evaluate(cfg)
    except (ValueError, FileNotFoundError, TypeError) as err:
        parser.exit(2, f"liferegress-eval: error: {err}\n")
    rows = result["rows"]
    columns = [c for c in COLUMNS if any(c in r for r in rows)]
    table = markdown_table(rows, columns, digits=3)
    print(table)
    out = Path(cfg.output_dir)
    if not cfg.flops_only:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(table + "\n")
        for fig in result.get("figures", []):
            print(f"life maps: {fig}")
    json_path = cfg.json or (None if cfg.flops_only else str(out / "results.json"))
    if json_path:
        write_json(json_path, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
