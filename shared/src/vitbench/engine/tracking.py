"""``--report-to``: the records of ``log.jsonl`` sent to experiment trackers through Accelerate's trackers.

``log_with`` / ``init_trackers`` / ``log`` as Accelerate defines them, on the main process only. TensorBoard writes
into ``OUTPUT_DIR/tracking/<project>``, which a resumed run appends to (a new event file in the same folder);
W&B resumes the same run by an id kept in ``config.json`` (``tracker_run``); MLflow starts a run of the same name,
in ``OUTPUT_DIR/tracking/mlflow.db`` unless ``MLFLOW_TRACKING_URI`` names a server or store.
Off by default (``none``); ``all`` is every tracker whose package is installed. The run's process group is left up,
so the trackers are finished one by one instead of ``end_training`` (see :func:`vitbench.engine.train`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import uuid
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

REPORT_TO = ("none", "tensorboard", "wandb", "mlflow", "all")
PROJECT = "vitbench"
_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def trackers(report_to: str) -> list[str]:
    """The Accelerate tracker names for ``--report-to`` (``ValueError`` naming a tracker whose package is
    missing)."""
    if report_to == "none":
        return []
    if report_to == "all":
        found = [name for name, package in _PACKAGE.items() if importlib.util.find_spec(package)]
        if not found:
            raise ValueError("--report-to all: none of tensorboard, wandb, mlflow is installed "
                             "(pip install tensorboard)")
        return found
    if report_to not in _PACKAGE:
        raise ValueError(f"--report-to must be one of {', '.join(REPORT_TO)}, got {report_to!r}")
    if not importlib.util.find_spec(_PACKAGE[report_to]):
        raise ValueError(f"--report-to {report_to}: the {_PACKAGE[report_to]} package is not installed "
                         f"(pip install {_PACKAGE[report_to]})")
    return [report_to]


def tracker_kwargs(cfg) -> dict:
    """``Accelerator`` keyword arguments for ``cfg.report_to``."""
    names = trackers(cfg.report_to)
    if not names:
        return {}
    out = Path(cfg.output_dir)
    return {"log_with": names, "project_config": ProjectConfiguration(project_dir=str(out),
                                                                      logging_dir=str(out / "tracking"))}


def _scalars(record: dict, prefix: str = "") -> dict:
    """The configuration as flat scalars (what TensorBoard's hparams accept): nested dicts dotted, lists as JSON."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_scalars(value, f"{prefix}{key}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[f"{prefix}{key}"] = "None" if value is None else value
        else:
            out[f"{prefix}{key}"] = json.dumps(value)
    return out


def start_trackers(accelerator: Accelerator, record: dict, saved: dict) -> None:
    """Start the trackers of a run (main process; no-op without ``--report-to``). ``record['tracker_run']`` is the
    run's tracker id, kept from ``saved`` on a resume so W&B appends to the same run."""
    if not accelerator.log_with:
        return
    record["tracker_run"] = (saved or {}).get("tracker_run") or uuid.uuid4().hex[:12]
    run_id = record["tracker_run"]
    init = {"wandb": {"id": run_id, "resume": "allow", "dir": str(accelerator.project_dir)},
            "mlflow": {"run_name": run_id}}
    names = [str(t) for t in accelerator.log_with]  # LoggerType members
    if "mlflow" in names and not os.environ.get("MLFLOW_TRACKING_URI"):
        import mlflow  # its own default is a database in the working directory

        store = Path(accelerator.logging_dir).resolve()
        store.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    try:
        accelerator.init_trackers(PROJECT, config=_scalars(record), init_kwargs=init)
    except Exception as e:  # a tracker's own failure (server, credentials, store): one line, not its traceback
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ValueError(f"--report-to {', '.join(names)}: the tracker did not start "
                         f"({type(e).__name__}: {first})") from None


def log_record(accelerator: Accelerator, entry: dict) -> None:
    """Send one ``log.jsonl`` epoch record (its numbers) to the trackers, at its update as the step."""
    if not accelerator.log_with:
        return
    values = {k: v for k, v in entry.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    accelerator.log(values, step=entry.get("updates"))


def end_trackers(accelerator: Accelerator) -> None:
    """Finish every started tracker (flushes TensorBoard's event files), leaving the process group up."""
    for tracker in getattr(accelerator, "trackers", []):
        with contextlib.suppress(Exception):  # a tracker that fails to finish must not hide the run's outcome
            tracker.finish()
    accelerator.trackers = []
