"""What the image and video sides of ``ats-eval`` (and ``ats-train``, ``ats-diagnose``) share: ATS's own evaluation
flags as :class:`ATSEvalConfig`, stage parsing, figure names and the table of shipped fine-tuned weights."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from vitbench import evaluation as ev

from .paper import DEFAULT_RHO, DEFAULT_RUNS, LATE, MULTI, PRESETS, Run, late

WEIGHTS = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class Shipped:
    """Fine-tuned ATS weights of the embedded model (their ``ats-train`` commands are in the README) and the
    configurations the no-argument run shows them at: the placement they were trained for."""

    file: str
    stages: tuple[int, ...]
    runs: tuple[Run, ...]

    @property
    def path(self) -> Path:
        return WEIGHTS / self.file


# The no-argument run: off the shelf, the default sweep plus blocks 7..11 at rho 1; fine-tuned, each shipped file.
EMBEDDED_RUNS = (*DEFAULT_RUNS, late(1.0))
SHIPPED = (Shipped("vit_digits_patch8_112_ats.safetensors", MULTI, (DEFAULT_RUNS[0],)),
           Shipped("vit_digits_patch8_112_ats_7-11.safetensors", LATE, (late(1.0), late(0.87), late(0.72))))
# Other embedded backbones: the dense weights ``ats-eval --model NAME`` loads without --checkpoint, and the
# fine-tuned ATS weights (trained at ``stages``) evaluated next to them at the requested runs. The embedded CvT:
# dw_bn dense, linear stage 3 fine-tuned with ATS in stage 3's blocks 0..8.
# The embedded EViT (keep 0.7 in blocks 3, 6, 9): fine-tuned from the embedded backbone, and EViT + ATS fine-tuned
# from it with ATS in blocks 4, 5, 7, 8, 10, 11 (Table A.5).
SHIPPED_DENSE = {"cvt_digits_112": "cvt_digits_112.safetensors",
                 "evit_digits_patch8_112": "evit_digits_patch8_112.safetensors"}
SHIPPED_ATS = {"cvt_digits_112": Shipped("cvt_digits_112_ats.safetensors", tuple(range(9)), ()),
               "evit_digits_patch8_112": Shipped("evit_digits_patch8_112_ats.safetensors", (4, 5, 7, 8, 10, 11), ())}
BASELINES = ("evit",)  # static-pruning baselines ats-eval can add to the embedded default's rows


@dataclass(frozen=True)
class ATSEvalConfig:
    """ATS's own evaluation flags; the common ones are :class:`vitbench.evaluation.EvalConfig`."""

    stages: tuple[int, ...] = MULTI
    rho: tuple[float, ...] = ()
    k: tuple[float, ...] = ()
    mode: str = "official"
    variant: tuple[str, ...] = ()
    preset: str | None = None
    finetuned: str | None = None
    k_rule: str = "evit"
    baselines: tuple[str, ...] = ()

    def __post_init__(self):
        if self.rho and self.k:
            raise ValueError("give --rho or --k, not both")
        if any(not (0 < r <= 1) for r in self.rho):  # also refuses nan
            raise ValueError(f"--rho values must be in (0, 1], got {list(self.rho)}")
        if any(not (math.isfinite(k) and k >= 2) for k in self.k):
            raise ValueError(f"--k values must be finite and >= 2 (K counts the CLS), got {list(self.k)}")
        if len(set(self.stages)) != len(self.stages) or any(s < 0 for s in self.stages):
            raise ValueError(f"--stages must be distinct block indices >= 0, got {list(self.stages)}")
        if self.preset and (self.rho or self.k):
            raise ValueError("--preset sets its own configurations; drop --rho/--k")

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> ATSEvalConfig:
        return ev.config_from_args(cls, ns)

    @property
    def is_default(self) -> bool:
        return not (self.preset or self.rho or self.k or self.variant) and self.stages == MULTI \
            and self.mode == "official"

    def runs(self, embedded: bool = False) -> tuple[Run, ...]:
        """The configurations to evaluate (``embedded``: the no-argument run on the embedded model)."""
        if self.preset:
            return PRESETS[self.preset][1]
        if self.is_default:
            return EMBEDDED_RUNS if embedded else DEFAULT_RUNS
        series = "ATS " + "+".join(self.variant) if self.variant else "ATS"
        return tuple(Run(self.stages, float(v), self.mode, self.variant, series)
                     for v in (self.k or self.rho or DEFAULT_RHO))


def parse_stages(text: str) -> tuple[int, ...]:
    """``3-11`` -> 3..11, ``3`` -> (3,), ``0,3,6`` -> (0, 3, 6)."""
    try:
        if "-" in text:
            a, b = (int(v) for v in text.split("-"))
            if b < a:
                raise ValueError
            return tuple(range(a, b + 1))
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot parse stages {text!r}; use e.g. 3-11, 3 or 0,3,6") from None


def shipped_dense(model: str) -> Path:
    """The shipped dense weights of embedded backbone ``model`` (``ValueError`` in one line when there are none)."""
    if model not in SHIPPED_DENSE:
        raise ValueError(f"no weights for {model}: give --checkpoint PATH (the authors' weights: "
                         "official or HuggingFace CvT, released PS-ViT)")
    path = WEIGHTS / SHIPPED_DENSE[model]
    if not path.is_file():
        raise ValueError(f"the weights of {model} are not shipped yet ({path.name}); give --checkpoint PATH")
    return path


def given_finetuned(opts: ATSEvalConfig) -> Path | None:
    """``--finetuned PATH``, checked to exist (None when not given)."""
    if not opts.finetuned:
        return None
    path = Path(opts.finetuned)
    if not path.is_file():
        raise FileNotFoundError(f"--finetuned {path} not found")
    return path


def figure_slug(label: str) -> str:
    """A row label as a file-name part: ``ATS fine-tuned @ 7-11 rho 1`` -> ``ATS_fine-tuned_at_7-11_rho_1``."""
    return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in label.replace(" @ ", " at "))
