"""The evaluation harness owns its outputs and writes them all or nothing: a full disk, a Ctrl-C or a SIGTERM leaves
the earlier results and figures byte-identical with no temporary files, a training run's folder and another run's
results are never replaced, and weights holding NaN are refused by name before any evaluation."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch

from vitbench import cli
from vitbench import evaluation as ev
from vitbench import outputs
from vitbench.figures import accuracy_vs_gflops

DATA = "digits:train_size=8,val_size=8"
TOY = textwrap.dedent('''
    """A toy *-eval on the harness: a dense row and two copies of it, one figure per row."""
    import sys, time
    import timm, torch
    from vitbench import cli, evaluation as ev
    from vitbench.figures import save

    def main(argv=None, delay=0.0):
        parser = ev.build_parser("toy-eval", "toy", "runs/toy")

        def command(args):
            cfg = ev.EvalConfig.from_args(args)
            torch.manual_seed(0)
            model = timm.create_model("vit_digits_patch8_112", depth=1).eval()
            import matplotlib.pyplot as plt

            def settings(loader, spec):
                out = []
                for point, factor in (("", 1.0), ("a", 0.5), ("b", 0.25)):
                    def step(images, labels, index, factor=factor):
                        time.sleep(delay)
                        return model(images), torch.tensor(factor)

                    def finish(row, out_dir, point=point):
                        fig, ax = plt.subplots()
                        ax.plot([0, 1], [0, row["top1"] or 0])
                        row["figures"]["curve"] = str(save(fig, out_dir / f"curve_{point or 'dense'}.png"))

                    out.append(ev.Setting("dense" if not point else "toy", "toy" if point else "dense", point, {},
                                          model, step=step, finish=finish, gflops=factor))
                return out

            ev.harness(cfg, None, model, settings, figure_patterns=("curve_*.png",), sweep_title="toy")
            return 0

        return cli.run(parser, command, argv)

    if __name__ == "__main__":
        sys.exit(main())
''')


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy command as a module on sys.path (also for subprocesses), run in ``tmp_path``."""
    (tmp_path / "toy_eval.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("toy_eval", None)
    import toy_eval

    return toy_eval


ARGS = ["--data", DATA, "--num-workers", "0", "--no-throughput", "--batch-size", "4"]


def run_toy(toy, capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    rc = toy.main([*ARGS, *argv])
    return rc, capsys.readouterr().err


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones included) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*")
            if p.name.endswith(".tmp") or outputs.STAGING_PREFIX in p.name or p.name.startswith(".write_check")]


def test_a_rerun_replaces_the_earlier_evaluation_and_its_figures(toy, capsys, tmp_path):
    rc, err = run_toy(toy, capsys, "--output-dir", "e")
    assert rc == 0, err
    first = json.loads((tmp_path / "e" / "results.json").read_text())
    assert [Path(f).parent.name for r in first["rows"] for f in r["figures"].values()] == ["e"] * 4
    (tmp_path / "e" / "notes.txt").write_text("mine")  # a file of the user's: never touched
    (tmp_path / "e" / "curve_old.png").write_bytes(b"an earlier figure")
    first["rows"][1]["figures"]["old"] = "e/curve_old.png"  # as if an earlier run had drawn it
    (tmp_path / "e" / "results.json").write_text(json.dumps(first))
    rc, err = run_toy(toy, capsys, "--output-dir", "e")
    assert rc == 0, err
    names = sorted(p.name for p in (tmp_path / "e").iterdir())
    assert names == ["accuracy_vs_gflops.png", "curve_a.png", "curve_b.png", "curve_dense.png", "notes.txt",
                     "results.json", "results.md"]
    assert "removed the earlier evaluation's curve_old.png" in err and "left as they were: notes.txt" in err
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["figure", "results.json", "--json"])
def test_a_full_disk_leaves_the_earlier_results_and_figures_byte_identical(toy, capsys, tmp_path, monkeypatch,
                                                                           where):
    rc, err = run_toy(toy, capsys, "--output-dir", "e", "--json", "r.json")
    assert rc == 0, err
    before = snapshot(tmp_path / "e")
    json_before = (tmp_path / "r.json").read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "figure":  # a figure half written when the disk fills
        import vitbench.figures as figures

        real = figures.save
        def half(fig, path, dpi=110):
            Path(path).write_bytes(b"\x89PNG half")
            return real(fig, path, dpi) if "dense" in str(path) else full()
        monkeypatch.setattr(figures, "save", half)
        monkeypatch.setattr(toy, "save", half, raising=False)
    elif where == "results.json":
        monkeypatch.setattr(ev, "write_json", full)
    else:
        monkeypatch.setattr(outputs.os, "fsync", full)
    rc, err = run_toy(toy, capsys, "--output-dir", "e", "--json", "r.json")
    lines = [line for line in err.splitlines() if line.startswith("toy-eval: error: ")]
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("toy-eval: error: cannot write e: No space left on device (")
    assert lines[0].endswith(" MB free); nothing was written, the earlier files in e are untouched")
    assert snapshot(tmp_path / "e") == before and (tmp_path / "r.json").read_bytes() == json_before
    assert leftovers(tmp_path) == [] and "Traceback" not in err


