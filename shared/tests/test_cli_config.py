"""``-c/--config FILE.yaml`` (vitbench.configfile through vitbench.cli.parse), the range checks of numeric flags
(vitbench.flagtypes) and renamed flags (vitbench.cli.renamed)."""

from __future__ import annotations

import argparse

import pytest

from vitbench import cli, configfile, flagtypes
from vitbench.train import build_parser as train_parser
from vitbench.testing import parse_fails


def test_file_sets_flags_and_the_command_line_overrides_it(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 0.001\nepochs: 3\nbatch-size: 8\nmixup: null\ncpu: true\n"
                                     "resume_override: [lr, epochs]\nmixed_precision: no\n")
    args = cli.parse(train_parser(), ["-c", str(tmp_path / "c.yaml"), "--epochs", "5"])
    assert (args.lr, args.epochs, args.batch_size, args.mixup, args.cpu) == (0.001, 5, 8, None, True)
    assert args.resume_override == ["lr", "epochs"] and args.mixed_precision == "no"
    assert args.config == str(tmp_path / "c.yaml")


def test_unknown_key_is_refused_by_name(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("lr: 0.001\nlearning_rate: 0.1\n")
    line = parse_fails(train_parser(), ["--config", str(tmp_path / "c.yaml")], capsys)
    assert line.endswith("unknown key 'learning_rate' (vitbench-train has no flag --learning-rate)")
    assert line.startswith("vitbench-train: error: --config ")


@pytest.mark.parametrize(("text", "message"), [
    ("lr: -1\n", "--lr must be > 0, got -1.0 (from c.yaml)"),
    ("lr: .nan\n", "--lr must be > 0, got nan (from c.yaml)"),
    ("epochs: 1.5\n", "--config c.yaml: epochs: invalid int value: 1.5"),
    ("epochs: [1, 2]\n", "--config c.yaml: epochs: takes one value, got [1, 2]"),
    ("cpu: 3\n", "--config c.yaml: cpu: must be true or false, got 3"),
    ("mixed_precision: fp8\n", "--config c.yaml: mixed_precision: invalid choice 'fp8' (choose from no, fp16, bf16)"),
    ("auto_augment: bogus-m9\n", "--config c.yaml: auto_augment: 'bogus-m9' is not a timm auto-augment policy"),
    ("- lr\n", "--config c.yaml must hold a mapping of flag names to values, not a list"),
    ("lr: [\n", "--config c.yaml is not valid YAML"),
    ("config: other.yaml\n", "--config c.yaml: unknown key 'config'"),
])
def test_bad_values_in_the_file_are_one_line(text, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(text)
    assert message in parse_fails(train_parser(), ["-c", "c.yaml"], capsys)


def test_a_bad_file_value_overridden_on_the_command_line_is_not_an_error(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: -1\n")
    assert cli.parse(train_parser(), ["-c", str(tmp_path / "c.yaml"), "--lr", "0.1"]).lr == 0.1


def test_an_abbreviated_config_flag_is_refused(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("lr: 0.001\n")
    line = parse_fails(train_parser(), ["--conf", str(tmp_path / "c.yaml")], capsys)
    assert line.endswith("spell the configuration flag out: -c FILE.yaml or --config FILE.yaml")


def test_missing_file(tmp_path, capsys):
    assert "--config nope.yaml: no such file" in parse_fails(train_parser(), ["-c", "nope.yaml"], capsys)


def test_empty_file_changes_nothing(tmp_path):
    (tmp_path / "c.yaml").write_text("# nothing\n")
    assert vars(cli.parse(train_parser(), ["-c", str(tmp_path / "c.yaml")])) == {
        **vars(cli.parse(train_parser(), [])), "config": str(tmp_path / "c.yaml")}


def test_switch_keys_are_dest_names():
    p = argparse.ArgumentParser(prog="t")
    p.add_argument("--no-throughput", dest="throughput", action="store_false")
    actions = configfile.flag_actions(p)
    assert configfile.value_for(actions["throughput"], False) is False


@pytest.mark.parametrize(("rule", "value", "problem"), [
    (flagtypes.POSITIVE, 0.0, "must be > 0, got 0.0"), (flagtypes.POSITIVE, float("inf"), "must be > 0, got inf"),
    (flagtypes.COUNT, 0, "must be >= 1, got 0"), (flagtypes.FRACTION, 1.0, "must be in [0, 1), got 1.0"),
    (flagtypes.KEEP_RATE, float("nan"), "must be in (0, 1], got nan"), (flagtypes.FINITE, float("-inf"),
                                                                        "must be a finite number, got -inf"),
    (flagtypes.POSITIVE, 1e-9, None), (flagtypes.KEEP_RATE, 1.0, None), (flagtypes.FINITE, -5.0, None),
])
def test_number_ranges(rule, value, problem):
    assert rule.problem(value) == problem


def test_number_conversion():
    assert flagtypes.COUNT("3") == 3 and flagtypes.COUNT(3.0) == 3
    for bad in ("1.5", 1.5, True, "x", [1]):
        with pytest.raises(argparse.ArgumentTypeError):
            flagtypes.COUNT(bad)
    assert flagtypes.POSITIVE("inf") == float("inf")  # converted; refused by the range check after parsing


def test_every_plain_numeric_flag_gets_its_rule():
    p = cli.prepare(train_parser())
    types = {a.dest: a.type for a in p._actions}
    assert types["lr"].describe() == "> 0" and types["epochs"].kind is int and types["clip_grad"].gt == 0
    assert all(isinstance(t, flagtypes.Number) for d, t in types.items() if d in flagtypes.RULES)


def test_renamed_flag_still_works_with_a_warning(capsys):
    p = argparse.ArgumentParser(prog="t")
    p.add_argument("--rho", type=float, nargs="+", default=[1.0])
    p.add_argument("--pruning", choices=["hard", "soft"], default="hard")
    p.add_argument("--region-variants", action="store_true")
    cli.renamed(p, "--keep-rate", "--rho")
    cli.renamed(p, "--mode", "--pruning")
    cli.renamed(p, "--variants", "--region-variants")
    args = cli.parse(p, ["--keep-rate", "0.5", "0.7", "--mode", "soft", "--variants"])
    assert (args.rho, args.pruning, args.region_variants) == ([0.5, 0.7], "soft", True)
    err = capsys.readouterr().err
    assert "t: warning: --keep-rate is deprecated and will be removed in the next release; use --rho" in err
    assert "--keep-rate" not in p.format_help() and "--rho" in p.format_help()
    with pytest.raises(SystemExit):
        cli.parse(p, ["--mode", "bogus"])
    with pytest.raises(SystemExit):
        cli.parse(p, ["--keep-rate", "nan"])


@pytest.mark.parametrize(("kw", "message"), [
    ({"lr": float("inf")}, "--lr must be > 0, got inf"), ({"clip_grad": -1.0}, "--clip-grad must be > 0, got -1.0"),
    ({"warmup_epochs": float("inf")}, "--warmup-epochs must be >= 0, got inf"),
])
def test_python_configurations_get_the_flags_ranges(kw, message):
    from vitbench.engine import TrainConfig

    with pytest.raises(ValueError, match=f"^{message.replace('.', '[.]')}$"):
        TrainConfig(**kw)
