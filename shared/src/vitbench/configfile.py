"""``-c/--config FILE.yaml``: flag values from a YAML file, as timm's ``train.py`` reads them.

The keys are the flags' names with underscores (``batch_size: 32`` for ``--batch-size 32``), the names
``config.json`` records; a flag given on the command line overrides the file. Every value is checked as the flag
checks its text (the same :class:`vitbench.cli.Number` ranges and choices), and a key that is no flag of the command
is refused by name, so a recipe can neither hold a typo nor a value the command would refuse.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from .flagtypes import Number


def read(path: str | Path, parser: argparse.ArgumentParser) -> dict:
    """The checked ``{dest: value}`` of the YAML mapping in ``path`` for ``parser``'s flags. ``ValueError`` naming the
    file and the key for a key that is no flag or a value the flag refuses; ``FileNotFoundError`` for no file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--config {path} is not valid YAML ({first})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} must hold a mapping of flag names to values, not a {type(data).__name__}")
    actions = flag_actions(parser)
    values = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            flag = "--" + dest.replace("_", "-")
            raise ValueError(f"--config {path}: unknown key {key!r} ({parser.prog} has no flag {flag})")
        try:
            values[dest] = value_for(actions[dest], value)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
            raise ValueError(f"--config {path}: {key}: {e}") from None
    return values


def flag_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """``{dest: action}`` of the flags a file may set (not ``--help``, ``--config`` or hidden renamed spellings)."""
    out = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "config") or action.help == argparse.SUPPRESS:
            continue
        out.setdefault(action.dest, action)
    return out


def value_for(action: argparse.Action, value):
    """``value`` from the file as the flag would hold it: a switch takes true/false, a list flag a list (or one
    item), every item through the flag's type and choices; null leaves a flag unset (its default None)."""
    if action.nargs == 0:
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {value!r}")
        return value  # the key is the switch's dest: `throughput: false` is --no-throughput
    if value is None:
        return None
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        items = value if isinstance(value, list) else [value]
        if action.nargs == "+" and not items:
            raise ValueError("needs at least one value")
        return [item_for(action, v) for v in items]
    if isinstance(value, list) and action.type is not None and not isinstance(action.type, Number):
        value = ",".join(map(str, value))  # e.g. `stages: [3, 6, 9]` for --stages 3,6,9
    if isinstance(value, (list, dict)):
        raise ValueError(f"takes one value, got {value!r}")
    return item_for(action, value)


def item_for(action: argparse.Action, value):
    """One value through the flag's type and choices (YAML's yes/no read as the words, e.g. mixed_precision: no)."""
    if isinstance(value, bool):
        value = "yes" if value else "no"
    if isinstance(action.type, Number):
        value = action.type(value)
    elif isinstance(value, (dict, list)):
        raise ValueError(f"takes one value, got {value!r}")
    else:
        value = str(value) if action.type is None else action.type(str(value))
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ValueError(f"invalid choice {value!r} (choose from {choices})")
    return value
