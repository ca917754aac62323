"""docs/ERRORS.md shows the messages the commands print: each row whose failure can be provoked in a second is run.

A case names a row of ERRORS.md by its section and the exact text of its first cell, and gives the command lines
that provoke it. Each command runs in-process (the console script's entry point) in an empty folder, so the paths in
the doc (``R``, ``DIR``, ``w.safetensors``, ``OUTPUT_DIR``, ``afile/run``) are the relative paths given on the command
line; ``MODEL`` is replaced by the model of the command, and ``...`` in the doc matches any text. The whole
``prog: error: message`` line printed must equal the doc's message after ``prog: error: ``.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
from vitbench.testing import run_script

ROOT = Path(__file__).parents[2]
DOC = ROOT / "docs" / "ERRORS.md"

TRAIN = ("vitbench-train", "ats-train", "lfvit-train", "liferegress-train")
EVAL = ("ats-eval", "lfvit-eval", "liferegress-eval")
VIDEO = "--data moving-digits --model xvit_digits_patch8_64"

# (section, first cell of the row, [command lines]); training commands get --cpu and the eval commands an
# --output-dir unless the command line names one.
CASES = [
    ("Training", "`--data foo:/x` (every `*-train`)", [f"{p} --data foo:/x" for p in TRAIN]),
    ("Training", "`--model vit_nope` (vitbench-, ats-, liferegress-train)",
     [f"{p} --model vit_nope" for p in ("vitbench-train", "ats-train", "liferegress-train")]),
    ("Training", "`lfvit-train --model vit_digits_patch8_112`", ["lfvit-train --model vit_digits_patch8_112"]),
    ("Training", "truncated `--checkpoint` / `--init-backbone` `.safetensors`",
     ["vitbench-train --checkpoint w.safetensors", "lfvit-train --init-backbone w.safetensors"]),
    ("Training", "zero-byte `--checkpoint` / `--init-backbone`",
     ["vitbench-train --checkpoint w.safetensors", "lfvit-train --init-backbone w.safetensors"]),
    ("Training", "missing `--checkpoint`", ["vitbench-train --checkpoint w.safetensors"]),
    ("Training", "`--limit-val 0` (`--limit-train 0`)", ["vitbench-train --limit-val 0"]),
    ("Training", "`--keep-checkpoints -1`", ["vitbench-train --keep-checkpoints -1"]),
    ("Training", "`--output-dir` not writable (here: below a regular file)", ["vitbench-train --output-dir afile/run"]),
    ("Training", "`--output-dir R` that holds another run", ["vitbench-train --output-dir R"]),
    ("Training", "`--resume auto --resume-override nope`", ["vitbench-train --resume auto --resume-override nope"]),
    ("Training", "`--resume-override lr` without `--resume`", ["vitbench-train --resume-override lr"]),
    ("Training", "`--resume auto --overwrite`", ["vitbench-train --resume auto --overwrite"]),
    ("Training", "`--resume DIR` that is no checkpoint", ["vitbench-train --resume DIR"]),
    ("Training", "`--resume auto` whose checkpoints are all damaged", ["vitbench-train --resume auto --output-dir R"]),
    ("Training", "impossible hyper-parameters (`--epochs 0`, `--lr -1`, `--smoothing 1.5`, ...)",
     ["vitbench-train --epochs 0"]),
    ("Training", "a number out of its flag's range, nan or inf (`--lr inf`, `--clip-grad -1`, `--mixup nan`, "
     "`--warmup-epochs inf`, ...; every command, one range per flag name in `vitbench.flagtypes.RULES`)",
     [f"{p} --lr inf" for p in TRAIN]),
    ("Training", "`--epochs 1.5` (a fraction for an integer flag)", ["vitbench-train --epochs 1.5"]),
    ("Training", "`--img-size 0` / `--img-size 100000`", ["vitbench-train --img-size 0", "ats-eval --img-size 0"]),
    ("Training", "`--img-size 13` (not a multiple of the patch)",
     ["vitbench-train --img-size 13", "ats-train --img-size 13"]),
    ("Training", "`lfvit-train --img-size 100`", ["lfvit-train --img-size 100"]),
    ("Training",
     "`liferegress-train --img-size 56` (shipped backbone weights; also `--pretrained` on an embedded model)",
     ["liferegress-train --img-size 56", "vitbench-train --pretrained --img-size 56"]),
    ("Training", "`--auto-augment bogus-m9`", ["vitbench-train --auto-augment bogus-m9"]),
    ("Training", "`-c c.yaml` holding `foo: 1`", ["vitbench-train -c c.yaml"]),
    ("Training", "`-c nope.yaml`", ["vitbench-train -c nope.yaml"]),
    ("Training", "`--conf c.yaml` (an abbreviation of `--config`)", ["vitbench-train --conf c.yaml"]),
    ("Evaluation", "`--img-size 224` on an embedded model with its shipped weights (every eval)",
     [f"{p} --img-size 224" for p in EVAL]),
    ("Evaluation", "`ats-eval --visualize 99999`", ["ats-eval --limit 4 --no-throughput --visualize 99999"]),
    ("Other", "`vitbench-digits export afile` (a regular file)", ["vitbench-digits export afile"]),
    ("Evaluation", "`ats-eval --rho 1.5`", ["ats-eval --rho 1.5"]),
    ("Evaluation", "`ats-eval --rho 0.5 --k 10`", ["ats-eval --rho 0.5 --k 10"]),
    ("Evaluation", "`ats-eval --stages 3-x`", ["ats-eval --stages 3-x"]),
    ("Evaluation", "`ats-eval --stages 12`", ["ats-eval --stages 12"]),
    ("Evaluation", "`ats-eval --stages 3,3`", ["ats-eval --stages 3,3"]),
    ("Evaluation", "`ats-eval --k nan`", ["ats-eval --k nan"]),
    ("Evaluation", "`ats-eval --k 10000`", ["ats-eval --k 10000"]),
    ("Evaluation", "`ats-eval --model psvit_b14_224` (no `--checkpoint`; also a CvT)",
     ["ats-eval --model psvit_b14_224"]),
    ("Evaluation", "`ats-eval --model psvit_b14_224 --flops-only --stages 10`",
     ["ats-eval --model psvit_b14_224 --flops-only --stages 10"]),
    ("Evaluation", "`vitbench-flops --model psvit_b14_224 --img-size 256`",
     ["vitbench-flops --model psvit_b14_224 --img-size 256"]),
    ("Evaluation", "`--data foo:/x` (every eval)", [f"{p} --data foo:/x" for p in EVAL]),
    ("Evaluation", "`--img-size 113` (every eval)", ["ats-eval --img-size 113"]),
    ("Evaluation", "`--limit 0` (every eval)", [f"{p} --limit 0" for p in EVAL]),
    ("Evaluation", "`ats-eval --device tpu`", ["ats-eval --device tpu"]),
    ("Evaluation", "`--model no_such_model`",
     ["ats-eval --model no_such_model", "liferegress-eval --model no_such_model"]),
    ("Evaluation", "`--checkpoint /nonexistent/w.safetensors`", ["ats-eval --checkpoint /nonexistent/w.safetensors"]),
    ("Evaluation", "`lfvit-eval --model deit_small_patch16_224` (no weights)",
     ["lfvit-eval --model deit_small_patch16_224"]),
    ("Evaluation", "`lfvit-eval --model deit_small_patch16_224 --pretrained`",
     ["lfvit-eval --model deit_small_patch16_224 --pretrained"]),
    ("Evaluation", "`lfvit-eval --eta 1.5`", ["lfvit-eval --eta 1.5"]),
    ("Evaluation", "`liferegress-eval --rho 1.5`", ["liferegress-eval --rho 1.5"]),
    ("Evaluation", "`liferegress-eval --model deit_tiny_patch16_224` (no checkpoint)",
     ["liferegress-eval --model deit_tiny_patch16_224"]),
    ("Evaluation", "`--json OUTPUT_DIR/results.json`",
     ["ats-eval --output-dir OUTPUT_DIR --json OUTPUT_DIR/results.json"]),
    ("Evaluation", "`--output-dir R` that holds a training run (every eval)", [f"{p} --output-dir R" for p in EVAL]),
    ("Evaluation", "`--json R/results.json` (a training run's folder)", ["ats-eval --json R/results.json"]),
    ("Evaluation", "`--json afile` (an existing file that is no evaluation's results)", ["lfvit-eval --json afile"]),
    ("Video", "`--data moving-digits --model deit_tiny_patch16_224`",
     ["ats-eval --data moving-digits --model deit_tiny_patch16_224"]),
    ("Video", "`--model xvit_digits_patch8_64` with image data", ["ats-eval --model xvit_digits_patch8_64"]),
    ("Video", "`--k 600` on the embedded 8-frame X-ViT", ["ats-eval --data moving-digits --k 600"]),
    ("Video", "`--data moving-digits --stages 3-14` (the embedded 12-block X-ViT)",
     ["ats-eval --data moving-digits --stages 3-14"]),
    ("Video", "`--preset table1` / `--variant ...`",
     ["ats-eval --data moving-digits --preset table1", "ats-eval --data moving-digits --variant topk"]),
    ("Video", "missing `--checkpoint`", [f"ats-train {VIDEO} --checkpoint w.pyth"]),
    ("Video", "`ats-train --mixup 0.8` (also `--cutmix`, `--auto-augment`, `--color-jitter`) on clips",
     [f"ats-train {VIDEO} --mixup 0.8"]),
    ("Video", "`ats-train --variant topk` on a video model", [f"ats-train {VIDEO} --variant topk"]),
    ("Video", "`ats-train --pretrained` on a video model", [f"ats-train {VIDEO} --pretrained"]),
    ("Other", "`vitbench-flops --json afile`, `vitbench-throughput --json afile`, a "
     "benchmark's `--json` (an existing file that is no earlier result of the same command: another run's "
     "`results.json`, an evaluation's, another benchmark's, a non-JSON file; its own earlier output is replaced)",
     ["vitbench-flops --json afile", "vitbench-throughput --json afile"]),
    ("Training", "`liferegress-train --resume auto` into a finished run whose stage folders are gone, or into "
     "another command's results (a finished run with its stages is reported instead: `R holds a finished run "
     "(model.safetensors, results.json); nothing to do`, exit 0, every file untouched)",
     ["liferegress-train --resume auto --output-dir R"]),
]

# Rows whose command reaches the Hub; with HF_HUB_OFFLINE=1 (as nox runs the tests) they fail at once.
OFFLINE_CASES = [
    ("Evaluation", "`--pretrained` without the Hub", ["ats-eval --model deit_tiny_patch16_224 --pretrained"]),
]


def doc_rows() -> dict[tuple[str, str], str]:
    """``(section, first cell) -> message cell`` of every table row of ERRORS.md (section: the heading's first word)."""
    rows, section = {}, ""
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            section = line[3:].split()[0]
        elif line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
            assert (section, cells[0]) not in rows, f"two rows {cells[0]!r} in section {section}"
            rows[section, cells[0]] = cells[1]
    return rows


def documented_message(cell: str) -> str:
    """The first code span of a cell (``` `` `` ``` spans may hold backticks)."""
    match = re.search(r"(`+)(.+?)(?<!`)\1(?!`)", cell)
    assert match, f"no message in {cell!r}"
    text = match.group(2)
    return text[1:-1] if len(match.group(1)) > 1 and text.startswith(" ") and text.endswith(" ") else text


def as_pattern(message: str) -> re.Pattern:
    return re.compile(".*?".join(re.escape(part) for part in message.split("...")))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty folder as the working directory, with the files the rows need under their doc names."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("a regular file")
    (tmp_path / "DIR").mkdir()
    (tmp_path / "c.yaml").write_text("foo: 1\n")
    run = tmp_path / "R"
    (run / "checkpoints" / "step_00000001").mkdir(parents=True)
    (run / "checkpoints" / "step_00000001" / "progress.json").write_text("{}")
    for name in ("config.json", "log.jsonl", "results.json", "model.safetensors"):
        (run / name).write_text("{}")
    return tmp_path


def write_checkpoint(kind: str, path: Path) -> None:
    import timm

    from vitbench.models import save_weights

    if kind == "zero-byte":
        path.write_bytes(b"")
    elif kind == "truncated":
        whole = save_weights(timm.create_model("vit_digits_patch8_112"), path).read_bytes()
        path.write_bytes(whole[: len(whole) // 2])


def error_line(command: str, capsys) -> tuple[str, str]:
    """``(prog, the one 'prog: error: ...' line)`` that ``command`` prints on stderr; it must exit with 2."""
    prog, *argv = shlex.split(command)
    if prog.endswith("-train") and "--cpu" not in argv:
        argv.append("--cpu")
    if prog.endswith(("-train", "-eval")) and "--output-dir" not in argv:
        argv += ["--output-dir", "out"]
    rc, err = run_script(prog, argv, capsys)
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: error: ")]
    assert rc == 2 and len(lines) == 1, f"`{command}`: exit {rc}, stderr:\n{err}"
    return prog, lines[0]


def check(section: str, key: str, commands: list[str], capsys, workdir: Path) -> None:
    rows = doc_rows()
    assert (section, key) in rows, f"ERRORS.md has no row {key!r} in its {section} section"
    message = documented_message(rows[section, key])
    for command in commands:
        if "truncated" in key or "zero-byte" in key:
            write_checkpoint(key.split()[0], workdir / "w.safetensors")
        model = re.search(r"--model (\S+)", command)
        expected = message.replace("MODEL", model.group(1)) if model else message
        prog, line = error_line(command, capsys)
        assert as_pattern(f"{prog}: error: {expected}").fullmatch(line), (
            f"`{command}` prints\n  {line}\nERRORS.md ({section}: {key}) says\n  {prog}: error: {expected}")


@pytest.mark.parametrize(("section", "key", "commands"), CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_documented_message_is_the_printed_line(section, key, commands, capsys, workdir):
    check(section, key, commands, capsys, workdir)


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1", reason="needs HF_HUB_OFFLINE=1 to fail without waiting")
@pytest.mark.parametrize(("section", "key", "commands"), OFFLINE_CASES, ids=[c[1] for c in OFFLINE_CASES])
def test_documented_offline_message_is_the_printed_line(section, key, commands, capsys, workdir):
    check(section, key, commands, capsys, workdir)
