"""One way every command reads its flags and reports bad input: ``prog: error: message`` on stderr, exit 2.

:func:`run` is every command's ``main``: it reads ``-c/--config FILE.yaml`` (:mod:`vitbench.configfile`), checks every
number the flags hold (:class:`Number`), shows every flag's default in ``--help`` (:class:`HelpFormatter`) and turns
the library's expected failures into one line, never a traceback. Library code raises (``ValueError`` and its
subclasses such as ``vitbench.data.DataError``, ``OSError`` such as ``FileNotFoundError`` / ``PermissionError``).
``VITBENCH_TRACEBACK=1`` re-raises them instead, for debugging.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import types
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import torch
from tqdm import tqdm

from . import configfile
from .flagtypes import (COUNT, FINITE, FRACTION, IMG_SIZE, KEEP_RATE, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, SEED,
                        UNIT, Number, finite_numbers, range_problems)
from .outputs import Interrupted

EXIT_ERROR = 2


def fail(prog: str, message: str) -> int:
    """Print ``prog: error: message`` to stderr; returns the exit code to hand back."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return EXIT_ERROR


def warn(prog: str, message: str) -> None:
    """Print ``prog: warning: message`` to stderr (the run goes on)."""
    print(f"{prog}: warning: {message}", file=sys.stderr, flush=True)


def run(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int | None],
        argv: list[str] | None = None, check: Callable[[argparse.Namespace], None] | None = None) -> int:
    """Parse ``argv`` with ``parser`` (:func:`parse`) and run ``body(args)``; expected failures become one line and
    exit 2. ``check(args)`` runs first, for the rules that need several flags (e.g. :func:`check_img_size`).

    Bad flags return 2 (``--help`` 0) instead of raising ``SystemExit``, so ``main(argv)`` always returns the exit
    code. An out-of-memory error names the batch size that failed (``args.batch_size`` when the command has one)."""
    try:
        args = parse(parser, argv)
    except SystemExit as e:  # argparse's own exits: --help, --version, a bad flag (its one line already printed)
        return e.code if isinstance(e.code, int) else EXIT_ERROR if e.code else 0
    try:
        if check is not None:
            check(args)
        return body(args) or 0
    except torch.OutOfMemoryError as e:
        if os.environ.get("VITBENCH_TRACEBACK"):
            raise
        batch = getattr(args, "batch_size", None)
        where = f"at --batch-size {batch}" if batch else "in this run"
        first = str(e).strip().splitlines()[0] if str(e).strip() else "out of memory"
        return fail(parser.prog, f"out of memory {where} ({first}); lower --batch-size")
    except (ValueError, OSError) as e:
        if os.environ.get("VITBENCH_TRACEBACK"):
            raise
        return fail(parser.prog, str(e) or type(e).__name__)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM raised as Interrupted (vitbench.evaluation): one line
        if os.environ.get("VITBENCH_TRACEBACK"):
            raise
        stop = e if isinstance(e, Interrupted) else Interrupted("SIGINT")
        # a line left unfinished by an open bar (one the signal stopped in its constructor has drawn nothing)
        open_bar = any(not getattr(bar, "disable", True) for bar in list(getattr(tqdm, "_instances", ())))
        print(f"{chr(10) * open_bar}{parser.prog}: {stop}", file=sys.stderr, flush=True)
        return stop.code


