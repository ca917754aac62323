"""Flag types that check their value: :class:`Number` (finite, in a range) and the shared ranges every command uses.

One mechanism for every numeric flag: a flag typed :class:`Number` converts its text (or a ``-c/--config`` file's
value), and :func:`vitbench.cli.parse` checks the parsed value against the range before the command starts
(``prog: error: --lr must be > 0, got inf``), so no value reaches a command's work that it cannot use. Plain
``int`` / ``float`` flags become unbounded :class:`Number` flags (finite only).
"""

from __future__ import annotations

import argparse
import math


class Number:
    """An argparse ``type``: text or a number as ``kind`` (``int`` refuses fractions); :meth:`problem` says what is
    wrong with a parsed value: not finite or outside ``gt`` / ``ge`` / ``lt`` / ``le``."""

    def __init__(self, kind: type = float, *, gt: float | None = None, ge: float | None = None,
                 lt: float | None = None, le: float | None = None):
        self.kind, self.gt, self.ge, self.lt, self.le = kind, gt, ge, lt, le
        self.__name__ = kind.__name__  # argparse names the type in its messages: invalid int value: 'x'

    def describe(self) -> str:
        """``>= 1``, ``in (0, 1]``, ``a finite number``, ..."""
        lo = self.gt if self.gt is not None else self.ge
        hi = self.lt if self.lt is not None else self.le
        if lo is not None and hi is not None:
            return f"in {'(' if self.gt is not None else '['}{lo}, {hi}{')' if self.lt is not None else ']'}"
        if lo is not None:
            return f"{'>' if self.gt is not None else '>='} {lo}"
        if hi is not None:
            return f"{'<' if self.lt is not None else '<='} {hi}"
        return "an integer" if self.kind is int else "a finite number"

    def __call__(self, value):
        if isinstance(value, bool):
            raise argparse.ArgumentTypeError(f"invalid {self.__name__} value: {value!r}")
        if isinstance(value, str):
            try:
                return self.kind(value.strip())
            except ValueError:
                raise argparse.ArgumentTypeError(f"invalid {self.__name__} value: {value!r}") from None
        if isinstance(value, (int, float)):
            if self.kind is int and not float(value).is_integer():
                raise argparse.ArgumentTypeError(f"invalid int value: {value!r}")
            return self.kind(value) if math.isfinite(value) else float(value)
        raise argparse.ArgumentTypeError(f"invalid {self.__name__} value: {value!r}")

    def problem(self, x) -> str | None:
        """None for a finite value in range, else ``must be <range>, got <x>``."""
        ok = (math.isfinite(x) and (self.gt is None or x > self.gt) and (self.ge is None or x >= self.ge)
              and (self.lt is None or x < self.lt) and (self.le is None or x <= self.le))
        return None if ok else f"must be {self.describe()}, got {x}"

    def __repr__(self) -> str:
        return f"Number({self.kind.__name__}, {self.describe()})"


FINITE = Number()                       # any finite number
POSITIVE = Number(gt=0)                 # learning rates, temperatures
NON_NEGATIVE = Number(ge=0)             # weight decay, mixup alphas, warm-up epochs, decay rates
FRACTION = Number(ge=0, lt=1)           # label smoothing, drop-path rate
UNIT = Number(ge=0, le=1)               # probabilities, confidence thresholds
KEEP_RATE = Number(gt=0, le=1)          # rho
COUNT = Number(int, ge=1)               # epochs, batch sizes, limits
NON_NEGATIVE_INT = Number(int, ge=0)    # workers, repeats, indices
SEED = Number(int, ge=0, lt=2**32)
IMG_SIZE = Number(int, ge=8, le=4096)   # 4096 px at patch 16 is 65 536 tokens: beyond any device's attention


