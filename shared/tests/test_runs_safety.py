"""Runs that lose nothing, part 2: --overwrite only once the new run is valid, divergence, failed writes, the run
lock, checkpoint integrity (SHA-256, malformed progress.json, RNG states), resumes that refuse another command's
folder or settings, the epoch loss across a resume, and Ctrl-C. Small runs: 32 training images, batch 8, 4 updates
per epoch, 2 epochs, a 2-block model."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from vitbench.engine import EXIT_INTERRUPTED, Diverged, Preempted, RunLock, RunLocked, TrainConfig, train
from vitbench.engine.runs import checkpoint_problem, sha256
from vitbench.train import main as train_main
from vitbench.testing import exit_code, error_line

DATA = "digits:train_size=96,val_size=32"


def _small(out, **kw):
    base = dict(data=DATA, output_dir=str(out), epochs=2, batch_size=8, lr=1e-3, unscale_lr=True, warmup_epochs=1,
                num_workers=0, seed=3, cpu=True, limit_train=32, limit_val=8, eval_every=0, drop_path=0.1)
    return TrainConfig(**{**base, **kw})


def _tiny():
    return timm.create_model("vit_digits_patch8_112", pretrained=False, depth=2, embed_dim=32, drop_path_rate=0.1)


def _never_built():
    raise AssertionError("the model was built although the run should have been refused first")


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _same_weights(a, b):
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _snapshot(folder: Path) -> dict:
    """Every file under ``folder`` (the lock file aside) and its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def _all_finite(path: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_file(str(path)).values() if t.is_floating_point())


