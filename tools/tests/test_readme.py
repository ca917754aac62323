"""README.md says what the repository does: its computed FLOPs figures and its Layout block match the code and the tree.

* Reproduction: every row of the FLOPs table whose command column holds ``vitbench-flops ...`` or ``... --flops-only
  ...`` commands is run (in-process, through the console script's entry point) and each figure of the row's "ours"
  column must appear in the output: with one command, all of them in its output; with one command per figure, each
  in its own command's output; with one figure, in the output of every command.
* Layout: every name in the fenced block under "## Layout" exists, and the block names every top-level module of
  ``vitbench``, every ``tools/*.py``, every ``docs/*.md`` and every subpackage of the three method packages. The tree
  is read when the test runs, so a module added or moved without updating the README fails here.
"""

from __future__ import annotations

import importlib.metadata
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    """The text of the ``## title`` section of README.md (up to the next ``## ``)."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, flags=re.M | re.S)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


# ---------------------------------------------------------------------------------------------------------------
# Reproduction table


def is_flops_command(cmd: str) -> bool:
    return cmd.startswith("vitbench-flops ") or cmd == "vitbench-flops" or " --flops-only" in f" {cmd} "


def flops_rows() -> list[tuple[str, list[str], list[str]]]:
    """``(claim, figures, commands)`` of each table row of the Reproduction section with FLOPs-only commands."""
    rows = []
    for line in section("Reproduction").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) != 4 or set(cells[0]) <= set("-"):
            continue
        claim, _paper, ours, command = cells
        commands = re.findall(r"`([^`]+)`", command)
        if not commands or not all(is_flops_command(c) for c in commands):
            continue
        figures = [f.strip() for f in ours.split("/")]
        assert all(re.fullmatch(r"\d+\.\d+", f) for f in figures), f"{claim}: unparsable figures {ours!r}"
        rows.append((claim, figures, commands))
    return rows


ROWS = flops_rows()
_outputs: dict[str, str] = {}


def run_command(cmd: str, capsys, monkeypatch, tmp_path) -> str:
    """stdout of a console-script command line, run in-process from an empty folder (cached per command)."""
    if cmd not in _outputs:
        prog, *argv = shlex.split(cmd)
        (entry,) = importlib.metadata.entry_points(group="console_scripts", name=prog)
        monkeypatch.chdir(tmp_path)
        capsys.readouterr()
        rc = entry.load()(argv)
        out = capsys.readouterr().out
        assert rc in (0, None), f"`{cmd}` exited with {rc}"
        _outputs[cmd] = out
    return _outputs[cmd]


def printed(figure: str, output: str) -> bool:
    return re.search(rf"(?<![\d.]){re.escape(figure)}(?!\d)", output) is not None


def test_the_table_has_flops_rows():
    assert len(ROWS) >= 10, ROWS


@pytest.mark.parametrize(("claim", "figures", "commands"), ROWS, ids=[r[0] for r in ROWS])
def test_reproduction_row_prints_its_figures(claim, figures, commands, capsys, monkeypatch, tmp_path):
    outputs = [run_command(c, capsys, monkeypatch, tmp_path) for c in commands]
    if len(commands) == 1:
        pairs = [(f, commands[0], outputs[0]) for f in figures]
    elif len(figures) == 1:
        pairs = [(figures[0], c, o) for c, o in zip(commands, outputs)]
    else:
        assert len(commands) == len(figures), f"{claim}: {len(figures)} figures but {len(commands)} commands"
        pairs = list(zip(figures, commands, outputs))
    missing = [(f, c) for f, c, o in pairs if not printed(f, o)]
    assert not missing, f"{claim}: figures not printed by their command: {missing}\n" + "\n".join(outputs)


# ---------------------------------------------------------------------------------------------------------------
# Layout block


def layout_names() -> set[Path]:
    """The paths the Layout block names, resolved against the tree.

    A line that starts in column 0 with a name ending in ``/`` sets the folder its names (and those of the indented
    lines below it) are relative to; other column-0 lines name files at the root. A name is a word that contains a
    ``/`` or ends in a file extension; words in parentheses or backticks are prose.
    """
    block = re.search(r"```\n(.*?)```", section("Layout"), flags=re.S)
    assert block, "the Layout section has no fenced block"
    text = re.sub(r"\([^()]*\)|`[^`]*`", lambda m: re.sub(r"[^\n]", " ", m.group()), block.group(1))
    names: set[Path] = set()
    base = ""
    for line in text.splitlines():
        words = [w.strip(",;:") for w in line.split()]
        if not words:
            continue
        if not line[0].isspace():
            base = words[0] if words[0].endswith("/") else ""
        for w in words:
            if "/" in w or re.search(r"\.\w+$", w):
                path = ROOT / w if w == base else ROOT / base / w
                names.add(path.resolve())
    return names


def test_every_layout_name_exists():
    missing = sorted(str(p.relative_to(ROOT)) for p in layout_names() if not p.exists())
    assert not missing, f"README.md Layout names paths that do not exist: {missing}"


def expected_in_layout() -> set[Path]:
    vitbench = ROOT / "shared" / "src" / "vitbench"
    paths = {p for p in vitbench.glob("*.py") if p.name != "__init__.py"}
    paths |= {p.parent for p in vitbench.glob("*/__init__.py")}
    paths |= set((ROOT / "tools").glob("*.py")) | set((ROOT / "docs").glob("*.md"))
    for pkg in ("ats", "lfvit", "liferegress"):
        paths |= {p.parent for p in (ROOT / "packages" / pkg / "src" / pkg).glob("*/__init__.py")}
    return {p.resolve() for p in paths}


def test_layout_names_every_module_tool_doc_and_subpackage():
    expected = expected_in_layout()
    assert any(p.suffix == ".py" and p.parent.name == "vitbench" for p in expected)
    unnamed = sorted(str(p.relative_to(ROOT)) for p in expected - layout_names())
    assert not unnamed, f"README.md Layout does not name: {unnamed}"
