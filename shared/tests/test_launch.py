"""Multi-process CPU training: ``accelerate launch --cpu --num_processes N`` starts one process (Accelerate needs
mpirun for more), so a training command refuses it in one line naming the torchrun form that runs N processes (that
form is tested in ``test_engine.py`` and the Life-Regression CLI tests)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vitbench import launch
from vitbench import train as vitbench_train

MESSAGE = ("accelerate launch --cpu --num_processes N started one process (Accelerate starts several CPU processes "
           "only through mpirun); for N processes run: torchrun --standalone --nproc_per_node N -m MODULE --cpu ...")


@pytest.mark.parametrize(("env", "refused"), [
    ({}, False),
    ({"ACCELERATE_USE_CPU": "True"}, False),  # accelerate launch --cpu, one process asked
    ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1"}, True),  # --num_processes 2, one started
    ({"ACCELERATE_USE_CPU": "False", "MASTER_ADDR": "127.0.0.1"}, True),  # the same without --cpu and without GPUs
    ({"MASTER_ADDR": "127.0.0.1"}, False),  # a user's own variable, no launcher
    ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "PMI_SIZE": "2"}, False),  # under mpirun
    ({"MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "2"}, False),  # torchrun
])
def test_only_the_single_process_accelerate_cpu_launch_is_refused(env, refused):
    if refused:
        with pytest.raises(ValueError, match="torchrun --standalone --nproc_per_node N"):
            launch.check_launch(env)
    else:
        launch.check_launch(env)
    assert launch.launched_world_size(env) == int(env.get("WORLD_SIZE", env.get("PMI_SIZE", 1)))


def test_training_command_refuses_it_in_one_line_before_any_work(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setattr(launch, "main_module", lambda: "MODULE")  # pytest's own __main__ otherwise
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "run"
    assert vitbench_train.main(["--cpu", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"vitbench-train: error: {MESSAGE}"] and not out.exists()


def test_the_message_is_documented():
    doc = (Path(__file__).parents[2] / "docs" / "ERRORS.md").read_text()
    assert MESSAGE in doc


def test_accelerate_launch_cpu_two_processes_is_refused(tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vitbench.train", "--cpu",
           "--output-dir", str(tmp_path / "run")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode != 0
    assert f"vitbench-train: error: {MESSAGE.replace('MODULE', 'vitbench.train')}" in proc.stderr.splitlines()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("env", "main"), [({}, True), ({"RANK": "0"}, True), ({"RANK": "1"}, False),
                                           ({"OMPI_COMM_WORLD_RANK": "3"}, False)])
def test_only_the_main_process_prints_the_summary(env, main, monkeypatch, capsys):
    for name in launch.RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert launch.is_main_process() is main
    launch.main_print("done: top-1 90.00%")
    assert capsys.readouterr().out == ("done: top-1 90.00%\n" if main else "")