CLI = ["--cpu", "--data", DATA, "--limit-train", "32", "--limit-val", "8", "--batch-size", "8", "--num-workers", "0",
       "--eval-every", "0", "--warmup-epochs", "0"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted small run (8 updates) for the bitwise comparisons."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(_small(out), _tiny)
    return out


# --- --overwrite removes nothing until every input of the new run has loaded

@pytest.mark.parametrize("bad", [["--checkpoint", "{tmp}/missing.safetensors"], ["--data", "imagefolder:{tmp}/nope"],
                                 ["--model", "vit_nope"], ["--checkpoint", "{tmp}/nan.safetensors"]])
def test_overwrite_with_a_bad_input_leaves_the_earlier_run_untouched(tmp_path, capsys, bad):
    out = tmp_path / "run"
    assert train_main([*CLI, "--model", "vit_digits_patch8_112", "--epochs", "1", "--max-steps", "1",
                       "--output-dir", str(out)]) == 0
    weights = load_file(str(out / "model.safetensors"))
    weights["blocks.1.attn.qkv.weight"][0, 0] = float("nan")
    save_file(weights, str(tmp_path / "nan.safetensors"))
    before = _snapshot(out)
    assert {"config.json", "log.jsonl", "results.json", "model.safetensors"} <= set(before)
    capsys.readouterr()
    argv = [*CLI, "--epochs", "1", "--overwrite", "--output-dir", str(out), *(a.format(tmp=tmp_path) for a in bad)]
    assert exit_code(train_main, argv) == 2
    error_line(capsys.readouterr().err, "vitbench-train")
    assert _snapshot(out) == before


# --- divergence: one line naming the update, the loss and the checkpoint; nothing non-finite is ever written

def test_nan_loss_stops_with_the_update_and_the_newest_checkpoint(tmp_path):
    calls = []

    def loss_fn(model, images, targets, criterion):
        calls.append(1)
        loss = criterion(model(images), targets)
        return loss * float("nan") if len(calls) == 3 else loss

    out = tmp_path / "run"
    with pytest.raises(Diverged, match=r"^training diverged at update 3 \(epoch 0\): loss nan; the newest intact "
                                       rf"checkpoint is {out}/checkpoints/step_00000002: continue from it with a lower "
                                       r"learning rate, e\.g\. --resume auto --lr 0\.0001 --resume-override lr$"):
        train(_small(out, checkpointing_steps=2), _tiny, loss_fn=loss_fn)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002"]
    assert checkpoint_problem(out / "checkpoints" / "step_00000002") is None
    assert _log(out)[-1]["event"] == "diverged" and not (out / "model.safetensors").exists()
    # the lock was released: the advised resume runs
    result = train(_small(out, checkpointing_steps=2, resume="auto", lr=1e-4, resume_override=("lr",)), _tiny)
    assert result["updates"] == 8


def test_a_nan_loss_on_the_first_update_after_a_resume_says_so(tmp_path):
    out = tmp_path / "run"
    train(_small(out, checkpointing_steps=2, max_steps=2), _tiny)

    def nan_loss(model, images, targets, criterion):
        return criterion(model(images), targets) * float("nan")

    step = out / "checkpoints" / "step_00000002"
    with pytest.raises(Diverged, match=rf"^training diverged at update 3 \(epoch 0\): loss nan; the first update "
                                       rf"after resuming from {step}; the newest intact checkpoint is {step}: "):
        train(_small(out, checkpointing_steps=2, resume="auto"), _tiny, loss_fn=nan_loss)


def test_weights_that_go_non_finite_in_an_update_are_named(tmp_path):
    calls = []

    def loss_fn(model, images, targets, criterion):
        calls.append(1)
        if len(calls) == 3:  # an infinite gradient for the head: a finite loss, then NaN weights after the step
            model.head.weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
        return criterion(model(images), targets)

    out = tmp_path / "run"
    with pytest.raises(Diverged, match=r"^training diverged at update 3 \(epoch 0\): loss \d\.\d+, then non-finite "
                                       r"weights after the update \(head\.weight\); the newest intact checkpoint is "
                                       rf"{out}/checkpoints/step_00000002: "):
        train(_small(out, checkpointing_steps=2), _tiny, loss_fn=loss_fn)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002"]
    assert _all_finite(out / "checkpoints" / "step_00000002" / "model.safetensors")


def test_initial_weights_with_a_nan_are_refused_before_the_earlier_run_is_removed(tmp_path):
    out = tmp_path / "run"
    train(_small(out, max_steps=1), _tiny)
    before = _snapshot(out)

    def poisoned():
        model = _tiny()
        with torch.no_grad():
            model.blocks[1].attn.qkv.weight[0, 0] = float("nan")
        return model

    with pytest.raises(ValueError, match=r"^the initial weights of vit_digits_patch8_112 are not finite "
                                         r"\(blocks\.1\.attn\.qkv\.weight\); nothing was trained or removed$"):
        train(_small(out, overwrite=True), poisoned)
    assert _snapshot(out) == before


def test_a_resume_whose_first_update_diverges_names_its_checkpoint(tmp_path):
    out = tmp_path / "run"
    train(_small(out, checkpointing_steps=2, max_steps=2), _tiny)

    def nan_loss(model, images, targets, criterion):
        return criterion(model(images), targets) * float("nan")

    step = out / "checkpoints" / "step_00000002"
    with pytest.raises(Diverged, match=rf"^training diverged at update 3 \(epoch 0\): loss nan; the first update "
                                       rf"after resuming from {step}; the newest intact checkpoint is {step}: "):
        train(_small(out, checkpointing_steps=2, resume="auto"), _tiny, loss_fn=nan_loss)
    assert checkpoint_problem(step) is None


def test_huge_lr_on_one_update_writes_no_results(tmp_path, capsys):
    """--lr 1e30 for a single update: finite weights near 1e30 (the checkpoint may hold them), whose outputs are not
    finite: the evaluation stops the run, so neither model.safetensors nor results.json is written."""
    out = tmp_path / "run"
    argv = [*CLI, "--model", "vit_digits_patch8_112", "--epochs", "1", "--max-steps", "1", "--lr", "1e30",
            "--unscale-lr", "--output-dir", str(out)]
    assert exit_code(train_main, argv) == 2
    line = error_line(capsys.readouterr().err, "vitbench-train")
    assert line.startswith("vitbench-train: error: training diverged at update 1 (epoch 0): non-finite outputs on ")
    assert not (out / "model.safetensors").exists() and not (out / "results.json").exists()
    for step in (out / "checkpoints").glob("step_*"):
        assert _all_finite(step / "model.safetensors"), step


def test_huge_lr_never_writes_non_finite_weights(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*CLI, "--model", "vit_digits_patch8_112", "--epochs", "2", "--lr", "1e30", "--unscale-lr",
            "--checkpointing-steps", "1", "--output-dir", str(out)]
    assert exit_code(train_main, argv) == 2
    line = error_line(capsys.readouterr().err, "vitbench-train")
    assert "training diverged at update " in line and "lower learning rate" in line
    assert not (out / "model.safetensors").exists() and not (out / "results.json").exists()
    for step in (out / "checkpoints").glob("step_*"):
        assert _all_finite(step / "model.safetensors"), step


def test_checkpoint_with_non_finite_weights_is_skipped_on_resume(tmp_path, reference, capsys):
    """A checkpoint written with NaN weights by an older version (its listing consistent): the resume falls back."""
    out = tmp_path / "run"
    train(_small(out, checkpointing_steps=2, max_steps=6), _tiny)
    newest = out / "checkpoints" / "step_00000006"
    weights = load_file(str(newest / "model.safetensors"))
    weights["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    save_file(weights, str(newest / "model.safetensors"), metadata={"format": "pt"})
    info = json.loads((newest / "progress.json").read_text())
    info["files"]["model.safetensors"] = {"bytes": (newest / "model.safetensors").stat().st_size,
                                          "sha256": sha256(newest / "model.safetensors")}
    (newest / "progress.json").write_text(json.dumps(info))
    capsys.readouterr()
    train(_small(out, checkpointing_steps=2, resume="auto"), _tiny)
    err = capsys.readouterr().err
    assert "step_00000006: holds non-finite weights (blocks.0.attn.qkv.weight)" in err
    assert [r["checkpoint"] for r in _log(out) if r.get("event") == "resume"] == [
        str(out / "checkpoints" / "step_00000004")]
    assert _same_weights(out, reference)


# --- failed writes: the path and the free space, the earlier checkpoints intact

def test_disk_full_during_a_checkpoint_keeps_the_earlier_ones(tmp_path, monkeypatch):
    from accelerate import Accelerator

    real = Accelerator.save_state
    saves = []

    def save_state(self, output_dir=None, **kw):
        saves.append(output_dir)
        if len(saves) == 2:  # the second checkpoint: the disk fills up half-way
            real(self, output_dir, **kw)
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(output_dir) / "optimizer.bin"))
        return real(self, output_dir, **kw)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    out = tmp_path / "run"
    with pytest.raises(OSError) as failed:
        train(_small(out, checkpointing_steps=2), _tiny)
    ckpts = out / "checkpoints"
    assert str(failed.value).startswith(f"cannot write {ckpts}/.tmp_step_00000004/optimizer.bin: No space left on "
                                        f"device (")
    assert " free); the newest intact checkpoint is " f"{ckpts}/step_00000002" in str(failed.value)
    assert [p.name for p in ckpts.iterdir()] == ["step_00000002"]  # the partial one is gone
    assert checkpoint_problem(ckpts / "step_00000002") is None


