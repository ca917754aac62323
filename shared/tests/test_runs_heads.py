"""--num-classes on every *-train (a new head, the old one's weights dropped, said in one line) and --report-to
(the ats-train side: packages/ats/tests/test_ats_train_runs.py): each tracker's records read back with its own
reader (vitbench's test extra installs tensorboard, wandb and mlflow)."""

import json
import os

import pytest
from safetensors.torch import load_file

from vitbench.train import main as train_main
from vitbench.testing import image_folder
from vitbench.testing import exit_code

DIGITS = "digits:train_size=96,val_size=32"


def _folder(root, size=32):
    """Three learnable classes, 4 training and 2 validation images each."""
    return image_folder(root, per_class=4, val_per_class=2, size=size, coloured=True)


def test_num_classes_drops_the_checkpoints_head(tmp_path, capsys):
    import timm

    from vitbench.models import save_weights

    ckpt = save_weights(timm.create_model("vit_digits_patch8_112"), tmp_path / "w.safetensors")
    root = _folder(tmp_path / "folder", size=112)
    out = tmp_path / "run"
    assert train_main(["--cpu", "--data", f"imagefolder:{root}", "--checkpoint", str(ckpt), "--num-classes", "3",
                       "--epochs", "1", "--batch-size", "4", "--num-workers", "0", "--warmup-epochs", "0",
                       "--repeated-aug", "0", "--mixup", "0", "--cutmix", "0", "--output-dir", str(out)]) == 0
    assert ("--num-classes 3: a new 3-class head; the --checkpoint's 10-class head weights dropped"
            in capsys.readouterr().err)
    assert tuple(load_file(str(out / "model.safetensors"))["head.weight"].shape) == (3, 64)


def test_num_classes_without_it_names_the_flag(tmp_path, capsys):
    root = _folder(tmp_path / "folder", size=112)
    assert exit_code(train_main, ["--cpu", "--data", f"imagefolder:{root}", "--num-workers", "0",
                            "--output-dir", str(tmp_path / "run")]) == 2
    assert ("model vit_digits_patch8_112 has 10 classes but imagefolder:" in capsys.readouterr().err)


def test_report_to_tensorboard_writes_the_logged_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    argv = ["--cpu", "--data", DIGITS, "--limit-train", "16", "--limit-val", "8", "--batch-size", "8",
            "--num-workers", "0", "--epochs", "2", "--warmup-epochs", "0", "--report-to", "tensorboard",
            "--checkpointing-steps", "1", "--output-dir", str(out)]
    assert train_main([*argv, "--max-steps", "2"]) == 0  # epoch 0, then a resume appends epoch 1
    assert train_main([*argv, "--resume", "auto"]) == 0
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in log if "train_loss" in r]
    events = out / "tracking" / "vitbench"
    scalars = {}
    for path in sorted(events.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    assert sorted(scalars["train_loss"]) == [(r["updates"], pytest.approx(r["train_loss"])) for r in epochs]
    assert sorted(scalars["top1"]) == [(r["updates"], pytest.approx(r["top1"])) for r in epochs]
    assert len(list(events.glob("events.out.tfevents.*"))) == 2  # the resumed run appended a second file
    assert json.loads((out / "config.json").read_text())["report_to"] == "tensorboard"
    assert os.path.isdir(out / "tracking")


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_report_to_a_tracker_that_is_not_installed_is_one_line(tmp_path, capsys, monkeypatch, tracker):
    import importlib.util

    from vitbench.engine import tracking

    real = importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec",
                        lambda name, *a: None if name == tracker else real(name, *a))  # as if not installed
    assert train_main(["--cpu", "--report-to", tracker, "--output-dir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"vitbench-train: error: --report-to {tracker}: the {tracker} package is not installed (pip install {tracker})"]
    assert not (tmp_path / "run").exists()


def _tracked_run(out, tracker):
    argv = ["--cpu", "--data", DIGITS, "--limit-train", "16", "--limit-val", "8", "--batch-size", "8",
            "--num-workers", "0", "--epochs", "2", "--warmup-epochs", "0", "--report-to", tracker,
            "--checkpointing-steps", "1", "--output-dir", str(out)]
    assert train_main([*argv, "--max-steps", "2"]) == 0  # epoch 0, then a resume continues the same tracker run
    assert train_main([*argv, "--resume", "auto"]) == 0
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in log if "train_loss" in r], json.loads((out / "config.json").read_text())["tracker_run"]


def test_report_to_mlflow_keeps_its_store_in_the_run_folder(tmp_path, monkeypatch):
    """Without MLFLOW_TRACKING_URI the store is OUTPUT_DIR/tracking/mlflow.db (MLflow's own default is a database
    in the working directory); a resume logs into a run of the same name."""
    pytest.importorskip("mlflow")
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    epochs, name = _tracked_run(out, "mlflow")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing in the working directory
    client = mlflow.MlflowClient(f"sqlite:///{out / 'tracking' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("vitbench").experiment_id])
    assert {r.info.run_name for r in runs} == {name}
    logged = sorted((m.step, m.value) for r in runs for m in client.get_metric_history(r.info.run_id, "train_loss"))
    assert logged == [(r["updates"], pytest.approx(r["train_loss"])) for r in epochs]


def test_report_to_wandb_resumes_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # no account, no network: files only
    out = tmp_path / "run"
    _, name = _tracked_run(out, "wandb")
    runs = sorted(p.name for p in (out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.endswith(f"-{name}") for r in runs)  # both parts under the run's one id


def test_a_tracker_that_fails_to_start_is_one_line(tmp_path, capsys, monkeypatch):
    pytest.importorskip("tensorboard")
    from accelerate import Accelerator

    def unreachable(self, *args, **kwargs):
        raise ConnectionError("tracking server at http://mlflow:5000 unreachable\nretried 5 times")

    monkeypatch.setattr(Accelerator, "init_trackers", unreachable)
    assert train_main(["--cpu", "--data", DIGITS, "--limit-train", "8", "--limit-val", "8", "--batch-size", "8",
                       "--num-workers", "0", "--report-to", "tensorboard", "--output-dir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "vitbench-train: error: --report-to tensorboard: the tracker did not start (ConnectionError: tracking server "
        "at http://mlflow:5000 unreachable)")
