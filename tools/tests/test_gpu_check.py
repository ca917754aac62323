"""CPU part of tools/gpu_check.py: the device comparison (CPU against CPU here) and the refusal without CUDA."""

import importlib.util
from pathlib import Path

import pytest
import torch

spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).parents[1] / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def test_cpu_against_cpu_agrees_exactly():
    models = gpu_check.build_models(gpu_check.TINY)
    images = torch.randn(8, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    rows = {r["method"]: r for r in gpu_check.agreement(models, images, device="cpu")}
    assert set(rows) == {"dense", "ats", "lfvit", "liferegress"}
    for r in rows.values():
        assert r["top1_agreement"] == 1.0 and r["logits_max_diff"] == 0.0
    assert rows["ats"]["identical_selection"] == rows["lfvit"]["identical_selection"] == 1.0
    assert rows["liferegress"]["identical_selection"] == 1.0 and rows["liferegress"]["lives_max_diff"] == 0.0


def test_bf16_against_fp32_is_reported():
    models = gpu_check.build_models(gpu_check.TINY)
    images = torch.randn(8, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    rows = gpu_check.agreement(models, images, device="cpu", dtype="bf16")
    assert all(0.0 <= r["top1_agreement"] <= 1.0 and r["logits_max_diff"] > 0 for r in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_cuda(capsys, tmp_path):
    assert gpu_check.main(["--json", str(tmp_path / "g.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpu_check: error: no CUDA device") and not (tmp_path / "g.json").exists()


def test_throughput_reports_every_sweep_as_it_finishes():
    models = gpu_check.build_models(gpu_check.TINY)
    seen = []
    rows = gpu_check.throughput(models, [1, 2], ["fp32", "bf16"], ["eager"], "cpu", repeats=1, img_size=48,
                                progress=lambda so_far: seen.append([(r["dtype"], r["batch_size"]) for r in so_far]))
    assert len(seen) == 2 and len(seen[0]) == 8 and seen[1] == [(r["dtype"], r["batch_size"]) for r in rows]
    assert {r["dtype"] for r in rows[8:]} == {"bf16"} and {r["name"] for r in rows} == {"dense", "ats", "lfvit",
                                                                                        "liferegress"}
    assert all(r["paper_speedup"] == gpu_check.PAPER_SPEEDUP.get(r["name"]) for r in rows)


def test_video_rows_on_cpu():
    video = gpu_check.build_video_models("xvit_digits_patch8_64", **gpu_check.TINY_VIDEO)
    clips = gpu_check.video_clips(video["dense"], 2)
    checks = {r["method"]: r for r in gpu_check.video_agreement(video, clips, "cpu")}
    assert checks["video ats"]["identical_selection"] == 1.0 and checks["video ats"]["logits_max_diff"] == 0.0
    seen = []
    rows = gpu_check.video_throughput(video, [1, 2], ["fp32"], ["eager"], "cpu", repeats=1, progress=seen.append)
    assert [(r["name"], r["batch_size"]) for r in rows] == [("dense", 1), ("ats", 1), ("dense", 2), ("ats", 2)]
    assert len(seen) == 1 and all(r["ideal_speedup"] >= 1.0 and r["fraction_of_ideal"] > 0 for r in rows)
    assert all(r["syncs"] == 0 for r in rows if r["name"] == "dense")
    assert all(0 < r["syncs"] <= 9 for r in rows if r["name"] == "ats")