def test_disk_full_writing_the_weights_is_one_line(tmp_path, monkeypatch, capsys):
    import vitbench.engine.loop

    def full(model, path):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(vitbench.engine.loop, "save_weights", full)
    out = tmp_path / "run"
    assert train_main([*CLI, "--model", "vit_digits_patch8_112", "--epochs", "1", "--max-steps", "1",
                       "--output-dir", str(out)]) == 2
    line = error_line(capsys.readouterr().err, "vitbench-train")
    assert line.startswith(f"vitbench-train: error: cannot write {out}/model.safetensors: Error while serializing: "
                           "I/O error: No space left on device (os error 28) (")
    assert line.endswith(f"free); the newest intact checkpoint is {out}/checkpoints/step_00000001; free space and "
                         "continue with --resume auto")


# --- one process per run folder

def test_a_held_lock_refuses_a_second_run_and_a_stale_one_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    lock = RunLock(out)
    lock.acquire()
    try:
        with pytest.raises(RunLocked, match=rf"^{out} is in use by another run \(PID {os.getpid()}, lock file "):
            train(_small(out), _never_built)
    finally:
        lock.release()
    assert not (out / "config.json").exists()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / ".lock").write_text(f"{dead.pid}\n")
    train(_small(out, max_steps=1), _tiny)
    assert f"stale lock of PID {dead.pid} (no longer running) taken over" in capsys.readouterr().err
    assert (out / ".lock").read_text() == ""  # released cleanly


