import json
import shutil

import pytest
import timm
import torch
from safetensors.torch import load_file
from vitbench.engine.lock import LOCK_NAME

import liferegress
from liferegress import train
from liferegress.flops import model_gmacs


def test_analytic_flops_match_flop_counter(make_vit):
    from vitbench.flops import flop_counter_gmacs

    model = liferegress.apply(make_vit(), keep_rate=0.7)
    assert model_gmacs(model, layernorm=False) == pytest.approx(flop_counter_gmacs(model, torch.randn(2, 3, 56, 56)),
                                                                rel=1e-6)
    assert model_gmacs(model) < model_gmacs(make_vit())


def test_train_rejects_bad_temperature(tmp_path):
    assert train.main(["--temperature", "0", "--output-dir", str(tmp_path)]) == 2


@pytest.fixture(scope="module")
def backbone_ckpt(tmp_path_factory):
    from vitbench.models import save_weights

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bb") / "bb.safetensors"
    return str(save_weights(timm.create_model("vit_digits_patch8_112"), path))


def _train(out, backbone_ckpt, *extra):
    argv = ["--checkpoint", backbone_ckpt, "--limit-train", "24", "--limit-val", "8", "--batch-size", "8",
            "--num-workers", "0", "--cpu", "--checkpointing-steps", "1", "--output-dir", str(out), *extra]
    return train.main(argv)


def test_two_stage_training_and_exact_resume(tmp_path, backbone_ckpt):
    assert _train(tmp_path / "a", backbone_ckpt) == 0
    summary = json.loads((tmp_path / "a" / "results.json").read_text())
    assert summary["finished"] and set(summary["stages"]) == {"stage1", "stage2"}
    a = load_file(tmp_path / "a" / "model.safetensors")
    s1 = load_file(tmp_path / "a" / "stage1" / "model.safetensors")
    init = load_file(backbone_ckpt)
    # stage 1 moves only W; stage 2 moves only blocks 4..11 and keeps W
    assert all(torch.equal(s1[k], v) for k, v in init.items())
    assert torch.equal(a["life_predictor.W"], s1["life_predictor.W"])
    assert torch.equal(a["blocks.3.attn.qkv.weight"], init["blocks.3.attn.qkv.weight"])
    assert not torch.equal(a["blocks.11.attn.qkv.weight"], init["blocks.11.attn.qkv.weight"])
    assert liferegress.read_config(tmp_path / "a" / "model.safetensors")["scheme"] == "two-stage"
    # a finished run's folder: a re-run is refused, a resume with other settings too; the weights keep their label
    assert _train(tmp_path / "a", backbone_ckpt, "--rho", "0.5") == 2
    assert _train(tmp_path / "a", backbone_ckpt, "--rho", "0.5", "--resume", "auto") == 2
    assert _train(tmp_path / "a", backbone_ckpt, "--rho", "0.5", "--resume", "auto", "--resume-override",
                  "keep_rate") == 2
    assert liferegress.read_config(tmp_path / "a" / "model.safetensors")["keep_rate"] == 0.7
    assert all(torch.equal(a[k], v) for k, v in load_file(tmp_path / "a" / "model.safetensors").items())
    # killed after 2 of 3 updates of stage 1, resumed: same weights as the uninterrupted run
    assert _train(tmp_path / "b", backbone_ckpt, "--max-steps", "2") == 0
    assert not (tmp_path / "b" / "stage2").exists()
    assert _train(tmp_path / "b", backbone_ckpt, "--resume", "auto") == 0
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_single_stage_trains_everything(tmp_path, backbone_ckpt):
    assert _train(tmp_path / "s", backbone_ckpt, "--scheme", "single-stage", "--limit-train", "8") == 0
    s = load_file(tmp_path / "s" / "model.safetensors")
    init = load_file(backbone_ckpt)
    assert not torch.equal(s["blocks.0.attn.qkv.weight"], init["blocks.0.attn.qkv.weight"])
    assert json.loads((tmp_path / "s" / "single" / "results.json").read_text())["epochs"] == 2


