"""Machine-readable results (JSON, written atomically) and human-readable Markdown tables."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def plain(obj: Any) -> Any:
    """``obj`` as plain JSON values: str keys, lists, numpy/torch values as Python ones, inf/nan as None."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON via a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(plain(obj), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def _cell(value: Any, digits: int) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: Iterable[dict], columns: Sequence[str] | None = None, digits: int = 2,
                   headers: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table of ``rows`` (dicts), floats rounded to ``digits``."""
    rows = list(rows)
    columns = list(columns or (rows[0].keys() if rows else []))
    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(c), digits) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
