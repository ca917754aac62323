"""Every fenced command and Python example of README.md and the package READMEs runs as written.

Each ``bash`` block is read as the shell would read it (continuation lines joined, comments dropped, ``VAR=...``
assignments expanded, ``&&`` chains and ``for`` loops kept whole) and each command is either run in-process from an
empty folder or skipped with the reason shown by ``pytest -rs``. Each ``python`` block is executed as it stands.

The blocks of one README run in order in one empty folder, as a reader would run them (a later block may use what
an earlier one trained). Runs are bounded, never changed in what they do: an evaluation on data gets ``--limit 16
--no-throughput --num-workers 0``, a training run ``--limit-train 8 --limit-val 8 --batch-size 8 --num-workers 0``
with ``--epochs`` capped at 2 (one update per epoch, every output written as in a full run), ``vitbench-throughput``
one small batch, ``vitbench-digits export`` 20 + 10 images, and ``digits:train_size=N`` reads the default (cached)
training split, which ``--limit-train`` cuts anyway. Files the READMEs read from the repository (``shared/...``,
``packages/...``) are read there; everything a command writes lands in the temporary folder, shipped weights
included. Skipped: installation, nox sessions, GPU launchers, Slurm scripts, and commands
that need ImageNet, Kinetics or the authors' released checkpoints (none of which are on the test machines).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import io
import os
import re
import runpy
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from vitbench import cli

ROOT = Path(__file__).parents[2]
READMES = ("README.md", "packages/ats/README.md", "packages/lfvit/README.md", "packages/liferegress/README.md",
           "shared/README.md")
PROGRAMS = {e.name: e for e in importlib.metadata.entry_points(group="console_scripts")}

# (pattern in the command, reason): the first match skips the command
SKIPS = (
    (r"^(uv )?pip install", "installs packages (the test runs in the installed development environment)"),
    (r"^nox\b", "runs a nox session (CI runs every session; `reproduce` is the long side-by-side run)"),
    (r"--multi_gpu", "needs GPUs"),
    (r"\$IMNET|\$IMAGENET|/data/imagenet", "needs ImageNet (not on the test machines)"),
    (r"videofolder:K[46]00", "needs Kinetics and the authors' video checkpoints (not on the test machines)"),
    (r"(^|\s)\.\.\.(\s|$)", "elided arguments (`...`): a form, not a command"),
    (r"^some-eval\b", "a placeholder for any of the *-eval commands"),
)
RELEASED = re.compile(r"\S+\.(pth|pyth|ckpt)\b|<[^>]+checkpoint>")
EVAL_BOUND = ["--limit", "16", "--no-throughput", "--num-workers", "0"]
TRAIN_BOUND = ["--limit-train", "8", "--limit-val", "8", "--batch-size", "8", "--num-workers", "0"]
MAX_EPOCHS = 2
BOUNDS = {
    "ats-diagnose": ["--limit", "16"],
    "vitbench-throughput": ["--batch-sizes", "2", "--warmup", "1", "--repeats", "2"],
    "vitbench-digits": ["--train-size", "20", "--val-size", "10"],
}


@dataclass(frozen=True)
class Block:
    readme: str
    line: int
    lang: str
    text: str

    @property
    def id(self) -> str:
        return f"{self.readme}:{self.line}"


def fenced_blocks() -> list[Block]:
    found = []
    for name in READMES:
        text = (ROOT / name).read_text(encoding="utf-8")
        for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, flags=re.M | re.S):
            found.append(Block(name, text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2)))
    return found


BLOCKS = fenced_blocks()
CODE = [b for b in BLOCKS if b.lang in ("bash", "sh", "python")]


def shell_commands(text: str) -> list[str]:
    """The block's commands: continuation lines joined, multi-line quotes kept, ``for ... done`` kept whole,
    comments dropped."""
    commands, pending = [], ""
    for line in text.splitlines():
        pending = f"{pending}\n{line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        try:
            words = shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the command goes on
            continue
        if words.count("do") > sum(w.rstrip(";") == "done" for w in words):  # inside a for loop
            continue
        if words:
            commands.append(pending)
        pending = ""
    return commands


def expand(command: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$(\w+)|\$\{(\w+)\}", lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), command)


def skip_reason(command: str) -> str | None:
    flat = " ".join(command.split())
    for pattern, reason in SKIPS:
        if re.search(pattern, flat):
            return reason
    missing = [m.group(0) for m in RELEASED.finditer(flat) if not Path(m.group(0)).exists()]
    if missing:
        return f"needs the authors' released checkpoint ({missing[0]})"
    return None


def bounded(argv: list[str]) -> list[str]:
    """``argv`` (program first) with the bounds of the module docstring; inputs from the repository made absolute."""
    prog, *args = argv
    args = [re.sub(r"^digits:train_size=\d+$", "digits", a) for a in args]
    args = [str(ROOT / a) if re.match(r"(shared|packages|configs)/", a) and (ROOT / a).is_file() else a for a in args]
    if prog.endswith("-eval") and "--flops-only" not in args:
        args += EVAL_BOUND
    elif prog.endswith("-train"):
        args = [str(min(int(a), MAX_EPOCHS)) if i and args[i - 1] == "--epochs" else a for i, a in enumerate(args)]
        args = [str(min(int(a), MAX_EPOCHS - 1)) if i and args[i - 1] == "--selection-epoch" else a
                for i, a in enumerate(args)]
        args += TRAIN_BOUND
    elif prog == "vitbench-digits" and args[:1] == ["export"]:
        args = ["export", "exported"] + BOUNDS[prog]
    else:
        args += BOUNDS.get(prog, [])
    return [prog, *args]


def run_python_code(code: str) -> None:
    for quoted in re.findall(r"'((?:shared|packages)/[^']+)'", code):  # written paths: created under the cwd
        Path(quoted).parent.mkdir(parents=True, exist_ok=True)
    exec(compile(code, "<README>", "exec"), {"__name__": "__readme__"})


def run_argv(argv: list[str]) -> None:
    while argv and re.fullmatch(r"\w+=.*", argv[0]):  # OMP_NUM_THREADS=1 prog ...: the environment is the test's
        argv = argv[1:]
    if argv[:2] == ["python", "-c"]:
        return run_python_code(argv[2])
    if argv[:2] == ["python", "-m"]:
        old = sys.argv
        sys.argv = [argv[2], *argv[3:]]
        try:
            runpy.run_module(argv[2], run_name="__main__")
        except SystemExit as e:
            assert e.code in (0, None), f"`{shlex.join(argv)}` exited with {e.code}"
        finally:
            sys.argv = old
        return None
    argv = bounded(argv)
    assert argv[0] in PROGRAMS, f"`{argv[0]}` is not an installed command"
    try:
        rc = PROGRAMS[argv[0]].load()(argv[1:])
    except SystemExit as e:
        rc = e.code
    assert rc in (0, None), f"`{shlex.join(argv)}` exited with {rc}"


def parsed_module(argv: list[str]) -> tuple[str, list[str]] | None:
    """The module and arguments of one of this repository's commands (``prog ...``, ``python -m mod ...``,
    ``accelerate launch ... -m mod ...``, ``torchrun ... -m mod ...``); None for anything else."""
    while argv and re.fullmatch(r"\w+=.*", argv[0]):
        argv = argv[1:]
    if argv and argv[0] in PROGRAMS and PROGRAMS[argv[0]].module.split(".")[0] in (
            "ats", "lfvit", "liferegress", "vitbench"):
        return PROGRAMS[argv[0]].module, argv[1:]
    if "-m" in argv and argv[0] in ("python", "accelerate", "torchrun"):
        i = argv.index("-m")
        return argv[i + 1], argv[i + 2:]
    return None


def check_arguments(command: str) -> None:
    """A command that is not run still parses: every flag it passes exists (values are not checked: they may name
    data or files that are not here). ``for`` loops are checked command by command; ``...`` elisions are dropped."""
    body = " ".join(command.split())
    for var, first in re.findall(r"\bfor (\w+) in (\S+)", body):  # a loop's commands with its first value
        body = body.replace(f"${var}", first)
    body = re.sub(r"\bfor \w+ in [^;]*;\s*do\b|\bdone\b", " ", body)
    for part in re.split(r"&&|;", body):
        argv = [w for w in shlex.split(part, comments=True) if w != "..."]
        target = parsed_module(argv) if argv else None
        if target is None:
            continue
        module, args = target
        parser = cli.prepare(importlib.import_module(module).build_parser())  # with -c/--config, as main runs it
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.suppress(SystemExit):
            parser.parse_args(args)
        assert "unrecognized arguments" not in err.getvalue() and "error:" not in err.getvalue(), (
            f"`{' '.join(part.split())}`: {err.getvalue().strip()}")


def run_block(block: Block) -> list[str]:
    """Run every command of a bash block in order; returns the skip reasons of the commands not run."""
    variables, skipped = {}, []
    for command in shell_commands(block.text):
        command = expand(command, variables)
        assignment = re.fullmatch(r"(\w+)=(\S*|\"[^\"]*\")", command.strip())
        if assignment:
            variables[assignment.group(1)] = assignment.group(2).strip('"')
            continue
        reason = skip_reason(command)
        if reason:
            check_arguments(command)
            skipped.append(f"`{' '.join(command.split())[:60]}...`: {reason}")
            continue
        for part in command.split(" && "):
            run_argv(shlex.split(part, comments=True))
    return skipped


def test_every_fenced_block_is_code_or_declared_text():
    """A fenced block without a language is a tree or a schema, never a command this test would miss."""
    for b in BLOCKS:
        if b.lang in ("bash", "sh", "python"):
            continue
        assert b.lang in ("", "text", "json", "yaml"), b.id
        first = b.text.split(maxsplit=1)[0] if b.text.split() else ""
        assert first not in PROGRAMS and first not in ("python", "pip"), f"{b.id}: a command in a {b.lang!r} block"


def test_the_readmes_have_commands_and_examples():
    assert sum(b.lang == "python" for b in CODE) >= 4 and sum(b.lang == "bash" for b in CODE) >= 20


_FOLDERS: dict[str, Path] = {}


@pytest.mark.parametrize("block", CODE, ids=[b.id for b in CODE])
def test_readme_block_runs(block, tmp_path_factory, monkeypatch):
    tmp_path = _FOLDERS.setdefault(block.readme, tmp_path_factory.mktemp(block.readme.replace("/", "_")))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if block.lang == "python":
        run_python_code(block.text)
        return
    if "#SBATCH" in block.text:
        pytest.skip("a Slurm job script (needs a cluster)")
    skipped = run_block(block)
    if skipped and len(skipped) == len(shell_commands(block.text)) - sum(
            bool(re.fullmatch(r"\w+=\S.*", c.strip())) for c in shell_commands(block.text)):
        pytest.skip("; ".join(skipped))
    if skipped:
        print("not run:", *skipped, sep="\n  ")
    assert os.getcwd() == str(tmp_path)
