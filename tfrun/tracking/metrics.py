"""Metrics of a run: ``metrics.jsonl`` in the run dir, one JSON object per line.

Keras ``fit`` epochs are recorded on the chief by the callback that
:mod:`tfrun.task.keras_hooks` adds (``{"epoch": 3, "loss": ..., "time": ...}``); any script
can add ``tfrun.log_metric(name, value, step)`` records. The file is rewritten through a
temp file and a rename, so a kill at any moment leaves the previous complete file.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

from tfrun.tracking import tensorboard

METRICS_FILE = "metrics.jsonl"


def metrics_path(run_dir: str | os.PathLike[str] | None = None) -> Path:
    """This task's metrics file (rank 0 writes ``metrics.jsonl``; other ranks their own)."""
    run_dir = run_dir or os.environ.get("TFRUN_RUN_DIR") or "."
    rank = int(os.environ.get("TFRUN_RANK", "0"))
    return Path(run_dir) / (METRICS_FILE if rank == 0 else f"metrics-rank{rank}.jsonl")


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every complete record of a metrics file."""
    records = []
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # written by something else than tfrun mid-crash: skip, keep the rest
    return records


def _rewrite(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        for record in records:
            f.write(json.dumps(record, sort_keys=True, default=float) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def append(record: Mapping[str, Any], path: Path | None = None) -> None:
    """Add one record to this task's metrics file."""
    path = path or metrics_path()
    _rewrite(path, [*read_metrics(path), {"time": time.time(), **record}])


def log_metric(name: str, value: float, step: int | None = None) -> None:
    """Record one value of a metric (from any script, any framework)."""
    append({"name": name, "value": float(value), "step": step})
    tensorboard.scalars({name: float(value)}, step or 0)


def log_params(params: Mapping[str, Any] | None = None, **more: Any) -> None:
    """Record parameters of the run beside its metrics."""
    append({"params": {**(params or {}), **more}})


def log_epoch(epoch: int, logs: Mapping[str, Any]) -> None:
    """Record a finished Keras epoch (0-based) with its logs."""
    values = {k: float(v) for k, v in logs.items()}
    append({"epoch": epoch, **values})
    tensorboard.scalars(values, epoch)


def reconcile_epochs(completed: int, last_logs: Mapping[str, Any] | None) -> None:
    """After a restore from a backup of ``completed`` epochs: exactly epochs 0..completed-1.

    Drops epoch records the backup does not cover and adds the last backed-up epoch if
    the task stopped between writing the backup and writing its metrics.
    """
    path = metrics_path()
    records = [r for r in read_metrics(path) if r.get("epoch") is None or r["epoch"] < completed]
    if completed and last_logs is not None and not any(r.get("epoch") == completed - 1 for r in records):
        records.append({"time": time.time(), "epoch": completed - 1, **last_logs})
    _rewrite(path, records)
