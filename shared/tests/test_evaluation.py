import argparse

import pytest
import torch

from vitbench import evaluation as ev
from vitbench import throughput


class FakeClock:
    """Every model call takes ``cost[name]`` seconds, plus a drift that grows with each call (a loaded machine)."""

    def __init__(self):
        self.t, self.calls = 0.0, []

    def __call__(self):
        return self.t

    def model(self, name, cost):
        def run(x):
            self.calls.append(name)
            self.t += cost * (1 + 0.1 * len(self.calls))
            return x
        return run


def _settings(clock):
    costs = {"dense": 4.0, "a": 2.0, "b": 1.0}
    return [ev.Setting("dense" if n == "dense" else "m", n, "", {}, torch.nn.Identity(), gflops=costs[n],
                       timed=clock.model(n, c)) for n, c in costs.items()]


def test_one_compare_call_times_every_row_with_rotation_and_spread(monkeypatch):
    clock = FakeClock()
    settings = _settings(clock)
    calls = []
    real = throughput.compare
    monkeypatch.setattr(throughput, "compare", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = ev.EvalConfig(warmup=0, repeats=3)
    rows = [ev.empty_row(s) for s in settings]
    ev.time_rows(cfg, settings, rows, torch.zeros(2, 1), clock=clock)
    assert len(calls) == 1
    assert clock.calls == ["dense", "a", "b", "a", "b", "dense", "b", "dense", "a"]  # rotated each repeat
    dense, a, b = rows
    assert dense["speedup"] == 1.0 and dense["speedup_spread"] == [1.0, 1.0]
    assert a["speedup_spread"][0] <= a["speedup"] <= a["speedup_spread"][1]  # the drift shows as a spread
    assert a["speedup_spread"][0] < a["speedup_spread"][1]
    assert a["speedup"] == pytest.approx(a["img_s"] / dense["img_s"])  # both from median times: never contradict
    assert 1.5 < a["speedup"] < 2.5 and 3.0 < b["speedup"] < 5.0
    assert b["img_s"] > a["img_s"] > dense["img_s"]


def test_compare_rejects_bad_clock():
    with pytest.raises(ValueError, match="clock"):
        throughput.compare({"a": torch.nn.Identity()}, torch.zeros(1), clock="sundial")


def test_flops_rows_and_schema():
    rows = ev.flops_rows(_settings(FakeClock()))
    assert [r["gflops_saved"] for r in rows] == [0.0, 50.0, 75.0] and rows[2]["ideal_speedup"] == 4.0
    env = dict.fromkeys(ev.ENVIRONMENT_FIELDS)
    result = {"config": {}, "environment": env, "data": {}, "rows": rows}
    ev.validate_result(result)
    for broken in ({**rows[0], "top1": "high"}, {k: v for k, v in rows[0].items() if k != "extra"},
                   {**rows[0], "speedup_spread": [2.0, 1.0]}):
        with pytest.raises(ValueError):
            ev.validate_result({**result, "rows": [broken]})


def test_common_flags_parse_into_the_config():
    parser = ev.add_eval_args(argparse.ArgumentParser(), output_dir="runs/x")
    cfg = ev.EvalConfig.from_args(parser.parse_args(["--num-classes", "3", "--visualize", "--device", "cpu"]))
    assert cfg.num_classes == 3 and cfg.visualize == () and cfg.output_dir == "runs/x"
    assert ev.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in (dict(limit=0), dict(repeats=0), dict(data="foo:/x"), dict(device="cuda:x"), dict(crop_pct=2.0)):
        with pytest.raises(ValueError):
            ev.EvalConfig(**bad)


def test_json_may_not_replace_the_folder_s_results(tmp_path):
    with pytest.raises(ValueError, match="would replace"):
        ev.prepare_outputs(ev.EvalConfig(output_dir=str(tmp_path), json=str(tmp_path / "results.json")))
    (tmp_path / "file").write_text("")
    with pytest.raises(PermissionError, match="not writable"):
        ev.prepare_outputs(ev.EvalConfig(output_dir=str(tmp_path / "file" / "x")))
    assert [p.name for p in tmp_path.iterdir()] == ["file"]