def test_two_stage_training_on_two_cpu_processes(tmp_path, backbone_ckpt):
    """torchrun, 2 ranks (gloo): both stages really distributed and the ranks end with the same weights; then, in the
    same processes, ``--resume auto`` of the finished run (both ranks see it finished and write nothing: the final
    files stay byte-identical) and 3 times the final-writing path alone (weights and results.json, main process
    only; the finished stages kept, the final files removed), which raced on ``model.safetensors.tmp`` when both
    ranks wrote."""
    import subprocess
    import sys

    script = tmp_path / "five_times.py"
    script.write_text(
        "import sys\nfrom pathlib import Path\nfrom accelerate import PartialState\nfrom liferegress import train\n"
        "out = Path(sys.argv[sys.argv.index('--output-dir') + 1])\n"
        "final = ('model.safetensors', 'results.json')\n"
        "def seen():  # a rewrite with the same bytes changes the inode and modification time\n"
        "    return {n: ((out / n).read_bytes(), (out / n).stat().st_ino, (out / n).stat().st_mtime_ns)\n"
        "            for n in final}\n"
        "for i in range(5):\n"
        "    if i >= 2:  # the finished stages stay, the final files are written again\n"
        "        state = PartialState(cpu=True)\n"
        "        state.wait_for_everyone()  # every rank has checked the earlier round\n"
        "        if state.is_main_process:\n"
        "            for name in final:\n"
        "                (out / name).unlink()\n"
        "        state.wait_for_everyone()\n"
        "    written = seen() if i == 1 else None\n"
        "    assert train.main(sys.argv[1:] + ['--resume', 'auto'] * (i > 0)) == 0, i\n"
        "    assert written in (None, seen()), 'finished run rewritten'\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           "--checkpoint", backbone_ckpt, "--limit-train", "32", "--limit-val", "8", "--batch-size", "8",
           "--num-workers", "0", "--cpu", "--output-dir", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert {s: (r["world_size"], r["ranks_in_sync"], r["updates"]) for s, r in summary["stages"].items()} == {
        "stage1": (2, True, 2), "stage2": (2, True, 2)}
    assert summary["finished"] and liferegress.read_config(tmp_path / "ddp" / "model.safetensors")["keep_rate"] == 0.7
    assert not list((tmp_path / "ddp").glob("*.tmp"))


def _files(folder):
    """Every file's bytes, inode and modification time (a rewrite with the same bytes changes the latter two); the
    run lock, which every run takes, by its bytes only."""
    return {p.relative_to(folder): (p.read_bytes(),) + ((p.stat().st_ino, p.stat().st_mtime_ns)
                                                        if p.name != LOCK_NAME else ())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_auto_of_a_finished_run_writes_nothing(tmp_path, backbone_ckpt, capsys):
    """``--resume auto`` into a finished run reports it and leaves every file byte-identical; into a finished run
    whose stage folders are gone, or into another command's results, it is refused (exit 2, one line)."""
    run = tmp_path / "a"
    assert _train(run, backbone_ckpt, "--limit-train", "8") == 0
    before = _files(run)
    capsys.readouterr()
    assert _train(run, backbone_ckpt, "--limit-train", "8", "--resume", "auto") == 0
    assert f"{run} holds a finished run (model.safetensors, results.json); nothing to do" in capsys.readouterr().err
    assert _files(run) == before
    stageless = tmp_path / "b"
    shutil.copytree(run, stageless, ignore=shutil.ignore_patterns("stage1", "stage2"))
    evaluation = tmp_path / "e"
    evaluation.mkdir()
    (evaluation / "results.json").write_text('{"config": {}, "environment": {}, "data": {}, "rows": []}')
    for folder, held in ((stageless, "model.safetensors, results.json"), (evaluation, "results.json")):
        kept = _files(folder)
        assert _train(folder, backbone_ckpt, "--limit-train", "8", "--resume", "auto") == 2
        assert capsys.readouterr().err.strip() == (
            f"liferegress-train: error: --resume auto: {folder} holds a finished run or another command's results "
            f"({held}) and no checkpoint to continue from; start over with --overwrite or choose another --output-dir")
        assert _files(folder) == kept