def test_a_training_run_s_folder_and_another_run_s_results_are_never_replaced(toy, capsys, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("config.json", "log.jsonl", "results.json", "model.safetensors"):
        (run / name).write_text(f"the training's {name}")
    rc, err = run_toy(toy, capsys, "--output-dir", "e")
    assert rc == 0, err
    other = tmp_path / "mine.json"
    other.write_text("not an evaluation")
    before = {**snapshot(run), **{f"e/{k}": v for k, v in snapshot(tmp_path / "e").items()}}
    cases = {
        ("--output-dir", "run"): "--output-dir run holds a training run (config.json, log.jsonl, model.safetensors, "
                                 "checkpoints); an evaluation never writes into it: give another --output-dir",
        ("--json", "run/results.json"): "--json run/results.json is in a training run's folder (config.json, "
                                        "log.jsonl, model.safetensors, checkpoints); give a path outside it",
        ("--json", "e/results.json"): "--json e/results.json would replace another evaluation's results.json (its "
                                      "folder's results.md would no longer match); give another path",
        ("--json", "mine.json"): "--json mine.json exists and is not an evaluation's results; an evaluation never "
                                 "replaces it: give another path",
    }
    for argv, message in cases.items():
        rc, err = run_toy(toy, capsys, *(argv if argv[0] == "--output-dir" else ("--output-dir", "e2", *argv)))
        assert rc == 2 and err.strip().splitlines()[-1] == f"toy-eval: error: {message}", err
    assert {**snapshot(run), **{f"e/{k}": v for k, v in snapshot(tmp_path / "e").items()}} == before
    assert other.read_text() == "not an evaluation" and not (tmp_path / "e2").exists()
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "results.json").write_text('{"top1": 3}')
    rc, err = run_toy(toy, capsys, "--output-dir", "x")
    assert rc == 2 and "holds a results.json that no evaluation wrote" in err


def test_json_may_replace_its_own_earlier_file(toy, capsys, tmp_path):
    for _ in range(2):
        rc, err = run_toy(toy, capsys, "--output-dir", "e", "--json", "summary.json")
        assert rc == 0, err
    assert json.loads((tmp_path / "summary.json").read_text())["rows"][0]["label"] == "dense"


def test_top5_is_null_for_five_classes_or_fewer(toy, capsys, tmp_path):
    rc, err = run_toy(toy, capsys, "--output-dir", "e")
    rows = json.loads((tmp_path / "e" / "results.json").read_text())["rows"]
    assert rows[0]["top5"] is not None  # digits: 10 classes

    settings = [ev.Setting("dense", "dense", "", {}, torch.nn.Linear(4, 3),
                           step=lambda x, y, i: (torch.eye(3)[y], torch.tensor(1.0)))]
    loader = [(torch.zeros(3, 4), torch.arange(3), torch.arange(3))]

    class Loader(list):
        dataset = type("D", (), {"classes": ["a", "b", "c"], "__len__": lambda self: 3})()

    rows = ev.evaluate(ev.EvalConfig(throughput=False), settings, Loader(loader), torch.device("cpu"), tmp_path)
    assert rows[0]["top1"] == 100.0 and rows[0]["top5"] is None


