"""One way every command reports bad input and failed work: ``prog: error: message`` on stderr, exit 2.

Library code raises (``ValueError`` and its subclasses such as :class:`~vitbench.data.DataError`, ``OSError`` such as
``FileNotFoundError`` / ``PermissionError``); :func:`run` turns those into one line, never a traceback.
``VITBENCH_TRACEBACK=1`` re-raises them instead, for debugging.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import torch

from .outputs import Interrupted

EXIT_ERROR = 2


def fail(prog: str, message: str) -> int:
    """Print ``prog: error: message`` to stderr; returns the exit code to hand back."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return EXIT_ERROR


def run(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int | None],
        argv: list[str] | None = None) -> int:
    """Parse ``argv`` with ``parser`` and run ``body(args)``; expected failures become one line and exit 2.

    An out-of-memory error names the batch size that failed (``args.batch_size`` when the command has one)."""
    args = parser.parse_args(argv)
    try:
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
        print(f"{parser.prog}: {stop}", file=sys.stderr, flush=True)
        return stop.code


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