# One name, one meaning, one range: the range of every numeric flag the commands share, by its name (dest).
RULES: dict[str, Number] = {
    # training (vitbench.engine)
    "epochs": COUNT, "batch_size": COUNT, "lr": POSITIVE, "min_lr": NON_NEGATIVE, "warmup_lr": NON_NEGATIVE,
    "warmup_epochs": NON_NEGATIVE, "decay_rate": NON_NEGATIVE, "weight_decay": NON_NEGATIVE, "clip_grad": POSITIVE,
    "smoothing": FRACTION, "mixup": NON_NEGATIVE, "cutmix": NON_NEGATIVE, "repeated_aug": NON_NEGATIVE_INT,
    "color_jitter": NON_NEGATIVE, "drop_path": FRACTION, "grad_accum": COUNT, "num_workers": NON_NEGATIVE_INT,
    "limit_train": COUNT, "limit_val": COUNT, "seed": SEED, "checkpointing_steps": NON_NEGATIVE_INT,
    "keep_checkpoints": NON_NEGATIVE_INT, "max_steps": COUNT, "eval_every": NON_NEGATIVE_INT, "num_classes": COUNT,
    "img_size": IMG_SIZE,
    # evaluation (vitbench.evaluation)
    "limit": COUNT, "batch_sizes": COUNT, "crop_pct": Number(gt=0, le=1), "throughput_batch": COUNT,
    "warmup": NON_NEGATIVE_INT, "repeats": COUNT, "visualize": NON_NEGATIVE_INT,
    # the methods
    "rho": KEEP_RATE, "k": Number(ge=2), "temperature": POSITIVE, "predictor_lr": POSITIVE, "backbone_lr": POSITIVE,
    "drop_layers": NON_NEGATIVE_INT, "eta": UNIT, "alpha": Number(gt=0, le=1), "beta": Number(ge=0, lt=1),
    "region_size": COUNT, "selection_epoch": NON_NEGATIVE_INT,
    # vitbench-digits, vitbench-video, ats-diagnose
    "train_size": COUNT, "val_size": COUNT, "frames": COUNT, "block": NON_NEGATIVE_INT, "outlier_factor": Number(gt=1),
}


def auto_augment(text: str) -> str:
    """An argparse ``type`` for timm's auto-augment policy strings (``rand-m9-mstd0.5-inc1``, ``augmix-m5-w4-d2``,
    ``original-mstd0.5``, ``v0``, ...; ``none`` for off): the policy is built once, as timm's transform factory would,
    so an unknown policy or section is refused at parse time instead of when the data loads."""
    from timm.data import auto_augment as aa  # deferred: only a given policy needs timm's augmentation module

    if text.lower() == "none":
        return text
    params = {"translate_const": 100, "img_mean": (124, 116, 104)}
    try:
        if text.startswith("rand"):
            aa.rand_augment_transform(text, params)
        elif text.startswith("augmix"):
            aa.augment_and_mix_transform(text, {**params, "translate_pct": 0.3})
        else:
            aa.auto_augment_transform(text, params)
    except (AssertionError, KeyError, ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a timm auto-augment policy (e.g. rand-m9-mstd0.5-inc1, "
                                         "augmix-m5-w4-d2, original-mstd0.5, v0; none: off)") from None
    return text


# Flags whose text must parse: the type of every flag of that name that has none of its own.
TEXT_TYPES = {"auto_augment": auto_augment}


def field_problems(config) -> list[str]:
    """``--flag must be ..., got x`` for every field of a config dataclass that :data:`RULES` names and whose value
    is outside that range: the command line's checks, for configurations built in Python."""
    out = []
    for name, rule in RULES.items():
        value = getattr(config, name, None)
        for x in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(x, (int, float)) and not isinstance(x, bool) and rule.problem(x):
                out.append(f"--{name.replace('_', '-')} {rule.problem(x)}")
                break
    return out


def finite_numbers(parser: argparse.ArgumentParser) -> None:
    """Every flag of ``parser`` typed plain ``int`` / ``float`` becomes a :class:`Number` with the range
    :data:`RULES` gives its name (unbounded, refusing only nan and inf, for a name not there); flags typed
    :class:`Number` keep their own range; an untyped flag named in :data:`TEXT_TYPES` gets that type."""
    for action in parser._actions:
        if action.type is None and action.dest in TEXT_TYPES and action.option_strings:
            action.type = TEXT_TYPES[action.dest]
        if action.type is int or action.type is float:
            rule = RULES.get(action.dest)
            bounds = {} if rule is None else {k: getattr(rule, k) for k in ("gt", "ge", "lt", "le")}
            action.type = Number(action.type, **bounds)


def range_problems(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[tuple[str, str]]:
    """``(flag, problem)`` for every parsed value of a :class:`Number` flag outside its range (defaults included)."""
    out = []
    for action in parser._actions:
        if not isinstance(action.type, Number) or action.help == argparse.SUPPRESS or not action.option_strings:
            continue
        value = getattr(args, action.dest, None)
        for x in value if isinstance(value, (list, tuple)) else [value]:
            problem = None if x is None else action.type.problem(x)
            if problem:
                out.append((max(action.option_strings, key=len), problem))
                break
    return out
