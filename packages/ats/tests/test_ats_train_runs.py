"""ats-train through the shared engine's run rules: --num-classes on an image folder of one's own (then ats-eval on
the output), a resume of its folder by another command refused with the fields listed, and divergence in one line
(the ATS sampling keeps its indices in range on non-finite scores, so the engine's check names it)."""

import json

import torch
from safetensors.torch import load_file

from ats import sampling
from vitbench.train import main as train_main
from vitbench.testing import image_folder
from vitbench.testing import exit_code, error_line

CLI = ["--cpu", "--data", "digits:train_size=96,val_size=32", "--limit-train", "32", "--limit-val", "8",
       "--batch-size", "8", "--num-workers", "0", "--eval-every", "0", "--warmup-epochs", "0"]


def _folder(root, size=32):
    """Three learnable classes, 4 training and 2 validation images each."""
    return image_folder(root, per_class=4, val_per_class=2, size=size, coloured=True)


def _all_finite(path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_file(str(path)).values() if t.is_floating_point())


def test_official_select_keeps_indices_in_range_on_non_finite_scores():
    scores = torch.rand(2, 10).softmax(-1)
    scores[1, 3] = float("nan")
    n = torch.tensor([10, 10])
    lin = sampling.linspace_rows(10, scores.device)
    sel, count = sampling.official_select(scores, n, torch.tensor([9, 9]), lin)
    assert int(sel.max()) < 10 and int(count.min()) >= 0
    finite = sampling.official_select(scores[:1], n[:1], torch.tensor([9]), lin)
    assert torch.equal(finite[0], sel[:1, : finite[0].shape[1]]) and torch.equal(finite[1], count[:1])


def test_ats_train_num_classes_on_an_image_folder_then_ats_eval(tmp_path, capsys):
    from ats.evaluate import main as ats_eval
    from ats.train import main as ats_train

    root = _folder(tmp_path / "folder")
    out = tmp_path / "run"
    argv = ["--cpu", "--data", f"imagefolder:{root}", "--model", "deit_tiny_patch16_224", "--num-classes", "3",
            "--epochs", "1", "--batch-size", "4", "--num-workers", "0", "--warmup-epochs", "0", "--repeated-aug", "0",
            "--mixup", "0", "--cutmix", "0", "--output-dir", str(out)]
    assert ats_train(argv) == 0
    err = capsys.readouterr().err
    assert "--num-classes 3: a new 3-class head; the model's 1000-class head weights replaced" in err
    weights = load_file(str(out / "model.safetensors"))
    assert tuple(weights["head.weight"].shape) == (3, 192)
    assert json.loads((out / "config.json").read_text())["num_classes"] == 3
    # the output evaluates
    assert ats_eval(["--data", f"imagefolder:{root}", "--model", "deit_tiny_patch16_224", "--num-classes", "3",
                     "--checkpoint", str(out / "model.safetensors"), "--rho", "1", "--no-throughput",
                     "--batch-size", "4", "--num-workers", "0", "--output-dir", str(tmp_path / "eval")]) == 0
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert rows and "Traceback" not in capsys.readouterr().err
    # a cross-package resume: vitbench-train does not know the ats.* settings of this run
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}
    assert exit_code(train_main, argv[:-2] + ["--output-dir", str(out), "--resume", "auto"]) == 2
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("vitbench-train: error: ")]
    assert line == [f"vitbench-train: error: cannot resume {out}: it was written by another command (settings "
                    "unknown here: ats.k, ats.mode, ats.rho, ats.stages, ats.variant); resume it with that command, "
                    "or start over with --overwrite"]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"} == before


def test_ats_train_divergence_is_one_line(tmp_path, capsys):
    from ats.train import main as ats_main

    out = tmp_path / "run"
    argv = [*CLI, "--epochs", "2", "--opt", "sgd", "--lr", "1e12", "--unscale-lr", "--output-dir", str(out)]
    assert exit_code(ats_main, argv) == 2
    line = error_line(capsys.readouterr().err, "ats-train")
    assert line.startswith("ats-train: error: training diverged at update ") and "lower learning rate" in line
    assert not (out / "model.safetensors").exists()
    for step in (out / "checkpoints").glob("step_*"):
        assert _all_finite(step / "model.safetensors"), step




def test_overwrite_with_a_missing_checkpoint_leaves_the_earlier_run_untouched(tmp_path, capsys):
    from ats.train import main as ats_main

    out = tmp_path / "run"
    assert ats_main([*CLI, "--epochs", "1", "--max-steps", "1", "--output-dir", str(out)]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    capsys.readouterr()
    missing = str(tmp_path / "nope.safetensors")
    assert exit_code(ats_main, [*CLI, "--epochs", "1", "--overwrite", "--checkpoint", missing,
                                "--output-dir", str(out)]) == 2
    assert error_line(capsys.readouterr().err, "ats-train").endswith(f"{tmp_path / 'nope.safetensors'}")
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before
