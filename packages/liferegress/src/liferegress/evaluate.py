"""``liferegress-eval``: top-1/top-5 per keep rate, GFLOPs, throughput against the unpruned backbone in the same
run, life maps (Fig. 4).

Without arguments it evaluates the embedded default: the shipped Life-Regression weights of
``vit_digits_patch8_112`` on the embedded digits validation set at keep rates 0.9/0.8/0.7 (Table III's sweep).
The unpruned row is the backbone inside ``--checkpoint``, or ``--backbone-checkpoint`` / ``--pretrained`` (timm's
weights for ``--model``).
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from vitbench import evaluation as ev
from vitbench.cli import check_eval_input, renamed, run
from vitbench.flops import ViTGeometry
from vitbench.localization import on_box_share, random_share
from vitbench.models import EMBEDDED_MODEL, create_model, load_checkpoint as load_backbone

from .checkpoint import load_checkpoint, read_config
from .flops import model_gmacs
from .paper import paper_row
from .patch import apply, set_mode
from .vis import plot_life_maps

EMBEDDED_CHECKPOINT = Path(__file__).parent / "weights" / "vit_digits_patch8_112_liferegress.safetensors"


@dataclass(frozen=True)
class LifeEvalConfig:
    """Life Regression's own flags; the common ones are :class:`vitbench.evaluation.EvalConfig`."""

    keep_rate: tuple[float, ...] = (0.9, 0.8, 0.7)
    temperature: float | None = None
    mode: str = "hard"
    backbone_checkpoint: str | None = None

    def __post_init__(self):
        if any(not (0.0 < rho <= 1.0) for rho in self.keep_rate):
            raise ValueError(f"--rho values must be in (0, 1], got {list(self.keep_rate)}")
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> LifeEvalConfig:
        return cls(keep_rate=tuple(ns.rho), temperature=ns.temperature, mode=ns.pruning,
                   backbone_checkpoint=ns.backbone_checkpoint)


def build_parser() -> argparse.ArgumentParser:
    p = ev.build_parser("liferegress-eval", __doc__, "runs/liferegress-eval")
    g = p.add_argument_group("Life Regression")
    g.add_argument("--rho", type=float, nargs="+", default=[0.9, 0.8, 0.7],
                   help="keep rate(s) rho, one row each (Table III's sweep; default: 0.9 0.8 0.7)")
    g.add_argument("--temperature", type=float, default=None,
                   help="U of the soft weights, used by --pruning soft (default: the checkpoint's, else 1.5)")
    g.add_argument("--pruning", choices=["hard", "soft", "mask"], default="hard",
                   help="hard pruning (inference), soft weights, or 0/1 weights without pruning (default: hard)")
    g.add_argument("--backbone-checkpoint", default=None,
                   help="weights of the unpruned row (default: the backbone inside --checkpoint)")
    renamed(g, "--keep-rate", "--rho")
    renamed(g, "--mode", "--pruning")
    return p


def _checkpoint(cfg: ev.EvalConfig) -> str | None:
    if cfg.flops_only:
        return None
    if cfg.checkpoint is not None:
        return cfg.checkpoint
    if cfg.model == EMBEDDED_MODEL and cfg.num_classes is None:
        if not EMBEDDED_CHECKPOINT.is_file():
            raise FileNotFoundError(f"the embedded Life-Regression weights are not shipped ({EMBEDDED_CHECKPOINT}); "
                                    "train them with `liferegress-train` and give --checkpoint PATH")
        return str(EMBEDDED_CHECKPOINT)
    raise ValueError(f"--checkpoint PATH (a Life-Regression checkpoint) is required for {cfg.model}")


def build_models(cfg: ev.EvalConfig, opts: LifeEvalConfig) -> tuple[torch.nn.Module, dict[float, torch.nn.Module]]:
    """The unpruned backbone and one patched model per keep rate, all with the checkpoint's weights."""
    kwargs = {k: v for k, v in (("num_classes", cfg.num_classes), ("img_size", cfg.img_size)) if v is not None}
    backbone = create_model(cfg.model, **kwargs)
    checkpoint = _checkpoint(cfg)
    ev.check_img_size(backbone, cfg.img_size)
    stored = (read_config(checkpoint) if checkpoint else None) or {}
    temperature = opts.temperature or stored.get("temperature", 1.5)
    template = apply(copy.deepcopy(backbone), keep_rate=opts.keep_rate[0], temperature=temperature)
    if checkpoint:
        load_checkpoint(template, checkpoint)
    backbone.load_state_dict({k: v for k, v in template.state_dict().items() if not k.startswith("life_predictor.")})
    if opts.backbone_checkpoint:
        load_backbone(backbone, opts.backbone_checkpoint)
    elif cfg.pretrained:
        backbone = create_model(cfg.model, pretrained=True, **kwargs)
    patched = {rho: set_mode(apply(copy.deepcopy(template), keep_rate=rho, temperature=temperature), opts.mode).eval()
               for rho in opts.keep_rate}
    return backbone.eval(), patched


