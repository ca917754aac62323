import json

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from lfvit import evaluate, train
from lfvit.train import LFTrainOptions, build_lfvit


@pytest.fixture(scope="module")
def lf_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("lfvit_vit_digits_patch8_112")
    path = tmp_path_factory.mktemp("ckpt") / "lf.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_eval_modes_write_json_and_figures(tmp_path, lf_checkpoint):
    out = tmp_path / "eval"
    rc = evaluate.main(["--checkpoint", str(lf_checkpoint), "--limit", "8", "--batch-size", "8", "--num-workers",
                        "0", "--modes", "anytime,budgeted,regions", "--eta", "1.0", "--output-dir", str(out),
                        "--json", str(tmp_path / "r.json"), "--num-visualise", "2"])
    assert rc == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["anytime"]["n"] == 8
    assert [r["eta"] for r in res["budgeted"]] == [round(0.01 * p, 2) for p in range(100)]
    first = res["budgeted"][0]
    assert first["n_location"] == 8 and abs(first["gflops"] - res["flops"]["location_gflops"]) < 1e-9
    assert all(r["n_location"] + r["n_focus"] == 8 for r in res["budgeted"])
    assert 0 <= res["region_hits"]["hit_rate"] <= 100 and 0 < res["region_hits"]["random_window_hit_rate"] < 100
    assert (out / "budgeted.png").stat().st_size > 0


def test_eval_errors(tmp_path, lf_checkpoint, capsys):
    assert evaluate.main(["--checkpoint", str(lf_checkpoint), "--eta", "1.5"]) == 2
    assert evaluate.main(["--checkpoint", str(tmp_path / "nope.pth")]) == 2
    assert evaluate.main(["--model", "lfvit_deit_small_patch16_224"]) == 2  # needs --checkpoint
    assert "error" in capsys.readouterr().err


def test_flops_only_defaults_to_deit_s(tmp_path):
    assert evaluate.main(["--flops-only", "--json", str(tmp_path / "f.json")]) == 0
    f = json.loads((tmp_path / "f.json").read_text())["flops"]
    assert f["model"] == "lfvit_deit_small_patch16_224"
    assert round(f["location_gflops"], 2) == 1.10 and round(f["cumulative_gflops"], 2) == 3.81


def test_init_from_backbone_checkpoint(tmp_path):
    dense = VisionTransformer(img_size=112, patch_size=8, embed_dim=64, depth=12, num_heads=2, num_classes=10)
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    model = build_lfvit("lfvit_vit_digits_patch8_112", LFTrainOptions(init_backbone=str(tmp_path / "vit.safetensors")))
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
    with pytest.raises(SystemExit):
        train.main(base + ["--loss", "kl_kl"])
