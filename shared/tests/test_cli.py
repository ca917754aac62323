import argparse
import os

import pytest
import torch

from vitbench.cli import check_writable, check_writable_file, run


def _parser():
    p = argparse.ArgumentParser(prog="tool")
    p.add_argument("--batch-size", type=int, default=4)
    return p


def test_expected_errors_become_one_line(capsys):
    def body(args):
        raise FileNotFoundError("no such checkpoint: x.safetensors")

    assert run(_parser(), body, []) == 2
    err = capsys.readouterr().err
    assert err == "tool: error: no such checkpoint: x.safetensors\n"


def test_out_of_memory_names_the_batch_size(capsys):
    def body(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert run(_parser(), body, ["--batch-size", "512"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tool: error: out of memory at --batch-size 512") and "lower --batch-size" in err


def test_unexpected_errors_keep_their_traceback():
    def body(args):
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        run(_parser(), body, [])


def test_success_returns_zero():
    assert run(_parser(), lambda args: None, []) == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(PermissionError, match="not writable"):
        check_writable(ro / "out")


def test_unwritable_path_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="not writable"):
        check_writable(blocker / "out")  # a file where a folder should be
    with pytest.raises(IsADirectoryError):
        check_writable_file(tmp_path)
    assert check_writable_file(tmp_path / "new" / "r.json").parent.is_dir()