def _paper(model: str, rho: float | None) -> dict:
    return {k.removeprefix("paper_"): v for k, v in paper_row(model, rho).items()}


def build_settings(cfg, opts, backbone, patched, loader, spec) -> list[ev.Setting]:
    dense_g = model_gmacs(backbone)
    settings = [ev.Setting("dense", "unpruned backbone", "", {"keep_rate": 1.0}, backbone, gflops=dense_g,
                           paper=_paper(cfg.model, None), step=lambda x, y, i: (backbone(x), torch.tensor(dense_g)))]
    last = opts.keep_rate[-1]
    for rho, model in patched.items():
        s = ev.Setting("liferegress", f"Life-Regression ({opts.mode})", f"rho {rho:g}",
                       {"keep_rate": rho, "mode": opts.mode, "temperature": model.life_cfg.temperature}, model,
                       gflops=model_gmacs(model), paper=_paper(cfg.model, rho),
                       extra={"tokens_per_block": list(model.life_cfg.keep_counts)})
        if loader is not None:
            _attach_probe(s, cfg, loader, spec, draw=rho == last)
        settings.append(s)
    return settings


def _attach_probe(s: ev.Setting, cfg, loader, spec, draw: bool) -> None:
    """Per batch: logits, the mean clamped life and, on data with boxes (hard mode), the share of the finally kept
    patches inside the digit box vs the share of all patches there; after the pass the life maps."""
    model, gflops = s.model, s.gflops
    geom = ViTGeometry.from_model(model)
    lives, in_box, chance = [], [], []

    def step(images, labels, index):
        logits = model(images)
        info, c = model.record, model.life_cfg
        lives.append(info.lives[:, 1:].clamp(c.t_base, c.depth).mean(1).float().cpu())
        boxes = spec.boxes(loader.dataset, index)
        if boxes is not None and info.kept_indices is not None:
            in_box.append(on_box_share(info.kept_indices[-1].cpu(), boxes, geom.grid, spec.img_size))
            chance.append(random_share(boxes, geom.grid, spec.img_size))
        return logits, torch.tensor(gflops)

    def finish(row: dict, out_dir: Path) -> None:
        row["extra"]["mean_clamped_life"] = float(torch.cat(lives).mean())
        if in_box:
            row["extra"].update(kept_in_box=100 * float(torch.cat(in_box).mean()),
                                all_in_box=100 * float(torch.cat(chance).mean()))
        idx = [i for i in cfg.visualize if i < len(loader.dataset)]
        if draw and idx:
            row["figures"]["life_maps"] = str(_life_maps(cfg, model, loader.dataset, geom, spec, idx, out_dir,
                                                         f"{cfg.model} + {s.label}, {cfg.data}"))

    s.step, s.finish = step, finish


def _life_maps(cfg, model, dataset, geom, spec, idx, out: Path, title: str) -> Path:

    device = next(model.parameters()).device
    items = [dataset[i] for i in idx]
    images = torch.stack([it[0] for it in items]).to(device)
    with torch.inference_mode():
        preds = model(images).argmax(1).cpu()
    info, c = model.record, model.life_cfg
    shown = images.cpu() * torch.tensor(spec.std).view(1, 3, 1, 1) + torch.tensor(spec.mean).view(1, 3, 1, 1)
    titles = [f"#{i}: label {dataset.classes[it[1]]}, pred {dataset.classes[p]}" for i, it, p in zip(idx, items, preds)]
    kept = tuple(k.cpu() for k in info.kept_indices) if info.kept_indices is not None else ()
    return plot_life_maps(shown, info.lives.cpu(), kept, geom.grid, c.t_base, c.depth, c.drop_layers,
                          out / f"life_maps_rho{c.keep_rate}.png", titles, title)


def command(args: argparse.Namespace) -> int:
    cfg, opts = ev.EvalConfig.from_args(args), LifeEvalConfig.from_args(args)
    ev.prepare_outputs(cfg)
    backbone, patched = build_models(cfg, opts)
    ev.harness(cfg, opts, backbone, lambda loader, spec: build_settings(cfg, opts, backbone, patched, loader,
                                                                             spec),
           figure_patterns=("life_maps_*.png",), sweep_title=f"Life Regression on {cfg.model}, {cfg.data}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), command, argv, check=check_eval_input)


if __name__ == "__main__":
    raise SystemExit(main())
