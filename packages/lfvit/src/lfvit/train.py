"""``lfvit-train``: LF-ViT training on the shared DeiT/Accelerate loop (``vitbench.engine``).

Every image goes through both stages (eta = 1); loss Eq. 12 ``CE(z_f, y) + KL(softmax(z_f).detach() || softmax(z_l))``
(``--loss ce_ce``: Table 7). Epochs before ``--selection-epoch`` run the focus stage on the whole image, later
ones on the NGCA region (paper: 230 of 350). The faithful default trains from scratch; ``--init-backbone``
starts from a plain ViT/DeiT checkpoint with both positional tables resized from its table (our option).
Multi-GPU/node via ``accelerate launch``; multi-process CPU via ``torchrun --nproc_per_node N ... --cpu``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass

import timm
from vitbench.cli import check_train_input, run
from vitbench.engine import TrainConfig, add_train_args, train
from vitbench.launch import main_print
from vitbench.models import EMBEDDED_WEIGHTS, read_state_dict

from .checkpoint import init_from_backbone, load_lfvit_checkpoint
from .losses import LOSS_VARIANTS, lfvit_loss
from .model import DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_REGION_SIZE, LFVisionTransformer


@dataclass(frozen=True)
class LFTrainConfig:
    """The LF-ViT-specific part of a training run."""

    region_size: int = DEFAULT_REGION_SIZE
    alpha: float = DEFAULT_ALPHA
    beta: float = DEFAULT_BETA
    loss: str = "ce_kl"
    selection_epoch: int = 230
    released_whole_image_pos: bool = False
    init_backbone: str | None = None

    def __post_init__(self):
        if self.loss not in LOSS_VARIANTS:
            raise ValueError(f"--loss must be one of {LOSS_VARIANTS}, got {self.loss!r}")
        if self.selection_epoch < 0:
            raise ValueError(f"--selection-epoch must be >= 0, got {self.selection_epoch}")

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> LFTrainConfig:
        return cls(region_size=ns.region_size, alpha=ns.alpha, beta=ns.beta, loss=ns.loss,
                   selection_epoch=ns.selection_epoch, released_whole_image_pos=ns.released_whole_image_pos,
                   init_backbone=ns.init_backbone)


def build_parser() -> argparse.ArgumentParser:
    d = LFTrainConfig()
    p = argparse.ArgumentParser(prog="lfvit-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(p, model="lfvit_vit_digits_patch8_112", epochs=350, output_dir="runs/lfvit_train")
    g = p.add_argument_group("LF-ViT")
    g.add_argument("--region-size", type=int, default=d.region_size,
                   help="m, the NGCA window side (paper: 5; 8 at g 9)")
    g.add_argument("--alpha", type=float, default=d.alpha, help="K = ceil(alpha m^2) refined coarse cells")
    g.add_argument("--beta", type=float, default=d.beta, help="GCA moving-average weight (Table 4)")
    g.add_argument("--loss", choices=LOSS_VARIANTS, default=d.loss, help="ce_kl (Eq. 12) or ce_ce (Table 7)")
    g.add_argument("--selection-epoch", type=int, default=d.selection_epoch,
                   help="first epoch (0-based) with region selection; earlier epochs focus on the whole image")
    g.add_argument("--released-whole-image-pos", action="store_true",
                   help="reproduce the released code's whole-image phase, which adds no positional embedding")
    g.add_argument("--init-backbone", default=None,
                   help="initialise from a plain ViT/DeiT checkpoint (.safetensors/.pth), or 'embedded' for "
                        "vitbench's shipped vit_digits_patch8_112 weights; positional tables are resized")
    return p


def build_lfvit(model_name: str, opts: LFTrainConfig, drop_path: float = 0.0, checkpoint: str | None = None,
                img_size: int | None = None, pretrained: bool = False) -> LFVisionTransformer:
    """Create an LF-ViT for training, optionally initialised from an LF-ViT checkpoint or a plain backbone."""
    if model_name not in timm.list_models("lfvit_*"):
        raise ValueError(f"{model_name!r} is not an LF-ViT model; choose from {timm.list_models('lfvit_*')}")
    kwargs = {"img_size": img_size} if img_size else {}
    model = timm.create_model(model_name, pretrained=pretrained, region_size=opts.region_size, alpha=opts.alpha,
                              beta=opts.beta,
                              whole_image_pos_embed=not opts.released_whole_image_pos, drop_path_rate=drop_path,
                              **kwargs)
    if checkpoint and opts.init_backbone:
        raise ValueError("give either --checkpoint (LF-ViT weights) or --init-backbone (plain ViT), not both")
    if checkpoint:
        load_lfvit_checkpoint(model, checkpoint)
    elif opts.init_backbone:
        path = opts.init_backbone
        if path == "embedded":
            if not EMBEDDED_WEIGHTS.is_file():
                raise FileNotFoundError(f"--init-backbone embedded: the embedded backbone weights are not installed "
                                        f"({EMBEDDED_WEIGHTS}); train them with vitbench-train or pass a path")
            path = EMBEDDED_WEIGHTS
        init_from_backbone(model, read_state_dict(path))
    return model


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), command, argv, check=check_train_input)


def command(args: argparse.Namespace) -> int:
    cfg = TrainConfig.from_args(args)
    opts = LFTrainConfig.from_args(args)
    build_lfvit(cfg.model, opts, 0.0, cfg.checkpoint, cfg.img_size, cfg.pretrained)  # bad options/checkpoints: now

    def build():
        return build_lfvit(cfg.model, opts, cfg.drop_path, cfg.checkpoint, cfg.img_size, cfg.pretrained)

    def loss_fn(model, images, targets, criterion):
        z = model(images)
        return lfvit_loss(z.location, z.focus, targets, criterion, opts.loss)

    def on_epoch_start(epoch: int, model: LFVisionTransformer) -> None:
        model.region_selection = epoch >= opts.selection_epoch

    result = train(cfg, build, loss_fn=loss_fn, on_epoch_start=on_epoch_start,
                   eval_forward=lambda model, images: model(images).focus, extra_config={"lfvit": asdict(opts)})
    main_print(f"done: focus top-1 {result.get('top1', float('nan')):.2f}% after {result['updates']} updates "
          f"({result['wall_time_s'] / 60:.1f} min); weights in {cfg.output_dir}/model.safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
