"""Every command's ``--help``: each flag explained with its default, no reStructuredText markup, exit 0."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import re

import pytest

from vitbench import cli

PACKAGES = ("vitbench", "ats", "lfvit", "liferegress")
COMMANDS = sorted((ep.name, ep.value) for ep in importlib.metadata.entry_points(group="console_scripts")
                  if ep.value.split(".")[0] in PACKAGES)
MARKUP = re.compile(r"``|:(mod|class|func|meth|attr|data):`")


def test_every_command_is_covered():
    names = {name for name, _ in COMMANDS}
    assert {"vitbench-train", "ats-train", "ats-eval", "lfvit-train", "lfvit-eval", "liferegress-train",
            "liferegress-eval", "vitbench-flops", "vitbench-digits"} <= names


@pytest.mark.parametrize(("name", "target"), COMMANDS, ids=[c[0] for c in COMMANDS])
def test_help_explains_every_flag_with_its_default(name, target, capsys):
    module = importlib.import_module(target.split(":")[0])
    if hasattr(module, "build_parser"):
        parser = cli.prepare(module.build_parser())
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or action.dest == "help" or not action.option_strings:
                continue
            assert action.help, f"{name} {action.option_strings[-1]} has no help text"
            shown = formatter._get_help_string(action)
            assert "default" in shown, f"{name} {action.option_strings[-1]}: no default in {shown!r}"
    main = getattr(importlib.import_module(target.split(":")[0]), target.split(":")[1])
    try:
        code = main(["--help"])
    except SystemExit as exit_:  # a command that parses without vitbench.cli.run
        code = exit_.code
    assert code == 0
    text = capsys.readouterr().out
    assert "usage:" in text and not MARKUP.search(text), MARKUP.search(text)


def test_markup_is_removed():
    assert cli.plain_text("see :mod:`vitbench.engine` and :class:`~a.B`, ``ats-eval --rho``") == \
        "see vitbench.engine and a.B, ats-eval --rho"