@pytest.mark.parametrize("tensor", ["head.weight", "blocks.1.attn.qkv.weight"])
def test_non_finite_weights_are_refused_naming_the_first_bad_tensor(tensor, tmp_path):
    from vitbench.models import check_finite, read_state_dict, save_weights

    model = timm.create_model("vit_digits_patch8_112")
    with torch.no_grad():
        model.get_parameter(tensor).view(-1)[3] = float("nan")
    path = save_weights(model, tmp_path / "nan.safetensors")
    with pytest.raises(ValueError) as info:
        read_state_dict(path)
    size = model.get_parameter(tensor).numel()
    assert str(info.value) == (f"checkpoint {path} holds non-finite weights: {tensor} has 1 NaN/inf value(s) of "
                               f"{size} (a diverged or damaged run); give intact weights")
    with pytest.raises(ValueError, match=f"the weights of 'dense' holds non-finite weights: {tensor} has 1"):
        ev.check_weights([ev.Setting("dense", "dense", "", {}, model)])
    check_finite(timm.create_model("vit_digits_patch8_112"), "fresh weights")  # finite: no error


SIGNAL_SCRIPT = textwrap.dedent('''
    import signal, sys
    import toy_eval
    # Ctrl-C as in a terminal, also when the tests themselves run in the background (SIGINT ignored, inherited)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(toy_eval.main(sys.argv[1:], delay=0.5))
''')


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_evaluation_is_one_line_and_keeps_the_earlier_outputs(toy, capsys, tmp_path, sig, code):
    rc, err = run_toy(toy, capsys, "--output-dir", "e")
    assert rc == 0, err
    before = snapshot(tmp_path / "e")
    (tmp_path / "signal_toy.py").write_text(SIGNAL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "signal_toy.py", *ARGS, "--batch-size", "1", "--output-dir", "e"],
                            cwd=tmp_path, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines = []
    for line in proc.stderr:  # the pass has started (each batch then takes 0.5 s per setting)
        lines.append(line)
        if line.startswith("evaluating "):
            break
    proc.send_signal(sig)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == code, "".join(lines) + rest
    name = signal.Signals(sig).name
    last = [line for line in rest.splitlines() if line.strip()][-1]
    assert last == f"toy-eval: interrupted ({name}); nothing written, the earlier files in e are untouched"
    assert "Traceback" not in rest
    assert snapshot(tmp_path / "e") == before and leftovers(tmp_path) == []


def test_staging_folders_of_dead_runs_are_removed(tmp_path):
    dead = tmp_path / f"{outputs.STAGING_PREFIX}e-999999999"
    alive = tmp_path / f"{outputs.STAGING_PREFIX}e-{os.getpid()}"
    for folder in (dead, alive):
        folder.mkdir()
        (folder / "results.json").write_text("{}")
    outputs.remove_dead_staging(tmp_path)
    assert not dead.exists() and alive.exists()


def test_interrupt_outside_the_harness_is_one_line(capsys):
    parser = ev.build_parser("toy-eval", "toy", "runs/toy")

    def body(args):
        raise KeyboardInterrupt

    assert cli.run(parser, body, []) == 130
    assert capsys.readouterr().err == "toy-eval: interrupted (SIGINT)\n"


@pytest.mark.parametrize("bar", ["drawn", "in its constructor"])
def test_interrupt_with_a_progress_bar_open_starts_its_own_line(capsys, bar):
    """A bar left open gets its line ended first; one the signal stopped in its constructor (no attributes yet)
    drew nothing."""
    from tqdm.auto import tqdm

    parser = ev.build_parser("toy-eval", "toy", "runs/toy")
    bars = []  # open while the interrupt arrives

    def body(args):
        bars.append(tqdm(total=2, disable=False) if bar == "drawn" else tqdm.__new__(tqdm))  # __new__: no __init__
        raise KeyboardInterrupt

    assert cli.run(parser, body, []) == 130
    err = capsys.readouterr().err
    if bar == "drawn":
        assert err.startswith("\r  0%|") and err.endswith("it/s]\ntoy-eval: interrupted (SIGINT)\n"), err
        bars[0].close()
    else:
        assert err == "toy-eval: interrupted (SIGINT)\n"