def test_two_runs_started_at_once_into_one_folder_one_is_refused(tmp_path):
    """Whichever run takes the lock first trains; the other is refused while it runs (the winner trains long
    enough to be still running however late the loser starts, and is then stopped with Ctrl-C)."""
    argv = [sys.executable, "-m", "vitbench.train", *CLI, "--limit-train", "16", "--epochs", "500",
            "--model", "vit_digits_patch8_112"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for round_ in range(3):
        out = tmp_path / f"run{round_}"
        procs = [subprocess.Popen([*argv, "--output-dir", str(out)], stderr=subprocess.PIPE, text=True, env=env)
                 for _ in range(2)]
        log = out / "log.jsonl"
        deadline = time.monotonic() + 300
        while (all(p.poll() is None for p in procs) or not log.exists() or '"epoch"' not in log.read_text()) \
                and time.monotonic() < deadline:
            time.sleep(0.1)  # until one is refused and the other has trained an epoch
        loser, winner = (0, 1) if procs[0].poll() is not None else (1, 0)
        procs[winner].send_signal(signal.SIGINT)
        errs = [p.communicate(timeout=600)[1] for p in procs]
        assert (procs[loser].returncode, procs[winner].returncode) == (2, 130), errs
        line = error_line(errs[loser], "vitbench-train")
        assert line == (f"vitbench-train: error: {out} is in use by another run (PID {procs[winner].pid}, lock file "
                        f"{out}/.lock); wait for it to end or choose another --output-dir")
        assert [r.get("event") for r in _log(out)].count("start") == 1


def test_ctrl_c_to_the_process_group_with_workers_checkpoints_and_exits_130(tmp_path):
    """A terminal's Ctrl-C reaches every process of the group, DataLoader workers included: the run still stops at
    a checkpoint with exit code 130, and --resume auto continues."""
    out = tmp_path / "run"
    argv = [*CLI, "--model", "vit_digits_patch8_112", "--num-workers", "2", "--epochs", "50",
            "--checkpointing-steps", "1", "--output-dir", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "vitbench.train", *argv], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        while not (out / "checkpoints" / "step_00000001").is_dir() and proc.poll() is None:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED, err[-3000:]
    assert "stopped by SIGINT at update" in err and "Traceback" not in err
    stopped = _log(out)[-1]
    assert stopped["event"] == "preempted" and stopped["signal"] == "SIGINT"
    assert checkpoint_problem(out / "checkpoints" / f"step_{stopped['updates']:08d}") is None
    assert train_main([*argv, "--resume", "auto", "--max-steps", str(stopped["updates"] + 1)]) == 0


# --- integrity: SHA-256 of every checkpoint file, RNG states included; malformed listings

def _flip_low_bits(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-8] ^= 0x01  # the last bytes are tensor data, not the header
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["weights", "rng", "list", "files5"])
def test_same_size_corruption_or_malformed_listing_falls_back(tmp_path, reference, capsys, damage):
    out = tmp_path / "run"
    train(_small(out, checkpointing_steps=2, max_steps=6), _tiny)
    newest = out / "checkpoints" / "step_00000006"
    if damage == "weights":
        _flip_low_bits(newest / "model.safetensors")
        said = "model.safetensors does not match the SHA-256 recorded when it was written"
    elif damage == "rng":
        rng = newest / "random_states_0.pkl"
        rng.write_bytes(os.urandom(rng.stat().st_size))
        said = "random_states_0.pkl does not match the SHA-256 recorded when it was written"
    elif damage == "list":
        (newest / "progress.json").write_text("[]")
        said = "progress.json holds list, not an object"
    else:
        info = json.loads((newest / "progress.json").read_text())
        (newest / "progress.json").write_text(json.dumps({**info, "files": 5}))
        said = "progress.json lists no files ('files': 5)"
    capsys.readouterr()
    train(_small(out, checkpointing_steps=2, resume="auto"), _tiny)
    assert f"checkpoint {newest} is damaged ({said}); skipped" in capsys.readouterr().err
    assert [r["checkpoint"] for r in _log(out) if r.get("event") == "resume"] == [
        str(out / "checkpoints" / "step_00000004")]
    assert _same_weights(out, reference)


