import argparse

import pytest
import timm
import torch
from safetensors.torch import save_file
from vitbench.evaluation import add_eval_args
from vitbench.testing import common_eval_options, image_folder, one_line_error, read_valid_result

from lfvit import evaluate


def _save(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def lf_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    return _save(timm.create_model("lfvit_vit_digits_patch8_112"), tmp_path_factory.mktemp("ckpt") / "lf.safetensors")


def _small(tmp_path, *extra):
    return ["--limit", "8", "--batch-size", "8", "--num-workers", "0", "--repeats", "1", "--warmup", "0",
            "--throughput-batch", "4", "--output-dir", str(tmp_path / "eval"), "--json", str(tmp_path / "r.json"),
            *extra]


def test_common_options_are_vitbench_s():
    assert common_eval_options(evaluate.build_parser()) == common_eval_options(add_eval_args(argparse.ArgumentParser()))


def test_rows_budget_regions_and_one_timing_run(tmp_path, lf_checkpoint):
    assert evaluate.main(_small(tmp_path, "--checkpoint", lf_checkpoint, "--eta", "0", "1", "--visualize", "0",
                                "1")) == 0
    res = read_valid_result(tmp_path / "r.json")
    dense, two, exit0, exit1 = res["rows"]
    assert dense["top1"] is None and dense["img_s"] > 0 and dense["speedup"] == 1.0
    assert [r["setting"]["eta"] for r in (two, exit0, exit1)] == [1.0, 0.0, 1.0]
    budget = two["extra"]["budget"]
    assert [r["eta"] for r in budget] == [round(0.01 * p, 2) for p in range(100)]
    assert budget[0]["n_location"] == 8 and budget[0]["gflops"] == pytest.approx(two["extra"]["location_gflops"])
    assert all(r["n_location"] + r["n_focus"] == 8 for r in budget)
    # real early exit agrees with the stored-softmax budget: eta 0 = localization only, eta 1 = the focus stage
    assert exit0["top1"] == pytest.approx(two["extra"]["location_top1"]) and exit0["extra"]["n_focus"] == 0
    assert exit1["top1"] == pytest.approx(two["extra"]["focus_top1"]) == pytest.approx(two["top1"])
    assert exit0["gflops"] < exit1["gflops"] == pytest.approx(two["gflops"])
    assert all(r["speedup_spread"] is not None for r in res["rows"])
    assert 0 <= two["extra"]["hit_rate"] <= 100 and 0 < two["extra"]["random_window_hit_rate"] < 100
    assert set(two["figures"]) == {"budget", "regions"}
    assert (tmp_path / "eval" / "budgeted.png").stat().st_size > 0 and (tmp_path / "eval" / "regions.png").is_file()


def test_flops_only_deit_s_by_backbone_name(tmp_path):
    assert evaluate.main(["--flops-only", "--model", "deit_small_patch16_224", "--json", str(tmp_path / "f.json"),
                          "--output-dir", str(tmp_path / "o")]) == 0
    dense, two = read_valid_result(tmp_path / "f.json")["rows"]
    assert dense["gflops"] == pytest.approx(4.608, abs=1e-3) and round(two["gflops"], 2) == 3.81
    assert round(two["extra"]["location_gflops"], 2) == 1.10 and two["top1"] is None


def test_three_classes_image_folder(tmp_path):
    torch.manual_seed(0)
    ckpt = _save(timm.create_model("lfvit_vit_digits_patch8_112", num_classes=3), tmp_path / "c3.safetensors")
    data = image_folder(tmp_path / "folder")
    assert evaluate.main(_small(tmp_path, "--data", f"imagefolder:{data}", "--num-classes", "3", "--checkpoint",
                                ckpt, "--eta", "0.5")) == 0
    res = read_valid_result(tmp_path / "r.json")
    assert res["data"]["images"] == 6 and [r["images"] for r in res["rows"]] == [None, 6, 6]


@pytest.mark.parametrize("argv,match", [
    (["--eta", "1.5"], "--eta must be in [0, 1], got 1.5"),
    (["--checkpoint", "/nonexistent.pth"], "not found"),
    (["--model", "no_such_model"], "no LF-ViT model"),
    (["--model", "deit_small_patch16_224"], "--checkpoint PATH is required"),
    (["--model", "deit_small_patch16_224", "--pretrained"], "no hosted LF-ViT weights"),
    (["--data", "foo:/x"], "cannot parse data spec"),
    (["--img-size", "113"], "--img-size 113 is not a multiple of"),
    (["--limit", "0"], "--limit"),
])
def test_bad_input_is_one_line(argv, match, capsys, tmp_path):
    one_line_error(evaluate.main, [*argv, "--output-dir", str(tmp_path / "o")], capsys, match)


def test_truncated_checkpoint_is_one_line(lf_checkpoint, capsys, tmp_path):
    data = open(lf_checkpoint, "rb").read()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    one_line_error(evaluate.main, ["--checkpoint", str(tmp_path / "cut.safetensors"), "--output-dir",
                                   str(tmp_path / "o")], capsys, "not a valid safetensors file")
