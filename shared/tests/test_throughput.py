import math

import pytest
import torch

from vitbench.throughput import compare, main, measure


def test_compare_returns_finite_positive_rates_relative_to_baseline():
    small = torch.nn.Linear(16, 16)
    large = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(4)])
    rows = compare({"small": small, "large": large}, torch.randn(8, 16), baseline="small", warmup=1, repeats=3)
    by = {r["name"]: r for r in rows}
    assert set(by) == {"small", "large"}
    assert by["small"]["speedup"] == 1.0
    for r in rows:
        assert math.isfinite(r["img_s"]) and r["img_s"] > 0 and r["median_ms"] > 0 and r["batch_size"] == 8
    assert measure(small, torch.randn(4, 16), warmup=0, repeats=1)["img_s"] > 0


def test_compare_rejects_bad_arguments():
    with pytest.raises(ValueError):
        compare({"a": torch.nn.Identity()}, torch.randn(2, 3), baseline="b")
    with pytest.raises(ValueError):
        compare({"a": torch.nn.Identity()}, torch.randn(2, 3), repeats=0)
    with pytest.raises(ValueError):
        compare({"a": torch.nn.Identity()}, torch.randn(2, 3), clock="sundial")


def test_thread_clock_counts_cpu_work():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = compare({"mm": lambda x: x @ x}, torch.randn(64, 64), warmup=0, repeats=2, clock="thread")
    finally:
        torch.set_num_threads(threads)
    assert rows[0]["clock"] == "thread" and rows[0]["img_s"] > 0


def test_cli(tmp_path):
    out = tmp_path / "t.json"
    assert main(["--models", "vit_digits_patch8_112", "--batch-size", "2", "--warmup", "0", "--repeats", "1",
                 "--json", str(out)]) == 0
    assert out.is_file()
