"""--num-classes on every *-train (a new head, the old one's weights dropped, said in one line) and --report-to
tensorboard (the ats-train side: packages/ats/tests/test_ats_train_runs.py)."""

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
def test_report_to_a_tracker_that_is_not_installed_is_one_line(tmp_path, capsys, tracker):
    import importlib.util

    if importlib.util.find_spec(tracker):
        pytest.skip(f"{tracker} is installed")
    assert train_main(["--cpu", "--report-to", tracker, "--output-dir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"vitbench-train: error: --report-to {tracker}: the {tracker} package is not installed (pip install {tracker})"]
    assert not (tmp_path / "run").exists()
