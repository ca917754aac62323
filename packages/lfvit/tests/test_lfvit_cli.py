import json

import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from lfvit import train
from lfvit.train import LFTrainConfig, build_lfvit


def test_init_from_backbone_checkpoint(tmp_path):
    dense = VisionTransformer(img_size=112, patch_size=8, embed_dim=64, depth=12, num_heads=2, num_classes=10)
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    model = build_lfvit("lfvit_vit_digits_patch8_112", LFTrainConfig(init_backbone=str(tmp_path / "vit.safetensors")))
    assert torch.equal(model.pos_embed, dense.pos_embed)
    assert model.pos_embed_coarse.shape == (1, 50, 64)
    torch.testing.assert_close(model.pos_embed_coarse[:, 0], dense.pos_embed[:, 0])
    assert torch.equal(model.blocks[5].mlp.fc1.weight, dense.blocks[5].mlp.fc1.weight)


def test_train_smoke_and_resume(tmp_path):
    out = tmp_path / "run"
    base = ["--cpu", "--batch-size", "4", "--limit-train", "8", "--limit-val", "4", "--num-workers", "0",
            "--epochs", "1", "--selection-epoch", "0", "--checkpointing-steps", "1", "--output-dir", str(out)]
    assert train.main(base + ["--max-steps", "1"]) == 0
    assert (out / "model.safetensors").is_file()
    assert json.loads((out / "results.json").read_text())["updates"] == 1
    assert train.main(base + ["--max-steps", "2", "--resume", "auto"]) == 0
    assert json.loads((out / "results.json").read_text())["updates"] == 2
    assert train.main(base + ["--loss", "kl_kl"]) == 2
