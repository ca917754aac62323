import pytest
import timm
from safetensors.torch import save_file

from lfvit import train


@pytest.fixture
def backbones(tmp_path):
    """A zero-byte and a truncated safetensors file."""
    dense = timm.create_model("vit_digits_patch8_112")
    whole = tmp_path / "whole.safetensors"
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(whole))
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "truncated.safetensors").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    return tmp_path


@pytest.mark.parametrize(("argv", "message"), [
    (["--init-backbone", "{root}/empty.safetensors"], "is not a valid safetensors file"),
    (["--init-backbone", "{root}/truncated.safetensors"], "is not a valid safetensors file"),
    (["--checkpoint", "{root}/truncated.safetensors"], "is not a valid safetensors file"),
    (["--model", "vit_digits_patch8_112"], "'vit_digits_patch8_112' is not an LF-ViT model"),
    (["--model", "lfvit_nope"], "unknown model 'lfvit_nope'"),
    (["--data", "foo:/x"], "cannot parse data spec"),
])
def test_bad_training_input_is_one_line(backbones, capsys, argv, message):
    argv = [a.format(root=backbones) for a in argv] + ["--cpu", "--output-dir", str(backbones / "out")]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lfvit-train: error: ") and message in err and "Traceback" not in err
