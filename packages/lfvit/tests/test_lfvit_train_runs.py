"""lfvit-train through the shared engine's run rules: --num-classes on a folder of one's own (both stages share
the new head) and divergence in one line."""

from safetensors.torch import load_file

from lfvit.train import main
from vitbench.testing import image_folder


def _folder(root, size=112):
    """Three learnable classes, 4 training and 2 validation images each."""
    return image_folder(root, per_class=4, val_per_class=2, size=size, coloured=True)


BASE = ["--cpu", "--epochs", "1", "--batch-size", "4", "--num-workers", "0", "--warmup-epochs", "0",
        "--repeated-aug", "0", "--mixup", "0", "--cutmix", "0", "--selection-epoch", "0"]


def test_num_classes_trains_a_new_head(tmp_path, capsys):
    root = _folder(tmp_path / "folder")
    out = tmp_path / "run"
    assert main([*BASE, "--data", f"imagefolder:{root}", "--num-classes", "3", "--output-dir", str(out)]) == 0
    assert "--num-classes 3: a new 3-class head; the model's 10-class head weights replaced (it was untrained)" in (
        capsys.readouterr().err)
    assert tuple(load_file(str(out / "model.safetensors"))["head.weight"].shape)[0] == 3


def test_divergence_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*BASE, "--data", "digits:train_size=32,val_size=8", "--lr", "1e30", "--unscale-lr", "--epochs", "2",
            "--output-dir", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("lfvit-train: error: ")]
    assert len(lines) == 1 and lines[0].startswith("lfvit-train: error: training diverged at update "), err[-2000:]
    assert not (out / "model.safetensors").exists()