def test_checkpoint_listed_by_size_only_with_unloadable_rng_states_is_damaged(tmp_path):
    """Checkpoints written before the SHA-256s were recorded: the RNG states must at least load."""
    step = tmp_path / "step_00000001"
    step.mkdir()
    torch.save({"random_state": 1}, step / "random_states_0.pkl")
    size = (step / "random_states_0.pkl").stat().st_size
    (step / "progress.json").write_text(json.dumps({"files": {"random_states_0.pkl": size}}))
    assert checkpoint_problem(step) is None
    (step / "random_states_0.pkl").write_bytes(os.urandom(size))
    assert checkpoint_problem(step) == "random_states_0.pkl does not load (the RNG states)"


# --- resumes that would write into another run or another command's folder

def test_resume_auto_into_a_finished_run_without_checkpoints_is_refused(tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    train(_small(out, max_steps=1), _tiny)
    shutil.rmtree(out / "checkpoints")
    before = _snapshot(out)
    with pytest.raises(FileExistsError, match="holds a finished run or another command's results .*no checkpoint to "
                                              "continue from; start over with --overwrite"):
        train(_small(out, resume="auto"), _never_built)
    evaluation = tmp_path / "eval"  # an evaluation's folder: results only
    evaluation.mkdir()
    (evaluation / "results.json").write_text('{"rows": []}\n')
    with pytest.raises(FileExistsError, match="holds a finished run or another command's results"):
        train(_small(evaluation, resume="auto"), _never_built)
    assert _snapshot(out) == before and _snapshot(evaluation) == {"results.json": b'{"rows": []}\n'}


def test_resume_of_a_complete_run_writes_nothing(tmp_path):
    out = tmp_path / "run"
    first = train(_small(out, max_steps=3), _tiny)
    before = _snapshot(out)
    again = train(_small(out, max_steps=3, resume="auto"), _tiny)
    assert again == json.loads((out / "results.json").read_text()) and again["updates"] == first["updates"] == 3
    assert _snapshot(out) == before


def test_resume_with_settings_of_another_command_is_refused(tmp_path):
    out = tmp_path / "run"
    train(_small(out, max_steps=2), _tiny, extra_config={"ats": {"rho": 1.0, "stages": [0, 1]}})
    with pytest.raises(ValueError, match=rf"^cannot resume {out}: it was written by another command \(settings "
                                         r"unknown here: ats\.rho, ats\.stages\); resume it with that command"):
        train(_small(out, resume="auto"), _never_built)


# --- the epoch's train_loss and Ctrl-C across a resume

def test_interrupted_epoch_loss_averages_all_its_batches(tmp_path, reference):
    out = tmp_path / "run"
    train(_small(out, max_steps=2, checkpointing_steps=1), _tiny)  # stopped half-way through epoch 0
    train(_small(out, resume="auto", checkpointing_steps=1), _tiny)
    losses = {r["epoch"]: r["train_loss"] for r in _log(out) if "train_loss" in r and r["updates"] > 2}
    expected = {r["epoch"]: r["train_loss"] for r in _log(reference) if "train_loss" in r}
    assert losses == expected
    assert _same_weights(out, reference)


def test_sigint_mid_epoch_checkpoints_exits_130_and_resumes_bitwise(tmp_path, reference, capsys):
    calls = []

    def loss_fn(model, images, targets, criterion):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return criterion(model(images), targets)

    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(Preempted) as stop:
        train(_small(out), _tiny, loss_fn=loss_fn)
    assert stop.value.code == EXIT_INTERRUPTED == 130 and stop.value.signal_name == "SIGINT"
    assert stop.value.checkpoint == out / "checkpoints" / "step_00000003"
    err = capsys.readouterr().err
    assert "interrupted: stopping after this update with a checkpoint" in err
    assert f"stopped by SIGINT at update 3: checkpoint {stop.value.checkpoint}; continue with --resume auto (exit " \
           "code 130)" in err
    assert signal.getsignal(signal.SIGINT) is before
    train(_small(out, resume="auto"), _tiny)
    assert _same_weights(out, reference)
