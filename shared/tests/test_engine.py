import json
import os
import subprocess
import sys
from functools import partial

import pytest
import timm
import torch
from safetensors.torch import load_file

from vitbench.engine import TrainConfig, train
from vitbench.train import main as train_main

DATA = "digits:train_size=96,val_size=32"


def _rc(argv):
    """The command's exit code (a flag refused at parse time exits through argparse)."""
    try:
        return train_main(argv)
    except SystemExit as e:
        return e.code


def _cfg(tmp_path, name, **kw):
    base = dict(data=DATA, output_dir=str(tmp_path / name), epochs=2, batch_size=16, lr=1e-3, unscale_lr=True,
                warmup_epochs=1, num_workers=0, seed=3, cpu=True, eval_every=1, drop_path=0.1)
    return TrainConfig(**{**base, **kw})


def _tiny():
    return timm.create_model("vit_digits_patch8_112", pretrained=False, depth=2, embed_dim=32, drop_path_rate=0.1)


def _weights(run_dir):
    return load_file(str(run_dir / "model.safetensors"))


def test_training_writes_results_checkpoints_and_learns(tmp_path):
    result = train(_cfg(tmp_path, "run", epochs=3), _tiny)
    out = tmp_path / "run"
    assert {"config.json", "log.jsonl", "model.safetensors", "results.json"} <= {p.name for p in out.iterdir()}
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert records[0]["event"] == "start" and records[0]["skipped_images"] == {"train": [], "val": []}
    log = [r for r in records if "event" not in r]
    assert [r["epoch"] for r in log] == [0, 1, 2] and result["updates"] == 18
    assert all(0 <= r["top1"] <= 100 for r in log)
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000012", "step_00000018"]
    assert not list((out / "checkpoints").glob(".tmp*"))


def test_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path):
    # uninterrupted: 2 epochs x 6 updates with a mid-epoch checkpoint every 4 updates
    train(_cfg(tmp_path, "full", checkpointing_steps=4), _tiny)
    # "killed" after 4 updates (mid-epoch 0), then resumed from the latest checkpoint
    train(_cfg(tmp_path, "split", checkpointing_steps=4, max_steps=4), _tiny)
    train(_cfg(tmp_path, "split", checkpointing_steps=4, resume="auto"), _tiny)
    full, split = _weights(tmp_path / "full"), _weights(tmp_path / "split")
    assert full.keys() == split.keys()
    for k in full:
        assert torch.equal(full[k], split[k]), k
    # resuming a run that already reached --max-steps trains no further
    again = train(_cfg(tmp_path, "split", checkpointing_steps=4, max_steps=4, resume="auto"), _tiny)
    assert again["updates"] == 12


def test_resume_with_a_wrong_model_is_refused(tmp_path):
    train(_cfg(tmp_path, "run", max_steps=2), _tiny)
    wider = partial(timm.create_model, "vit_digits_patch8_112", pretrained=False, depth=2, embed_dim=48)
    with pytest.raises(ValueError, match="cannot resume"):
        train(_cfg(tmp_path, "run", resume="auto"), wider)
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        train(_cfg(tmp_path, "run", resume=str(tmp_path)), _tiny)


def test_impossible_hyper_parameters_are_rejected():
    for bad in ({"epochs": 0}, {"lr": -1.0}, {"smoothing": 1.5}, {"grad_accum": 0}, {"mixed_precision": "fp8"},
                {"color_jitter": -0.1}):
        with pytest.raises(ValueError):
            TrainConfig(**bad)
    assert _rc(["--epochs", "0"]) == 2


def test_two_processes_train_in_sync(tmp_path):
    # the command users run on a CPU box; a subprocess, because forking a process whose OpenMP pool is
    # already running can deadlock
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vitbench.train", "--cpu", "--data", DATA, "--epochs", "1", "--batch-size", "8", "--lr", "1e-3",
           "--unscale-lr", "--warmup-epochs", "0", "--num-workers", "0", "--output-dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert result["world_size"] == 2 and result["ranks_in_sync"] is True
    assert result["updates"] == 96 // 2 // 8
    assert proc.stdout.count("done: top-1") == 1  # the main process prints the summary, not every rank


# --- runs that lose nothing: one folder per run, exact-or-refused resume, preemption, damaged checkpoints,
# corrupt data, unwritable outputs. Small runs: 32 training images, batch 8, 4 updates per epoch, 2 epochs.

def _small(out, **kw):
    base = dict(data=DATA, output_dir=str(out), epochs=2, batch_size=8, lr=1e-3, unscale_lr=True, warmup_epochs=1,
                num_workers=0, seed=3, cpu=True, limit_train=32, limit_val=8, eval_every=0, drop_path=0.1)
    return TrainConfig(**{**base, **kw})


