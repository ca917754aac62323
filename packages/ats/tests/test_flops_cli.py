import json

import pytest
import torch
from vitbench.flops import ViTGeometry, flop_counter_gmacs

import ats
from ats import evaluate, train
from ats.flops import dense_gmacs, per_image_gmacs, upper_bound_gmacs
from ats.patch import ATSConfig
from vitbench.testing import tiny_vit

DEIT_S = ViTGeometry(dim=384, depth=12, mlp_ratio=4.0, patch_size=16, in_chans=3, num_classes=1000, grid=(14, 14))


@pytest.mark.parametrize("k,paper", [(48, 2.0), (78, 2.5), (108, 3.0)])
def test_single_stage_levels_match_paper(k, paper):
    assert abs(upper_bound_gmacs(DEIT_S, ATSConfig((3,), (k,))) - paper) < 0.06
    assert abs(dense_gmacs(DEIT_S) - 4.6) < 0.05


@pytest.mark.parametrize("cfg", [dict(rho=0.8), dict(stages=[3], k=20), dict(rho=0.9, variant="self_attention")],
                         ids=str)
def test_per_image_gmacs_equal_flop_counter(images, cfg):
    """Analytic per-image count (no LayerNorm) == torch's FlopCounterMode on that image alone."""
    model = ats.apply(tiny_vit(), **cfg)
    geom = ViTGeometry.from_model(model)
    for i in range(2):
        measured = flop_counter_gmacs(model, images[i : i + 1])
        analytic = float(per_image_gmacs(geom, model.record, layernorm=False)[0])
        assert analytic == pytest.approx(measured, rel=1e-9)
    with torch.inference_mode():
        model(images)
    g = per_image_gmacs(geom, model.record)
    assert (g < dense_gmacs(geom)).all() and g.shape == (images.shape[0],)


def test_train_smoke_then_eval(tmp_path):
    out = tmp_path / "run"
    argv = ["--cpu", "--img-size", "56", "--limit-train", "32", "--limit-val", "16", "--batch-size", "8",
            "--epochs", "1", "--max-steps", "2", "--num-workers", "0", "--rho", "1", "--output-dir", str(out)]
    assert train.main(argv) == 0
    assert (out / "model.safetensors").is_file() and list((out / "checkpoints").glob("step_*"))
    config = json.loads((out / "config.json").read_text())
    assert config["ats"]["stages"] == list(range(3, 12)) and config["epochs"] == 1
    assert evaluate.main(["--checkpoint", str(out / "model.safetensors"), "--img-size", "56", "--limit", "16",
                          "--visualize", "--num-workers", "0", "--no-throughput",
                          "--output-dir", str(tmp_path / "e")]) == 0


def test_train_rejects_bad_ats_arguments(capsys):
    assert train.main(["--rho", "0.5", "--k", "10"]) == 2
    assert "not both" in capsys.readouterr().err
