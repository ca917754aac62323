"""liferegress-train through the shared engine's run rules: --num-classes (a new head, trained with W in stage 1 and
carried into stage 2) on a folder of one's own, and one process per output folder."""

import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from liferegress import train
from vitbench.engine import RunLock
from vitbench.testing import image_folder


def _folder(root, size=112):
    """Three learnable classes, 4 training and 2 validation images each."""
    return image_folder(root, per_class=4, val_per_class=2, size=size, coloured=True)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    from vitbench.models import save_weights

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bb") / "b.safetensors"
    return str(save_weights(timm.create_model("vit_digits_patch8_112"), path))


def test_num_classes_trains_a_new_head_through_both_stages(tmp_path, backbone, capsys):
    root = _folder(tmp_path / "folder")
    out = tmp_path / "run"
    assert train.main(["--data", f"imagefolder:{root}", "--checkpoint", backbone, "--num-classes", "3",
                       "--batch-size", "4", "--num-workers", "0", "--cpu", "--output-dir", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("--num-classes 3: a new 3-class head; the --checkpoint's 10-class head weights dropped") == 1
    s1, final = load_file(str(out / "stage1" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert tuple(final["head.weight"].shape) == (3, 64)
    assert torch.equal(final["head.weight"], s1["head.weight"])  # stage 2 trains blocks t_base.. only
    assert json.loads((out / "results.json").read_text())["finished"]


def test_a_folder_in_use_is_refused(tmp_path, backbone, capsys):
    import os

    out = tmp_path / "run"
    out.mkdir()
    lock = RunLock(out, "liferegress-train")
    lock.acquire()
    try:
        assert train.main(["--checkpoint", backbone, "--cpu", "--output-dir", str(out)]) == 2
    finally:
        lock.release()
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"liferegress-train: error: {out} is in use by another liferegress-train (PID {os.getpid()}, lock file "
        f"{out}/.lock); wait for it to end or choose another --output-dir")
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
