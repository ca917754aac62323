import pytest

from ats import train


@pytest.mark.parametrize(("argv", "message"), [
    (["--model", "vit_nope"], "unknown model 'vit_nope'"),
    (["--data", "foo:/x"], "cannot parse data spec"),
    (["--checkpoint", "{tmp}/missing.safetensors"], "checkpoint not found"),
    (["--rho", "1.5"], "--rho must be in (0, 1]"),
])
def test_bad_training_input_is_one_line(tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv] + ["--cpu", "--output-dir", str(tmp_path / "out")]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ats-train: error: ") and message in err and "Traceback" not in err


def test_reused_output_folder_is_refused(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert train.main(["--cpu", "--output-dir", str(tmp_path)]) == 2
    assert "holds another run (config.json)" in capsys.readouterr().err
