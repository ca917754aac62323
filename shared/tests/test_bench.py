import argparse
import json

import pytest
import torch

from vitbench import bench, throughput


@pytest.fixture
def fake_clock(monkeypatch):
    """A clock that only the timed callables advance: each adds its cost per image."""
    now = [0.0]
    monkeypatch.setitem(throughput.CLOCKS, "wall", lambda: now[0])

    def costing(per_image: float, sync: bool = False):
        def fn(x):
            now[0] += per_image * x.shape[0]
            return x.sum().tolist() if sync else x.sum()
        return fn
    return costing


def test_compare_methods_ratios_against_eager_and_compiled_dense(fake_clock):
    cfg = bench.BenchConfig(warmup=0, repeats=3, clock="wall")
    pool = torch.zeros(bench.pool_size(1), 3)
    method = bench.Method(fake_clock(1.0, sync=True), ideal=5.0, compiled=fake_clock(0.5))
    rows = bench.compare_methods(fake_clock(4.0), {"m": method}, pool, 1, cfg, dense_compiled=fake_clock(3.0),
                                 extra={"released": fake_clock(2.0)})
    by = {r["name"]: r for r in rows}
    assert list(by) == ["dense", "dense (compiled)", "m", "released"]  # compiled methods only with --compile all
    assert by["m"]["speedup"] == pytest.approx(4.0) and by["m"]["speedup_vs_compiled"] == pytest.approx(3.0)
    assert by["m"]["fraction_of_ideal"] == pytest.approx(0.8)
    assert by["m"]["fraction_of_ideal_vs_compiled"] == pytest.approx(0.6)
    assert by["m"]["ms_per_image"] == pytest.approx(1e3) and by["m"]["images_per_round"] == 9
    assert by["m"]["syncs"] == 1 and by["dense"]["syncs"] == 0
    assert "ideal_speedup" not in by["released"] and by["released"]["speedup"] == pytest.approx(2.0)

    all_rows = bench.compare_methods(fake_clock(4.0), {"m": method}, torch.zeros(8, 3), 8,
                                     bench.BenchConfig(compile="all", warmup=0, repeats=1, clock="wall"))
    compiled = {r["name"]: r for r in all_rows}["m (compiled)"]
    assert compiled["compiled"] and compiled["speedup"] == pytest.approx(8.0) and compiled["ideal_speedup"] == 5.0
    assert "speedup_vs_compiled" not in compiled  # no compiled dense given


def test_pool_and_config():
    assert [bench.pool_size(b) for b in (1, 4, 9, 32)] == [9, 12, 9, 32]
    p = argparse.ArgumentParser()
    bench.add_arguments(p, "runs/bench/x.json")
    with pytest.raises(ValueError, match="--threads 1"):
        bench.config(p.parse_args(["--threads", "2"]), "toy")
    with pytest.raises(ValueError, match="positive"):
        bench.config(p.parse_args(["--batch-sizes", "0"]), "toy")
    assert bench.config(p.parse_args([]), "toy").weight_layout == "transposed"
    linear = torch.nn.Linear(4, 3)
    assert bench.laid_out(linear, bench.config(p.parse_args(["--weight-layout", "timm"]), "toy")).weight.is_contiguous()
    assert bench.laid_out(linear, bench.config(p.parse_args([]), "toy")).weight.t().is_contiguous()
    assert bench.laid_out(None, bench.config(p.parse_args([]), "toy")) is None  # no released checkout


def test_summary_is_one_table_of_every_file(tmp_path, capsys):
    for name in ("a", "b"):
        (tmp_path / f"{name}.json").write_text(json.dumps({"benchmark": name, "rows": [
            {"name": "dense", "batch_size": 1, "speedup": 1.0}, {"name": name, "batch_size": 1, "speedup": 2.0}]}))
    assert bench.main([str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 2 + 4 and table[-1].startswith("| b | b | 1 |")
    assert table[0] == "| benchmark | name | batch_size | speedup |"  # only the columns some row has
    (tmp_path / "c.json").write_text("{}")
    assert bench.main([str(tmp_path / "c.json")]) == 2
    assert "not a benchmark result" in capsys.readouterr().err


def test_speedups_over_a_released_row(fake_clock):
    cfg = bench.BenchConfig(warmup=0, repeats=3, clock="wall")
    pool = torch.zeros(bench.pool_size(1), 3)
    methods = {"m": bench.Method(fake_clock(1.0), ideal=5.0), "other": bench.Method(fake_clock(2.0), ideal=2.0)}
    rows = bench.compare_methods(fake_clock(4.0), methods, pool, 1, cfg, extra={"released": fake_clock(3.0)})
    bench.speedups_over(rows, "released", "vs_released", "m")
    by = {r["name"]: r for r in rows}
    assert by["m"]["vs_released"] == pytest.approx(3.0)
    assert all("vs_released" not in by[n] for n in ("dense", "other", "released"))
    bench.speedups_over(rows, "not timed", "vs_missing", "m")
    assert "vs_missing" not in by["m"]


def test_released_argument_and_path(tmp_path, monkeypatch):
    monkeypatch.setenv("X_RELEASED", str(tmp_path))
    p = argparse.ArgumentParser()
    bench.add_released_argument(p, "github.com/x/y", "X_RELEASED")
    assert p.parse_args([]).released == str(tmp_path)
    assert bench.released_path(None, "a/b.py") is None
    with pytest.raises(ValueError, match="no a/b.py there"):
        bench.released_path(str(tmp_path), "a/b.py")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b.py").write_text("")
    assert bench.released_path(str(tmp_path), "a/b.py") == tmp_path


def test_json_replaces_only_an_earlier_result_of_the_same_benchmark(tmp_path):
    """A benchmark's --json never replaces another command's file, nor another benchmark's (checked by ``config``,
    before any timing); its own earlier result is replaced, once, atomically."""
    p = argparse.ArgumentParser()
    bench.add_arguments(p, str(tmp_path / "x.json"))
    foreign = tmp_path / "flops.json"
    foreign.write_text(json.dumps({"model": "m", "img_size": 112, "gmacs": 1.0}))
    with pytest.raises(ValueError, match="is not an earlier result of this command; it is never replaced"):
        bench.config(p.parse_args(["--json", str(foreign)]), "one")
    bench.report([{"name": "dense", "batch_size": 1}], bench.config(p.parse_args([]), "one"))
    bench.report([{"name": "dense", "batch_size": 2}], bench.config(p.parse_args([]), "one"))
    written = json.loads((tmp_path / "x.json").read_text())
    assert written["benchmark"] == "one" and written["rows"][0]["batch_size"] == 2
    with pytest.raises(ValueError, match="is not an earlier result of this command; it is never replaced"):
        bench.config(p.parse_args([]), "two")
    assert json.loads((tmp_path / "x.json").read_text()) == written
    assert sorted(f.name for f in tmp_path.iterdir()) == ["flops.json", "x.json"]