def _never_built():
    raise AssertionError("the model was built although the run should have been refused first")


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted small run (8 updates) for the bitwise comparisons."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(_small(out), _tiny)
    return out


def test_reused_folder_is_refused_and_overwrite_starts_clean(tmp_path):
    out = tmp_path / "run"
    train(_small(out, checkpointing_steps=1, max_steps=2), _tiny)
    with pytest.raises(FileExistsError, match="holds another run .*--resume auto.*--overwrite"):
        train(_small(out, lr=2e-3), _never_built)
    result = train(_small(out, lr=2e-3, max_steps=1, overwrite=True), _tiny)
    assert result["updates"] == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001"]
    assert [r.get("event") for r in _log(out)] == ["start", None]
    assert json.loads((out / "config.json").read_text())["lr"] == 2e-3


def test_resume_with_changed_settings_is_refused_unless_overridden(tmp_path):
    out = tmp_path / "run"
    train(_small(out, max_steps=2), _tiny)
    with pytest.raises(ValueError, match=r"lr 0.001 -> 0.002.*--resume-override lr"):
        train(_small(out, resume="auto", lr=2e-3), _never_built)
    with pytest.raises(ValueError, match=r"batch_size 8 -> 4"):
        train(_small(out, resume="auto", batch_size=4, resume_override=("lr",)), _never_built)
    with pytest.raises(ValueError, match="unknown field"):
        train(_small(out, resume="auto", resume_override=("learning_rate",)), _never_built)
    result = train(_small(out, resume="auto", lr=2e-3, batch_size=4, resume_override=("lr", "batch-size")), _tiny)
    # the data position is the 16 samples seen: 16 more of epoch 0 at batch 4, then 32 of epoch 1
    assert result["updates"] == 2 + 16 // 4 + 32 // 4
    config = json.loads((out / "config.json").read_text())
    assert (config["lr"], config["batch_size"]) == (2e-3, 4)
    assert config["resume_overrides"] == [{"updates": 2, "checkpoint": str(out / "checkpoints" / "step_00000002"),
                                           "changes": {"lr": [1e-3, 2e-3], "batch_size": [8, 4]}}]
    resume = [r for r in _log(out) if r.get("event") == "resume"]
    assert len(resume) == 1 and resume[0]["overrides"] == {"lr": [1e-3, 2e-3], "batch_size": [8, 4]}


def test_sigterm_mid_epoch_checkpoints_exits_and_resumes_bitwise(tmp_path, reference):
    import signal

    from vitbench.engine import EXIT_PREEMPTED, Preempted

    calls = []

    def loss_fn(model, images, targets, criterion):
        calls.append(1)
        if len(calls) == 3:  # during update 3 of epoch 0's 4
            os.kill(os.getpid(), signal.SIGTERM)
        return criterion(model(images), targets)

    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted) as stop:
        train(_small(out), _tiny, loss_fn=loss_fn)
    assert stop.value.code == EXIT_PREEMPTED and stop.value.signal_name == "SIGTERM"
    assert stop.value.checkpoint == out / "checkpoints" / "step_00000003"
    assert json.loads((stop.value.checkpoint / "progress.json").read_text())["samples_done"] == 24
    assert _log(out)[-1] | {"checkpoint": None} == {"event": "preempted", "signal": "SIGTERM", "epoch": 0,
                                                     "updates": 3, "checkpoint": None}
    assert not (out / "model.safetensors").exists()
    assert signal.getsignal(signal.SIGTERM) is before  # the run's handler is gone again
    train(_small(out, resume="auto"), _tiny)
    assert _same_weights(out, reference)


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, reference, capsys):
    out = tmp_path / "run"
    train(_small(out, checkpointing_steps=2, max_steps=6), _tiny)
    newest = out / "checkpoints" / "step_00000006"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    train(_small(out, checkpointing_steps=2, resume="auto"), _tiny)
    assert "step_00000006 is damaged (model.safetensors has" in capsys.readouterr().err
    assert [r["checkpoint"] for r in _log(out) if r.get("event") == "resume"] == [
        str(out / "checkpoints" / "step_00000004")]
    assert _same_weights(out, reference)


