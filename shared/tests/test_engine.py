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
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
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
    with pytest.raises(SystemExit):
        train_main(["--epochs", "0"])


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
