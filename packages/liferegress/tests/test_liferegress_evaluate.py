import argparse

import pytest
import timm
import torch
from vitbench.evaluation import add_eval_args
from vitbench.models import save_weights
from vitbench.testing import common_eval_options, image_folder, one_line_error, read_valid_result

import liferegress
from liferegress import evaluate


def _lr_checkpoint(path, **kwargs):
    torch.manual_seed(0)
    model = liferegress.apply(timm.create_model("vit_digits_patch8_112", **kwargs), keep_rate=0.7)
    return str(liferegress.save_checkpoint(model, path))


@pytest.fixture(scope="module")
def lr_ckpt(tmp_path_factory):
    return _lr_checkpoint(tmp_path_factory.mktemp("lr") / "lr.safetensors")


def _small(tmp_path, *extra):
    return ["--limit", "8", "--batch-size", "8", "--num-workers", "0", "--repeats", "1", "--warmup", "0",
            "--throughput-batch", "4", "--output-dir", str(tmp_path / "eval"), "--json", str(tmp_path / "r.json"),
            *extra]


def test_common_options_are_vitbench_s():
    assert common_eval_options(evaluate.build_parser()) == common_eval_options(add_eval_args(argparse.ArgumentParser()))


@pytest.mark.parametrize(("model", "rho", "expected", "tol"), [
    ("deit_small_patch16_224", 0.7, 3.21, 0.01),
    ("deit_small_patch16_224", 0.9, 4.11, 0.01),
    ("deit_base_patch16_224", 0.7, 12.3, 0.05),
])
def test_flops_only_matches_paper_in_the_schema(tmp_path, model, rho, expected, tol):
    out = tmp_path / "f.json"
    assert evaluate.main(["--flops-only", "--model", model, "--rho", str(rho), "--json", str(out),
                          "--output-dir", str(tmp_path / "o")]) == 0
    dense, row = read_valid_result(out)["rows"]
    assert dense["method"] == "dense" and row["setting"]["keep_rate"] == rho
    assert row["gflops"] == pytest.approx(expected, abs=tol) and row["top1"] is None
    assert row["paper"]["gflops"] == pytest.approx(expected, abs=0.1)


def test_keep_rate_sweep_with_life_maps(tmp_path, lr_ckpt):
    assert evaluate.main(_small(tmp_path, "--checkpoint", lr_ckpt, "--rho", "0.9", "0.7", "--visualize", "0",
                                "1")) == 0
    res = read_valid_result(tmp_path / "r.json")
    rows = res["rows"]
    assert [r["setting"]["keep_rate"] for r in rows] == [1.0, 0.9, 0.7]
    assert rows[0]["gflops"] > rows[1]["gflops"] > rows[2]["gflops"]
    assert all(0 <= r["top1"] <= 100 and r["images"] == 8 and r["img_s"] > 0 for r in rows)
    assert 0 <= rows[2]["extra"]["kept_in_box"] <= 100 and 0 < rows[2]["extra"]["all_in_box"] < 100
    assert (tmp_path / "eval" / "life_maps_rho0.7.png").stat().st_size > 10_000
    assert rows[2]["figures"]["life_maps"].endswith("life_maps_rho0.7.png")
    assert (tmp_path / "eval" / "results.md").read_text().startswith("| label")
    assert (tmp_path / "eval" / "results.json").is_file()  # --json elsewhere never replaces it


def test_three_classes_image_folder(tmp_path):
    ckpt = _lr_checkpoint(tmp_path / "c3.safetensors", num_classes=3)
    data = image_folder(tmp_path / "folder")
    assert evaluate.main(_small(tmp_path, "--data", f"imagefolder:{data}", "--num-classes", "3", "--checkpoint",
                                ckpt, "--rho", "0.7", "--skip-corrupt")) == 0
    res = read_valid_result(tmp_path / "r.json")
    assert res["data"] == {"spec": f"imagefolder:{data}", "images": 6, "skipped": []}
    assert [r["images"] for r in res["rows"]] == [6, 6]


def test_skip_corrupt_counts_the_skipped_file(tmp_path, lr_ckpt):
    data = image_folder(tmp_path / "folder", classes=10)
    (data / "val" / "class0" / "bad.png").write_bytes(b"\x89PNG not really")
    assert evaluate.main(_small(tmp_path, "--data", f"imagefolder:{data}", "--checkpoint", lr_ckpt,
                                "--rho", "0.7", "--skip-corrupt", "--no-throughput")) == 0
    res = read_valid_result(tmp_path / "r.json")
    # --limit 8 counts readable images: the skipped file does not take one of the 8 places
    assert res["data"]["images"] == 8 and [p.split("/")[-1] for p in res["data"]["skipped"]] == ["bad.png"]


@pytest.mark.parametrize("argv,match", [
    (["--rho", "1.5"], "--rho must be in (0, 1], got 1.5"),
    (["--checkpoint", "/nonexistent.safetensors"], "not found"),
    (["--model", "no_such_model"], "unknown model"),
    (["--model", "deit_tiny_patch16_224"], "--checkpoint PATH"),
    (["--data", "foo:/x"], "cannot parse data spec"),
    (["--img-size", "113"], "multiple of the patch size"),
    (["--limit", "0"], "--limit"),
])
def test_bad_input_is_one_line(argv, match, capsys, tmp_path):
    one_line_error(evaluate.main, [*argv, "--output-dir", str(tmp_path / "o")], capsys, match)


def test_offline_pretrained_and_bad_files_are_one_line(capsys, tmp_path):
    torch.manual_seed(0)
    tiny = liferegress.apply(timm.create_model("deit_tiny_patch16_224"), keep_rate=0.7)
    ckpt = str(liferegress.save_checkpoint(tiny, tmp_path / "tiny.safetensors"))
    one_line_error(evaluate.main, ["--model", "deit_tiny_patch16_224", "--checkpoint", ckpt, "--pretrained",
                                   "--output-dir", str(tmp_path / "o")], capsys, "HF_HUB_OFFLINE=1")
    (tmp_path / "zero.safetensors").write_bytes(b"")
    one_line_error(evaluate.main, ["--checkpoint", str(tmp_path / "zero.safetensors"), "--output-dir",
                                   str(tmp_path / "o")], capsys, "not a valid safetensors file")
    backbone = save_weights(timm.create_model("vit_digits_patch8_112", depth=3), tmp_path / "short.safetensors")
    one_line_error(evaluate.main, ["--backbone-checkpoint", str(backbone), "--output-dir", str(tmp_path / "o")],
                   capsys, "missing keys: blocks.10")
