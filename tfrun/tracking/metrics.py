"""Metrics of a run: ``metrics.jsonl`` in the run dir, one JSON object per line.

Keras ``fit`` epochs are recorded on the chief by the callback that
:mod:`tfrun.task.keras_hooks` adds (``{"epoch": 3, "loss": ..., "time": ...}``); any script
can add ``tfrun.log_metric(name, value, step)`` records.

Records are appended, never rewritten: an epoch (or ``log_params``) is written and
flushed at once; ``log_metric`` values, which scripts may log at every step, are kept in
memory and written in batches by a background thread (at least every
:data:`FLUSH_INTERVAL_S`, and when the task ends or is asked to stop), so a call costs
about a microsecond whatever the file's size. A kill can leave a torn last line: readers
skip it, and the next writer starts on a new line.
"""
from __future__ import annotations

import atexit
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from tfrun.tracking import tensorboard

METRICS_FILE = "metrics.jsonl"
FLUSH_INTERVAL_S = 1.0
MAX_PENDING = 50_000  # values kept in memory before the caller writes them itself


def metrics_path(run_dir: str | os.PathLike[str] | None = None) -> Path:
    """This task's metrics file (rank 0 writes ``metrics.jsonl``; other ranks their own)."""
    run_dir = run_dir or os.environ.get("TFRUN_RUN_DIR") or "."
    rank = int(os.environ.get("TFRUN_RANK", "0"))
    return Path(run_dir) / (METRICS_FILE if rank == 0 else f"metrics-rank{rank}.jsonl")


def parse(text: str) -> list[dict[str, Any]]:
    """The complete records of a metrics file's text (a torn or foreign line is skipped)."""
    lines = [line for line in text.splitlines() if line]
    try:
        # One parse of the whole file is ~5x faster than a parse per line (1M records < 2 s).
        records = json.loads("[" + ",".join(lines) + "]")
        if all(isinstance(r, dict) for r in records):
            return records
    except json.JSONDecodeError:
        pass
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill mid-write: skip it, keep the rest
        if isinstance(record, dict):
            records.append(record)
    return records


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every complete record of a metrics file."""
    try:
        return parse(Path(path).read_text())
    except FileNotFoundError:
        return []


def _line(record: Mapping[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, default=float) + "\n"


class _Appender:
    """Appends to one task's metrics file; ``log_metric`` values wait in memory for a batch."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, float, int | None, float]] = []
        self.lock = threading.Lock()  # one writer at a time: the caller or the flusher
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None
        self.names: dict[str, str] = {}  # name -> its JSON string, encoded once

    def value(self, name: str, value: float, step: int | None) -> None:
        self.pending.append((name, value, step, time.time()))
        if self.thread is None:
            self._start()
        if len(self.pending) >= MAX_PENDING:
            self.flush()  # a script logging faster than the flusher writes: keep memory bounded

    def record(self, record: Mapping[str, Any], path: Path | None = None) -> None:
        """One record written now (after the values logged before it), flushed to disk."""
        with self.lock:
            self._write(path or metrics_path(), self._take() + _line({"time": time.time(), **record}), sync=True)

    def flush(self) -> None:
        with self.lock:
            text = self._take()
            if text:
                self._write(metrics_path(), text, sync=False)

    def _take(self) -> str:
        if not self.pending:
            return ""
        batch, self.pending = self.pending, []  # one step under the GIL: no value is lost
        tensorboard.scalar_batch(batch)
        names = self.names
        parts = []
        for name, value, step, stamp in batch:
            encoded = names.get(name) or names.setdefault(name, json.dumps(name))
            parts.append('{"name": %s, "step": %s, "time": %r, "value": %r}\n'
                         % (encoded, "null" if step is None else int(step), stamp, value))
        return "".join(parts)

    @staticmethod
    def _write(path: Path, text: str, sync: bool) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+b") as f:
            # A kill mid-write leaves a line without its newline: start on a fresh line.
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    text = "\n" + text
            f.write(text.encode())
            f.flush()
            if sync:
                os.fsync(f.fileno())

    def _start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="tfrun-metrics", daemon=True)
        self.thread.start()
        atexit.register(self.flush)

    def _run(self) -> None:
        while True:
            self.wake.wait(FLUSH_INTERVAL_S)
            self.wake.clear()
            try:
                self.flush()
            except OSError:
                pass  # a full or vanished disk must not end training; the next flush retries


_appender = _Appender()


def flush() -> None:
    """Write every value logged so far (tfrun calls this when a task ends or is stopped)."""
    _appender.flush()


def append(record: Mapping[str, Any], path: Path | None = None) -> None:
    """Add one record to this task's metrics file, on disk when this returns."""
    _appender.record(record, path)


def log_metric(name: str, value: float, step: int | None = None) -> None:
    """Record one value of a metric (from any script, any framework); cheap enough per step."""
    _appender.value(name, float(value), step)


def log_params(params: Mapping[str, Any] | None = None, **more: Any) -> None:
    """Record parameters of the run beside its metrics."""
    append({"params": {**(params or {}), **more}})


def log_epoch(epoch: int, logs: Mapping[str, Any]) -> None:
    """Record a finished Keras epoch (0-based) with its logs."""
    values = {k: float(v) for k, v in logs.items()}
    append({"epoch": epoch, **values})
    tensorboard.scalars(values, epoch)


def _rewrite(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write("".join(_line(record) for record in records))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def reconcile_epochs(completed: int, last_logs: Mapping[str, Any] | None) -> None:
    """After a restore from a backup of ``completed`` epochs: exactly epochs 0..completed-1.

    Drops epoch records the backup does not cover and adds the last backed-up epoch if
    the task stopped between writing the backup and writing its metrics. The one rewrite
    of the file, at the start of an attempt, before the script logs anything.
    """
    flush()
    path = metrics_path()
    old = read_metrics(path)
    records = [r for r in old if r.get("epoch") is None or r["epoch"] < completed]
    if completed and last_logs is not None and not any(r.get("epoch") == completed - 1 for r in records):
        records.append({"time": time.time(), "epoch": completed - 1, **last_logs})
    if records != old:
        _rewrite(path, records)
