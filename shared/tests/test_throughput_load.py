"""Timings carry the load they were taken under and columns that agree: ``speedup`` is the ratio of median times
(so it equals the ratio of ``img_s``), the per-repeat ratios give the spread, every timing row records the load
average, a load above the core count warns in one line, and the printed tables explain their columns."""

import json
import os

import pytest
import torch

from vitbench import throughput


class SteppedClock:
    """Each call of model ``name`` takes ``costs[name][repeat]`` seconds (a noisy machine)."""

    def __init__(self, costs):
        self.t, self.costs, self.n = 0.0, costs, dict.fromkeys(costs, 0)

    def __call__(self):
        return self.t

    def model(self, name):
        def run(x):
            self.t += self.costs[name][self.n[name]]
            self.n[name] += 1
            return x
        return run


def test_speedup_is_the_ratio_of_median_times_and_of_img_s():
    # per-repeat ratios 1.25, 2, 10 (median 2): their median would contradict img_s; the ratio of medians does not
    clock = SteppedClock({"dense": [1.0, 2.0, 10.0], "m": [0.8, 1.0, 1.0]})
    rows = throughput.compare({n: clock.model(n) for n in clock.costs}, torch.zeros(4, 1), warmup=0, repeats=3,
                              clock=clock)
    dense, m = rows
    assert m["speedup"] == pytest.approx(2.0 / 1.0) == pytest.approx(m["img_s"] / dense["img_s"])
    assert m["speedup_spread"] == pytest.approx([1.25, 10.0])
    assert dense["speedup"] == 1.0


def test_every_row_records_the_load_and_a_high_load_warns(monkeypatch, capsys):
    monkeypatch.setattr(os, "getloadavg", lambda: (9.5, 7.0, 3.0))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    rows = throughput.compare({"a": torch.nn.Identity()}, torch.zeros(2, 3), warmup=0, repeats=1)
    assert rows[0]["load_average"] == [9.5, 7.0, 3.0]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "load average 9.5 over the 2 CPU cores" in err[0] and "OMP_NUM_THREADS=1" in err[0]
    monkeypatch.setattr(os, "getloadavg", lambda: (1.5, 1.0, 1.0))
    throughput.compare({"a": torch.nn.Identity()}, torch.zeros(2, 3), warmup=0, repeats=1)
    assert capsys.readouterr().err == ""


def test_no_load_average_is_recorded_as_none(monkeypatch):
    def unavailable():
        raise OSError("no load average here")

    monkeypatch.setattr(os, "getloadavg", unavailable)
    assert throughput.load_average() is None and not throughput.warn_if_loaded(None)


def test_cli_table_explains_its_columns_and_json_has_the_load(tmp_path, capsys):
    out = tmp_path / "t.json"
    assert throughput.main(["--models", "vit_digits_patch8_112", "--batch-sizes", "2", "--warmup", "0",
                            "--repeats", "2", "--no-syncs", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| spread | load |" in printed and "img_s: batch / median time" in printed and "speedup:" in printed
    data = json.loads(out.read_text())
    assert data["cores"] == os.cpu_count() and len(data["rows"][0]["load_average"]) == 3


def test_legend_names_the_unit_and_the_load():
    assert throughput.legend([3.25, 1, 1], "clip_s").startswith("clip_s: batch / median time")
    assert f"load average 3.2 on {os.cpu_count()} cores" in throughput.legend([3.25, 1, 1])