def parse(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` the one way of every command: the shared help format, every int/float flag checked
    finite (:func:`finite_numbers`), and ``-c/--config FILE.yaml`` (keys: flag names as in ``config.json``, e.g.
    ``batch_size``) read first, so flags on the command line override the file. Bad input: ``prog: error:``, exit 2."""
    prepare(parser)
    argv = sys.argv[1:] if argv is None else list(argv)
    from_file, given = {}, argparse.Namespace(config=None)
    if not has_subcommands(parser):
        pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        pre.add_argument("-c", "--config", default=None)
        given, _ = pre.parse_known_args(argv)
        if given.config:
            try:
                from_file = configfile.read(given.config, parser)
            except (ValueError, OSError) as e:
                parser.error(str(e))
            parser.set_defaults(**from_file)
    args = parser.parse_args(argv)
    if getattr(args, "config", None) != given.config:  # an abbreviation (--conf) the first pass did not read
        parser.error("spell the configuration flag out: -c FILE.yaml or --config FILE.yaml")
    typed = {a.split("=")[0] for a in argv if a.startswith("-")}
    for flag, problem in range_problems(parser, args):
        action = parser._option_string_actions[flag]
        from_here = action.dest in from_file and not typed & set(action.option_strings)
        parser.error(f"{flag} {problem}{f' (from {given.config})' if from_here else ''}")
    return args


def prepare(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give ``parser`` (and its sub-commands) the shared help format, finite-number checks and, without
    sub-commands, the ``-c/--config`` flag. Idempotent."""
    parser.formatter_class = HelpFormatter
    parser.error = types.MethodType(one_line_error, parser)
    finite_numbers(parser)
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for sub in subs:
        for child in sub.choices.values():
            prepare(child)
    if not subs and "--config" not in parser._option_string_actions:
        parser.add_argument("-c", "--config", default=None, metavar="FILE.yaml",
                            help="read flag values from this YAML file (keys: the flag names with underscores, as in "
                            "config.json, e.g. batch_size: 32); flags given on the command line override it; "
                            "the recipes of the papers are in the repository's configs/ folder")
    return parser


def one_line_error(parser: argparse.ArgumentParser, message: str):
    """argparse's ``error`` as every command reports bad input: ``prog: error: message``, one line (no usage block;
    ``--help`` shows it), exit 2."""
    parser.exit(EXIT_ERROR, f"{parser.prog}: error: {message}\n")


def has_subcommands(parser: argparse.ArgumentParser) -> bool:
    return any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)


__all__ = ["COUNT", "FINITE", "FRACTION", "IMG_SIZE", "KEEP_RATE", "NON_NEGATIVE", "NON_NEGATIVE_INT", "POSITIVE",
           "SEED", "UNIT", "HelpFormatter", "Number", "check_eval_input", "check_img_size", "check_train_input",
           "check_writable", "check_writable_file", "fail", "flag_defaults", "has_shipped_weights", "parse",
           "renamed", "run", "warn"]


# --------------------------------------------------------------------------------------------------------------
# Input sizes


def check_img_size(model: str, img_size: int | None, fixed_weights: bool = False) -> None:
    """Refuse an ``--img-size`` ``model`` cannot take: not a multiple of its patch size (of its ``input_multiple``
    where the model needs more, e.g. LF-ViT's half-size coarse pass) or, for weights shipped at one size
    (``fixed_weights``), any other size. ``ValueError``; nothing for a name or model without a patch grid."""
    if img_size is None:
        return
    geometry = input_geometry(model)
    if geometry is None:
        return
    native, multiple, patch = geometry
    if img_size % multiple:
        why = "the patch size" if multiple == patch else f"{model}'s input step (twice the patch size {patch})"
        raise ValueError(f"--img-size {img_size} is not a multiple of {why} {multiple}")
    if fixed_weights and img_size != native:
        raise ValueError(f"--img-size {img_size}: the shipped weights of {model} are for {native} px; leave "
                         f"--img-size out or give --checkpoint PATH")


def has_shipped_weights(model: str) -> bool:
    """Whether ``model``'s pretrained weights are a file installed with its package (the embedded models), which
    hold a positional table for one input size only."""
    import timm  # deferred: the parse-only paths of the commands need no model library

    cfg = timm.models.get_pretrained_cfg(model)
    return bool(cfg is not None and cfg.file and Path(cfg.file).is_file())


def check_train_input(args: argparse.Namespace) -> None:
    """The ``check`` of every ``*-train``: :func:`check_img_size` for ``--model`` (shipped weights when
    ``--pretrained`` loads an embedded model's file and no ``--checkpoint`` replaces them)."""
    model, size = getattr(args, "model", None), getattr(args, "img_size", None)
    if model is None or size is None:
        return
    fixed = bool(getattr(args, "pretrained", False)) and not getattr(args, "checkpoint", None)
    check_img_size(model, size, fixed_weights=fixed and has_shipped_weights(model))


def check_eval_input(args: argparse.Namespace, model: str | None = None, shipped: bool | None = None) -> None:
    """The ``check`` of every ``*-eval``: :func:`check_img_size` for ``model`` (default ``--model``), whose shipped
    weights (``shipped``, default :func:`has_shipped_weights`) are used without ``--checkpoint``, ``--num-classes``
    and ``--flops-only``."""
    model = model or args.model
    if args.img_size is None:
        return
    uses_shipped = not (args.checkpoint or args.flops_only or args.num_classes is not None)
    if shipped is None:
        shipped = has_shipped_weights(model)
    check_img_size(model, args.img_size, fixed_weights=uses_shipped and shipped)


def input_geometry(model: str) -> tuple[int, int, int] | None:
    """``(native size, the multiple every input size must be, patch size)`` of a registered model, built on the meta
    device (no memory, no weights); None when the name is unknown or the model has no square patch grid."""
    import timm  # deferred: the parse-only paths of the commands need no model library

    from .models import is_model  # deferred with timm (vitbench.models imports it)

    if not is_model(model):
        return None
    try:
        with torch.device("meta"):
            net = timm.create_model(model)
    except (RuntimeError, TypeError, ValueError, NotImplementedError):  # a model that computes at build time
        try:
            net = timm.create_model(model)
        except (RuntimeError, TypeError, ValueError, NotImplementedError):
            return None
    embed = getattr(net, "patch_embed", None)
    patch, size = getattr(embed, "patch_size", None), getattr(embed, "img_size", None) or getattr(net, "img_size", None)
    if patch is None or size is None:
        return None
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    size = size[0] if isinstance(size, (tuple, list)) else size
    return int(size), int(getattr(net, "input_multiple", patch)), int(patch)


# --------------------------------------------------------------------------------------------------------------
# Renamed flags


def renamed(group, old: str, new: str, **kwargs) -> argparse.Action:
    """Accept ``old`` (a flag renamed to ``new``, which must already exist in the parser) for one release: it sets
    ``new``'s value and prints ``prog: warning: old is deprecated; use new``. Hidden from ``--help``."""
    target = group._option_string_actions[new]  # groups share their parser's table of flags

    class Deprecated(argparse.Action):
        def __call__(self, p, namespace, values, option_string=None):
            warn(p.prog, f"{old} is deprecated and will be removed in the next release; use {new}")
            if target.nargs == 0:
                values = target.const
            setattr(namespace, self.dest, values)

    spec = dict(dest=target.dest, type=target.type, choices=target.choices, metavar=target.metavar)
    if target.nargs == 0:
        spec = dict(dest=target.dest, nargs=0)
    elif target.nargs is not None:
        spec["nargs"] = target.nargs
    spec.update(kwargs)
    return group.add_argument(old, action=Deprecated, help=argparse.SUPPRESS, **spec)


# --------------------------------------------------------------------------------------------------------------
# Help


MARKUP = [(re.compile(r":[a-z]+:`~?([^`]+)`"), r"\1"), (re.compile(r"``([^`]+)``"), r"\1")]


def plain_text(text: str) -> str:
    """Help text without reStructuredText markup: ``x`` -> x, :mod:`a.b` -> a.b, :class:`~a.B` -> a.B."""
    for pattern, repl in MARKUP:
        text = pattern.sub(repl, text)
    return text


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The commands' ``--help``: descriptions as written (without markup), each flag's default shown (unless its help
    already says its default)."""

    def _format_text(self, text):
        return super()._format_text(plain_text(text)) if text else text

    def _get_help_string(self, action):
        text = plain_text(action.help or "")
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        default = action.default
        if isinstance(default, (list, tuple)):
            shown = " ".join(map(str, default)) if default else "none"
        elif default is None or default is False and action.nargs == 0:
            shown = "off" if action.nargs == 0 else "none"
        elif default is True and action.nargs == 0:
            shown = "on"
        else:
            shown = str(default).replace("%", "%%")
        return f"{text} (default: {shown})" if text else f"(default: {shown})"


# --------------------------------------------------------------------------------------------------------------
# Defaults and outputs


def flag_defaults(config_cls, overrides: dict) -> dict:
    """The defaults of a config dataclass's fields with a package's ``overrides`` applied (``KeyError`` naming any
    override that is no field): what ``add_train_args`` / ``add_eval_args`` give their flags."""
    defaults = {f.name: f.default for f in fields(config_cls)}
    unknown = set(overrides) - set(defaults)
    if unknown:
        raise KeyError(f"unknown {config_cls.__name__} fields: {sorted(unknown)}")
    return {**defaults, **overrides}


def check_writable(path: str | Path, what: str = "output folder") -> Path:
    """Create the folder ``path`` if needed and prove it accepts a file; raises ``PermissionError`` naming it.

    Commands call this before any expensive work, so a read-only or full disk fails in the first second."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_check_"):
            pass
    except OSError as e:
        raise PermissionError(f"{what} {folder} is not writable ({e.strerror or e})") from None
    return folder


def check_writable_file(path: str | Path, what: str = "--json") -> Path:
    """Like :func:`check_writable` for a file's folder; an existing directory at ``path`` is refused too."""
    file = Path(path)
    if file.is_dir():
        raise IsADirectoryError(f"{what} {file} is a directory; give a file path")
    check_writable(file.parent if str(file.parent) else ".", f"{what} folder")
    return file
