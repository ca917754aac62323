"""``-c/--config`` on the packages' own commands (vitbench's tests cover the mechanism on its own commands)."""

from __future__ import annotations

from vitbench import cli
from vitbench.testing import parse_fails


def test_renamed_keys_are_not_config_keys(tmp_path, capsys):
    from ats.train import build_parser as ats_parser

    (tmp_path / "c.yaml").write_text("ats_rho: 0.5\n")
    assert "unknown key 'ats_rho'" in parse_fails(ats_parser(), ["-c", str(tmp_path / "c.yaml")], capsys)


def test_eval_commands_read_files_too(tmp_path):
    from ats.evaluate import build_parser as ats_eval
    from liferegress.evaluate import build_parser as lr_eval

    (tmp_path / "a.yaml").write_text("rho: [1, 0.5]\nthroughput: false\nvisualize: []\nstages: [7, 8, 9, 10, 11]\n")
    args = cli.parse(ats_eval(), ["-c", str(tmp_path / "a.yaml")])
    assert (args.rho, args.throughput, args.visualize, args.stages) == ([1.0, 0.5], False, [], (7, 8, 9, 10, 11))
    (tmp_path / "l.yaml").write_text("rho: 0.7\npruning: soft\n")
    args = cli.parse(lr_eval(), ["-c", str(tmp_path / "l.yaml"), "--rho", "0.9", "0.8"])
    assert (args.rho, args.pruning) == ([0.9, 0.8], "soft")
