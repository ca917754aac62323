"""Every ``*-train`` / ``*-eval`` refuses every bad value at once: exit 2, one ``prog: error:`` line, no traceback,
no file written.

Each case runs the console script's entry point in-process, in an empty folder, with small-run flags before the bad
value (so a value that slipped through would still end quickly and be caught by the assertions). The bad values are
a fault sweep's: nan / inf / negative numbers, input sizes the patch grid or the shipped weights cannot take, unknown
augmentation policies.
"""

from __future__ import annotations

import shlex

import pytest
from vitbench.testing import run_script

TRAIN = ("vitbench-train", "ats-train", "lfvit-train", "liferegress-train")
EVAL = ("ats-eval", "lfvit-eval", "liferegress-eval")
VIDEO = "--data moving-digits --model xvit_digits_patch8_64"
SMALL = {
    "train": "--cpu --limit-train 4 --limit-val 4 --batch-size 4 --epochs 1 --num-workers 0 --output-dir out",
    "eval": "--limit 4 --no-throughput --num-workers 0 --output-dir out",
}

# (flags, what the error line must contain); each runs with every command of its kind.
TRAIN_VALUES = [
    ("--clip-grad -1", "--clip-grad must be > 0, got -1"), ("--clip-grad nan", "--clip-grad must be > 0, got nan"),
    ("--lr inf", "--lr must be > 0, got inf"), ("--lr nan", "--lr must be > 0, got nan"),
    ("--lr 0", "--lr must be > 0"),
    ("--min-lr -1", "--min-lr must be >= 0"), ("--min-lr nan", "--min-lr must be >= 0, got nan"),
    ("--warmup-lr nan", "--warmup-lr"), ("--warmup-lr inf", "--warmup-lr"),
    ("--weight-decay -1", "--weight-decay must be >= 0"), ("--weight-decay nan", "--weight-decay"),
    ("--weight-decay -1000", "--weight-decay"),
    ("--mixup -1", "--mixup must be >= 0"), ("--mixup nan", "--mixup"), ("--cutmix -1", "--cutmix"),
    ("--repeated-aug -1", "--repeated-aug must be >= 0"), ("--warmup-epochs inf", "--warmup-epochs"),
    ("--warmup-epochs -1", "--warmup-epochs"), ("--decay-rate nan", "--decay-rate"),
    ("--smoothing nan", "--smoothing"), ("--smoothing 1", "--smoothing must be in [0, 1)"),
    ("--drop-path nan", "--drop-path"), ("--color-jitter nan", "--color-jitter"),
    ("--epochs 0", "--epochs must be >= 1, got 0"), ("--epochs 1.5", "invalid int value: '1.5'"),
    ("--batch-size 0", "--batch-size must be >= 1"), ("--grad-accum 0", "--grad-accum"),
    ("--num-workers -1", "--num-workers"), ("--seed -1", "--seed"), ("--max-steps 0", "--max-steps"),
    ("--checkpointing-steps -1", "--checkpointing-steps"), ("--eval-every -1", "--eval-every"),
    ("--limit-train 0", "--limit-train must be >= 1, got 0"), ("--keep-checkpoints -1", "--keep-checkpoints"),
    ("--img-size 0", "--img-size must be in [8, 4096], got 0"),
    ("--img-size 100000", "--img-size must be in [8, 4096]"),
    ("--img-size 12", "--img-size 12 is not a multiple of"), ("--img-size 13", "--img-size 13 is not a multiple of"),
    ("--auto-augment bogus-m9", "'bogus-m9' is not a timm auto-augment policy"),
]
EVAL_VALUES = [
    ("--img-size 0", "--img-size must be in [8, 4096], got 0"),
    ("--img-size 100000", "--img-size must be in [8, 4096]"), ("--img-size 12", "--img-size 12"),
    ("--img-size 13", "--img-size 13"), ("--img-size 100", "--img-size 100"),
    ("--img-size 224", "--img-size 224: the shipped weights of"), ("--img-size 64", "--img-size 64: the shipped"),
    ("--img-size 16", "--img-size 16: the shipped"), ("--batch-size 0", "--batch-size"), ("--limit 0", "--limit"),
    ("--crop-pct nan", "--crop-pct"), ("--crop-pct 0", "--crop-pct"), ("--crop-pct 2", "--crop-pct"),
    ("--num-classes 0", "--num-classes"), ("--throughput-batch 0", "--throughput-batch"),
    ("--warmup -1", "--warmup"), ("--repeats 0", "--repeats"), ("--visualize -1", "--visualize"),
    ("--seed nan", "invalid int value"),
]
CASES = (
    [(f"{p} {SMALL['train']} {flags}", text) for p in TRAIN for flags, text in TRAIN_VALUES]
    + [(f"{p} {SMALL['eval']} {flags}", text) for p in EVAL for flags, text in EVAL_VALUES]
    + [(f"ats-train {SMALL['train']} {VIDEO} {flags}", text) for flags, text in [
        ("--img-size 13", "--img-size 13"), ("--lr nan", "--lr"), ("--clip-grad -1", "--clip-grad")]]
    + [(f"ats-eval {SMALL['eval']} {VIDEO} {flags}", text) for flags, text in [
        ("--img-size 13", "--img-size 13"), ("--img-size 128", "--img-size 128: the shipped"),
        ("--rho nan", "--rho")]]
    + [(f"{SMALL_CMD} {flags}", text) for SMALL_CMD, flags, text in [
        (f"ats-train {SMALL['train']}", "--rho nan", "--rho must be in (0, 1], got nan"),
        (f"ats-train {SMALL['train']}", "--rho 0", "--rho must be in (0, 1], got 0"),
        (f"ats-train {SMALL['train']}", "--k nan", "--k must be >= 2, got nan"),
        (f"ats-train {SMALL['train']}", "--k inf", "--k must be >= 2, got inf"),
        (f"ats-eval {SMALL['eval']}", "--rho nan", "--rho must be in (0, 1], got nan"),
        (f"ats-eval {SMALL['eval']}", "--rho 1 inf", "--rho must be in (0, 1], got inf"),
        (f"ats-eval {SMALL['eval']}", "--k nan", "--k must be >= 2, got nan"),
        (f"ats-eval {SMALL['eval']}", "--visualize 99999", "--visualize 99999"),
        (f"liferegress-train {SMALL['train']}", "--temperature inf", "--temperature must be > 0, got inf"),
        (f"liferegress-train {SMALL['train']}", "--temperature nan", "--temperature"),
        (f"liferegress-train {SMALL['train']}", "--predictor-lr nan", "--predictor-lr must be > 0, got nan"),
        (f"liferegress-train {SMALL['train']}", "--predictor-lr inf", "--predictor-lr"),
        (f"liferegress-train {SMALL['train']}", "--backbone-lr nan", "--backbone-lr"),
        (f"liferegress-train {SMALL['train']}", "--backbone-lr inf", "--backbone-lr"),
        (f"liferegress-train {SMALL['train']}", "--rho nan", "--rho must be in (0, 1], got nan"),
        (f"liferegress-train {SMALL['train']}", "--img-size 56", "--img-size 56: the shipped weights"),
        (f"liferegress-train {SMALL['train']}", "--drop-layers -1", "--drop-layers"),
        (f"liferegress-eval {SMALL['eval']}", "--rho nan", "--rho must be in (0, 1], got nan"),
        (f"liferegress-eval {SMALL['eval']}", "--temperature inf", "--temperature"),
        (f"lfvit-train {SMALL['train']}", "--img-size 100", "--img-size 100 is not a multiple of"),
        (f"lfvit-train {SMALL['train']}", "--alpha nan", "--alpha"),
        (f"lfvit-train {SMALL['train']}", "--beta 1", "--beta must be in [0, 1)"),
        (f"lfvit-train {SMALL['train']}", "--region-size 0", "--region-size"),
        (f"lfvit-eval {SMALL['eval']}", "--eta nan", "--eta must be in [0, 1], got nan"),
        (f"lfvit-eval {SMALL['eval']}", "--alpha 0", "--alpha"),
        ("vitbench-flops", "--img-size 0", "--img-size"), ("vitbench-flops", "--img-size 13", "--img-size 13"),
        ("vitbench-flops", "--img-size 100000", "--img-size"),
        ("vitbench-digits export", "afile", "afile is a file, not a directory"),
        ("vitbench-digits info", "--train-size 0", "--train-size"),
    ]]
)


def run_command(command: str, capsys) -> tuple[int, str]:
    prog, *argv = shlex.split(command)
    return run_script(prog, argv, capsys)


@pytest.mark.parametrize(("command", "text"), CASES, ids=[c[0].split()[0] + " " + c[0].split("out ")[-1].split(
    " 0 ")[-1] for c in CASES])
def test_bad_value_is_one_line_and_writes_nothing(command, text, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("a regular file")
    rc, err = run_command(command, capsys)
    prog = command.split()[0]
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: error: ")]
    assert rc == 2 and len(lines) == 1, f"`{command}`: exit {rc}, stderr:\n{err[-3000:]}"
    assert "Traceback" not in err
    assert text in lines[0], f"`{command}` says\n  {lines[0]}\nexpected it to contain\n  {text}"
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["afile"], f"`{command}` wrote {written}"
