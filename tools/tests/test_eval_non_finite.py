"""Every ``*-eval`` refuses a checkpoint with non-finite weights in one line naming the tensor
(``vitbench.models.check_finite``), before writing anything."""

from __future__ import annotations


import pytest
import timm
import torch
from vitbench.models import save_weights
from vitbench.testing import run_script

ARGS = ["--data", "digits:train_size=8,val_size=8", "--num-workers", "0", "--no-throughput", "--batch-size", "4"]


@pytest.mark.parametrize(("prog", "tensor"), [("ats-eval", "head.weight"), ("ats-eval", "blocks.1.attn.qkv.weight"),
                                              ("lfvit-eval", "head.weight"), ("liferegress-eval", "head.weight")])
def test_every_eval_refuses_a_checkpoint_with_nan_naming_the_tensor(prog, tensor, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = timm.create_model("vit_digits_patch8_112")
    with torch.no_grad():
        model.get_parameter(tensor).view(-1)[0] = float("nan")
    save_weights(model, tmp_path / "nan.safetensors")
    rc, err = run_script(prog, ["--checkpoint", "nan.safetensors", "--output-dir", "e", *ARGS[:4]], capsys)
    size = model.get_parameter(tensor).numel()
    assert rc == 2 and err.strip().splitlines()[-1] == (
        f"{prog}: error: checkpoint nan.safetensors holds non-finite weights: {tensor} has 1 NaN/inf value(s) of "
        f"{size} (a diverged or damaged run); give intact weights"), err
    assert not (tmp_path / "e").exists() or not any((tmp_path / "e").iterdir())
