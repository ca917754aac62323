"""``vitbench-train``: plain (dense) DeiT training or fine-tuning of any timm ViT on any ``--data``.

This is how the embedded backbone ``vit_digits_patch8_112`` is trained (see the vitbench README for the exact
command); the method packages' own ``*-train`` commands run the same loop.
"""

from __future__ import annotations

import argparse

from .cli import check_train_input, run
from .engine import TrainConfig, add_train_args, train
from .launch import main_print
from .models import create_model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vitbench-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), command, argv, check=check_train_input)


def command(args: argparse.Namespace) -> int:
    cfg = TrainConfig.from_args(args)

    def build():
        return create_model(cfg.model, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint,
                            drop_path_rate=cfg.drop_path, **({"img_size": cfg.img_size} if cfg.img_size else {}))

    result = train(cfg, build)
    main_print(f"done: top-1 {result.get('top1', float('nan')):.2f}% after {result['updates']} updates "
          f"({result['wall_time_s'] / 60:.1f} min); weights in {cfg.output_dir}/model.safetensors")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