def test_corrupt_validation_image_is_named_before_work_is_lost_or_skipped_and_counted(tmp_path):
    from vitbench.digits import DigitsConfig, export

    root = export(tmp_path / "digits", DigitsConfig(train_size=16, val_size=8))
    bad = root / "val" / "3" / "x.png"
    bad.write_bytes(b"\x89PNG but not really" * 100)
    out = tmp_path / "run"
    cfg = dict(data=f"imagefolder:{root}", limit_train=None, limit_val=None, epochs=1, repeated_aug=0)  # every image
    # a file that is no image at all: found at start, nothing written
    with pytest.raises(ValueError, match=f"cannot decode image {bad}.*--skip-corrupt"):
        train(_small(out, **cfg), _tiny)
    assert not (out / "config.json").exists()
    # a truncated image (its header reads): the epoch's checkpoint is written before the evaluation fails
    good = next(p for p in sorted((root / "val").rglob("*.png")) if p != bad).read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=f"cannot decode image {bad}.*step_00000002 is saved.*--skip-corrupt"):
        train(_small(out, **cfg), _tiny)
    assert (out / "checkpoints" / "step_00000002" / "progress.json").is_file()
    result = train(_small(out, **cfg, resume="auto", skip_corrupt=True), _tiny)
    assert result["skipped_images"] == {"train": 0, "val": 1} and result["n"] == 8 and result["updates"] == 2
    assert _log(out)[-1]["skipped_images"] == {"train": [], "val": [str(bad)]}
    # a truncated training image stops the run when its batch is read, naming the file and the way on
    bad_train = sorted((root / "train").rglob("*.png"))[0]
    bad_train.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=f"cannot decode image {bad_train}.*--resume-override train_samples"):
        train(_small(tmp_path / "run2", **cfg, skip_corrupt=False), _tiny)


def test_unwritable_output_folder_fails_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a regular file where a folder should be")
    with pytest.raises(PermissionError, match="not writable"):
        train(_small(blocker / "run"), _never_built)
    assert _rc(["--output-dir", str(blocker / "run")]) == 2
    assert capsys.readouterr().err.startswith(f"vitbench-train: error: output folder {blocker / 'run'} is not")


@pytest.mark.parametrize(("argv", "message"), [
    (["--data", "foo:/x"], "cannot parse data spec 'foo:/x'"),
    (["--model", "vit_nope"], "unknown model 'vit_nope'"),
    (["--limit-val", "0"], "--limit-val must be >= 1, got 0"),
    (["--keep-checkpoints", "-1"], "--keep-checkpoints must be >= 0"),
    (["--resume-override", "lr"], "--resume-override needs --resume"),
    (["--resume", "auto", "--overwrite"], "not both"),
    (["--resume", "auto", "--resume-override", "nope"], "--resume-override: unknown field(s) nope"),
    (["--checkpoint", "{empty}"], "is not a valid safetensors file"),
    (["--checkpoint", "{truncated}"], "is not a valid safetensors file"),
    (["--checkpoint", "{missing}"], "checkpoint not found"),
])
def test_bad_training_input_is_one_line(tmp_path, capsys, argv, message):
    from vitbench.models import save_weights

    (tmp_path / "empty.safetensors").write_bytes(b"")
    whole = save_weights(_tiny(), tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(whole[: len(whole) // 2])
    paths = {k: str(tmp_path / f"{k}.safetensors") for k in ("empty", "truncated", "missing")}
    argv = [a.format(**paths) for a in argv] + ["--cpu", "--output-dir", str(tmp_path / "out")]
    assert _rc(argv) == 2
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("vitbench-train: error: "))
    assert message in line and "Traceback" not in err
    assert not (tmp_path / "out" / "config.json").exists()


def test_out_of_memory_names_the_batch_size(monkeypatch, tmp_path, capsys):
    import vitbench.train

    def oom(cfg, build):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

    monkeypatch.setattr(vitbench.train, "train", oom)
    assert train_main(["--batch-size", "256", "--output-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("vitbench-train: error: out of memory at --batch-size 256")


def test_sigusr1_stops_the_command_with_its_exit_code(tmp_path):
    """The command as a scheduler sees it: a signal mid-run, a checkpoint, exit code 75, then --resume auto."""
    import signal
    import time

    from vitbench.engine import EXIT_PREEMPTED

    out = tmp_path / "run"
    argv = ["--cpu", "--data", DATA, "--limit-train", "32", "--limit-val", "8", "--batch-size", "8", "--epochs", "50",
            "--num-workers", "0", "--checkpointing-steps", "1", "--eval-every", "0", "--output-dir", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "vitbench.train", *argv], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        while not (out / "checkpoints" / "step_00000001").is_dir() and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    assert "stopped by SIGUSR1 at update" in err
    stopped = _log(out)[-1]
    assert stopped["event"] == "preempted" and stopped["signal"] == "SIGUSR1"
    assert (out / "checkpoints" / f"step_{stopped['updates']:08d}").is_dir()
    assert train_main([*argv, "--resume", "auto", "--max-steps", str(stopped["updates"] + 1)]) == 0
    assert json.loads((out / "results.json").read_text())["updates"] == stopped["updates"] + 1