def test_accuracy_figure_is_staged_like_the_rest(tmp_path):
    rows = [{**ev.empty_row(ev.Setting("dense", "dense", "", {}, torch.nn.Identity())), "top1": 50.0, "gflops": 1.0}]
    stage = outputs.StagedOutputs(tmp_path / "e")
    with stage:
        path = accuracy_vs_gflops(rows, stage.dir / "accuracy_vs_gflops.png", "t")
        assert stage.final(path) == tmp_path / "e" / "accuracy_vs_gflops.png"
        stage.commit()
    assert (tmp_path / "e" / "accuracy_vs_gflops.png").is_file() and not stage.dir.exists()


@pytest.mark.parametrize("workers", ["0", "1"])
def test_an_unreadable_image_during_evaluation_is_one_line_with_the_hint(toy, capsys, tmp_path, workers):
    from vitbench.digits import DigitsConfig, export

    root = export(tmp_path / "d", DigitsConfig(train_size=40, val_size=40))
    bad = sorted((root / "val").rglob("*.png"))[2]
    bad.write_bytes(bad.read_bytes()[:60])  # the header reads, the pixels do not
    rc, err = run_toy(toy, capsys, "--output-dir", "e", "--data", f"imagefolder:{root}", "--num-workers", workers)
    assert rc == 2 and "Traceback" not in err and "DataLoader worker" not in err, err
    assert err.strip().splitlines()[-1].startswith(f"toy-eval: error: cannot decode image {bad}: ")
    assert err.strip().endswith("; drop unreadable files with --skip-corrupt")
    rc, err = run_toy(toy, capsys, "--output-dir", "e", "--data", f"imagefolder:{root}", "--skip-corrupt",
                      "--limit", "4")
    assert rc == 0, err
    data = json.loads((tmp_path / "e" / "results.json").read_text())["data"]
    assert data["images"] == 4 and data["skipped"] == [str(bad)]


def test_a_nearly_full_disk_is_refused_before_the_work(toy, capsys, tmp_path, monkeypatch):
    rc, err = run_toy(toy, capsys, "--output-dir", "e")
    assert rc == 0, err
    before = snapshot(tmp_path / "e")
    monkeypatch.setattr(outputs, "free_mb", lambda path: 0.5)
    rc, err = run_toy(toy, capsys, "--output-dir", "e")
    assert rc == 2 and "evaluating" not in err, err
    assert err.strip().splitlines()[-1] == (
        "toy-eval: error: cannot write e: 0.5 MB free, an evaluation writes about 2 MB or more (results and "
        "figures); free space or choose another --output-dir")
    assert snapshot(tmp_path / "e") == before and leftovers(tmp_path) == []


def test_figures_of_another_origin_are_never_replaced(toy, capsys, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "curve_dense.png").write_bytes(b"the user's own figure")
    rc, err = run_toy(toy, capsys, "--output-dir", "mine")
    assert rc == 2 and err.strip().splitlines()[-1] == (
        "toy-eval: error: --output-dir mine holds curve_dense.png that no evaluation wrote there; an evaluation never "
        "replaces it: give another --output-dir"), err
    assert (tmp_path / "mine" / "curve_dense.png").read_bytes() == b"the user's own figure"
    rc, err = run_toy(toy, capsys, "--output-dir", "e")
    assert rc == 0, err
    (tmp_path / "e" / "curve_zz.png").write_bytes(b"not listed by the earlier evaluation")
    rc, err = run_toy(toy, capsys, "--output-dir", "e")
    assert rc == 2 and "--output-dir e holds curve_zz.png that no evaluation wrote there" in err
