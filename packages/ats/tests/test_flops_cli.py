import json

import pytest
import torch
from vitbench.flops import ViTGeometry, flop_counter_gmacs
from vitbench.models import save_weights

import ats
from ats import evaluate, train
from ats.flops import dense_gmacs, per_image_gmacs, upper_bound_gmacs
from ats.patch import ATSConfig
from conftest import tiny_vit

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
        analytic = float(per_image_gmacs(geom, model.ats_info, layernorm=False)[0])
        assert analytic == pytest.approx(measured, rel=1e-9)
    with torch.inference_mode():
        model(images)
    g = per_image_gmacs(geom, model.ats_info)
    assert (g < dense_gmacs(geom)).all() and g.shape == (images.shape[0],)


def test_eval_flops_only_json(tmp_path):
    out = tmp_path / "f.json"
    assert evaluate.main(["--flops-only", "--model", "deit_small_patch16_224", "--stages", "3", "--k", "48",
                          "--json", str(out), "--output-dir", str(tmp_path)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["gflops_upper_bound"] == pytest.approx(4.608, abs=1e-3)
    assert rows[1]["gflops_upper_bound"] == pytest.approx(2.05, abs=0.01)


@pytest.mark.parametrize("argv,message", [
    (["--rho", "1.5"], "rho"),
    (["--rho", "0.5", "--k", "10"], "not both"),
    (["--stages", "3-x"], "stages"),
])
def test_eval_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        evaluate.main(argv + ["--flops-only"])
    assert message in capsys.readouterr().err


def test_eval_reports_missing_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        evaluate.main(["--checkpoint", str(tmp_path / "nope.safetensors")])


def test_eval_on_embedded_data_with_checkpoint(tmp_path):
    import vitbench

    torch.manual_seed(0)
    ckpt = save_weights(vitbench.create_model("vit_digits_patch8_112", img_size=56), tmp_path / "w.safetensors")
    argv = ["--checkpoint", str(ckpt), "--img-size", "56", "--limit", "24", "--batch-size", "12", "--rho", "1", "0.7",
            "--visualize", "0", "--num-workers", "0", "--no-throughput", "--output-dir", str(tmp_path / "eval"),
            "--json", str(tmp_path / "r.json")]
    assert evaluate.main(argv) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    dense, r1, r07 = res["rows"]
    assert dense["images"] == 24 and r07["gflops"] < r1["gflops"] < dense["gflops"]
    assert r1["kept_tokens"]["0"]["3"][0] == 0
    for key in ("histogram_png", "tokens_png"):
        assert (tmp_path / "eval" / r07[key].split("/")[-1]).is_file()
    assert (tmp_path / "eval" / "accuracy_vs_gflops.png").is_file()
    # localization against the digit boxes: a share of the kept tokens, next to the uniform-token baseline
    assert 0.0 <= r07["on_object"] <= 100.0 and 0.0 < r07["on_object_random"] < 100.0
    assert r1["on_object_random"] == r07["on_object_random"]


def test_train_smoke_then_eval(tmp_path):
    out = tmp_path / "run"
    argv = ["--cpu", "--img-size", "56", "--limit-train", "32", "--limit-val", "16", "--batch-size", "8",
            "--epochs", "1", "--max-steps", "2", "--num-workers", "0", "--ats-rho", "1", "--output-dir", str(out)]
    assert train.main(argv) == 0
    assert (out / "model.safetensors").is_file() and list((out / "checkpoints").glob("step_*"))
    config = json.loads((out / "config.json").read_text())
    assert config["ats"]["stages"] == list(range(3, 12)) and config["epochs"] == 1
    assert evaluate.main(["--checkpoint", str(out / "model.safetensors"), "--img-size", "56", "--limit", "16",
                          "--visualize", "--num-workers", "0", "--no-throughput",
                          "--output-dir", str(tmp_path / "e")]) == 0


def test_train_rejects_bad_ats_arguments(capsys):
    assert train.main(["--ats-rho", "0.5", "--ats-k", "10"]) == 2
    assert "not both" in capsys.readouterr().err
