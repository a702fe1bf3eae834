"""Metrics of a run: ``metrics.jsonl`` in the run dir, one JSON object per line.

Keras ``fit`` epochs are recorded on the chief by the callback that
:mod:`tfrun.task.keras_hooks` adds (``{"epoch": 3, "loss": ..., "time": ...}``; the epochs
of the run, which go on across a script's ``fit`` calls, with ``"fit": n`` from the second
call on); any script can add ``tfrun.log_metric(name, value, step)`` records.

Records are appended, never rewritten: an epoch (or ``log_params``) is written and
flushed at once; ``log_metric`` values, which scripts may log at every step, are kept in
memory and written in batches by a background thread (at least every
:data:`FLUSH_INTERVAL_S`, and when the task ends or is asked to stop), so a call costs
about a microsecond whatever the file's size. Any thread may log: each keeps its values
apart until a batch merges them in the order of their times. Epochs also become
TensorBoard scalars here; ``log_metric`` values become TensorBoard scalars outside the
task, when ``tfrun tensorboard`` shows the run (:func:`tfrun.tracking.board.convert`): a
summary op per value would cost the script far more than the value itself. A kill can
leave a torn last line: readers skip it, and the next writer starts on a new line.
"""

from __future__ import annotations

import atexit
import bisect
import heapq
import json
import math
import os
import sys
import threading
import time
from array import array
from pathlib import Path
from typing import Any, Mapping

import orjson

from tfrun import rundir, variables
from tfrun.paths import RunPaths
from tfrun.tracking import tensorboard

FLUSH_INTERVAL_S = 1.0
MAX_PENDING = 250_000  # about (~7 MB); values kept in memory before the caller writes them itself


def metrics_path(run_dir: str | os.PathLike[str] | None = None) -> Path:
    """This task's metrics file (rank 0 writes ``metrics.jsonl``; other ranks their own)."""
    run_dir = run_dir or os.environ.get(variables.RUN_DIR) or "."
    return RunPaths.of(run_dir).metrics_of(int(os.environ.get(variables.RANK, "0")))


def parse(text: str | bytes) -> list[dict[str, Any]]:
    """The complete records of a metrics file's text (a torn or foreign line is skipped)."""
    data = text.encode() if isinstance(text, str) else text
    try:
        # The whole file as one JSON array, parsed by orjson: ~4x faster than json per line
        # (1,000,000 records in < 2 s).
        records = orjson.loads(b"[" + data.strip().replace(b"\n", b",") + b"]")
        if all(type(r) is dict for r in records):
            return list(records)
    except orjson.JSONDecodeError:  # a torn line, NaN or Infinity: read line by line below
        pass
    records = []
    for line in data.splitlines():
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            try:
                record = json.loads(line)  # NaN and Infinity, which orjson refuses
            except json.JSONDecodeError:
                continue  # a line torn by a kill mid-write: skip it, keep the rest
        if isinstance(record, dict):
            records.append(record)
    return records


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every complete record of a metrics file."""
    try:
        return parse(Path(path).read_bytes())
    except FileNotFoundError:
        return []


class Tail:
    """The records a metrics file gained since the last call: each read starts where the
    last one ended (from the start again if the file was replaced, as a restore does), and
    a line still being written waits for the next call."""

    def __init__(self, path: Path):
        self.path, self.offset, self.inode = path, 0, -1
        self.restarted = False  # the last call read the file from its start again

    def new_records(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                stat = os.fstat(f.fileno())
                self.restarted = stat.st_ino != self.inode or stat.st_size < self.offset
                if self.restarted:
                    self.offset, self.inode = 0, stat.st_ino
                f.seek(self.offset)
                data = f.read(stat.st_size - self.offset)
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        return parse(data[:end]) if end else []


def _line(record: Mapping[str, Any]) -> bytes:
    return (json.dumps(record, sort_keys=True, default=float) + "\n").encode()


class _Columns:
    """The ``log_metric`` values one thread logged that wait for a batch.

    Kept in four columns, not as a tuple each: a tuple is an object the garbage collector
    tracks, and 100,000 of them made its collections cost more than the calls themselves.
    Each thread has columns of its own: a value's four parts are four appends, and two
    threads appending to shared columns would interleave them (a value filed under the other
    thread's name). One writer per column needs no lock on the caller's path.
    """

    def __init__(self) -> None:
        self.names: list[str] = []
        self.values = array("d")
        self.steps: list[int | None] = []
        self.times = array("d")  # appended last: its length counts the complete values
        self.thread = threading.current_thread()
        # What log_metric calls, bound once per thread.
        self.appends = (self.names.append, self.values.append, self.steps.append, self.times.append, self.times)

    def take(self, cutoff: float | None) -> tuple[list[str], array, list[int | None], array]:
        """The complete values (logged at or before ``cutoff``), removed from the columns."""
        # A value being appended meanwhile is past `count` in each column and stays for the
        # next batch; so do values logged after the cutoff (times grow within a thread).
        count = len(self.times)
        if cutoff is not None:
            count = bisect.bisect_right(self.times, cutoff, 0, count)
        columns = (self.names, self.values, self.steps, self.times)
        names, values, steps, times = (column[:count] for column in columns)
        for column in columns:
            del column[:count]
        return names, values, steps, times  # type: ignore[return-value]


class _Appender:
    """Appends to one task's metrics file; ``log_metric`` values wait in memory for a batch."""

    def __init__(self) -> None:
        self.columns: list[_Columns] = []  # one per thread that logged a value
        self.local = threading.local()  # this thread's columns' appends
        self.lock = threading.Lock()  # one writer at a time: the caller or the flusher
        self.thread: threading.Thread | None = None

    def for_this_thread(self) -> _Columns:
        """The calling thread's columns, made on its first value."""
        columns = _Columns()
        self.local.appends = columns.appends
        self.columns.append(columns)
        return columns

    def started(self, pending: array) -> None:
        """After the first value: the flusher runs; at every MAX_PENDING values: a write now."""
        if self.thread is None:
            self._start()
        if len(pending) >= MAX_PENDING:
            self.flush(everything=True)  # a script logging faster than the flusher writes: keep memory bounded

    def record(self, record: Mapping[str, Any], path: Path | None = None) -> None:
        """One record written now (after the values logged before it), flushed to disk."""
        with self.lock:
            now = time.time()
            self._write(path or metrics_path(), self._take(now) + _line({"time": now, **record}), sync=True)

    def flush(self, everything: bool = False) -> None:
        """Write the values logged so far (``everything``: also any stamped later than now,
        which only a clock set back makes)."""
        with self.lock:
            text = self._take(None if everything else time.time())
            if text:
                self._write(metrics_path(), text, sync=False)

    def _take(self, cutoff: float | None) -> bytes:
        # The values up to the cutoff, in the order of their times across threads: a later
        # batch then holds no value older than an earlier batch did, which readers that go
        # on from the last time they saw (the MLflow sync) rely on.
        batches = [columns.take(cutoff) for columns in list(self.columns) if len(columns.times)]
        for columns in [c for c in self.columns if not c.thread.is_alive() and not len(c.times)]:
            self.columns.remove(columns)  # a thread that ended: its columns are empty for good
        if not batches:
            return b""
        rows = (
            zip(*batches[0]) if len(batches) == 1 else heapq.merge(*(zip(*b) for b in batches), key=lambda row: row[3])
        )
        dumps = orjson.dumps  # ~3x faster than formatting in Python
        return b"".join(
            dumps({"name": str(name), "step": step, "time": stamp, "value": value}) + b"\n"
            if math.isfinite(value)
            else _line({"name": name, "step": step, "time": stamp, "value": value})
            for name, value, step, stamp in rows
        )

    @staticmethod
    def _write(path: Path, text: bytes, sync: bool) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+b") as f:
            # A kill mid-write leaves a line without its newline: start on a fresh line.
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    text = b"\n" + text
            f.write(text)
            f.flush()
            if sync:
                os.fsync(f.fileno())

    def _start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="tfrun-metrics", daemon=True)
        self.thread.start()
        atexit.register(self.flush, everything=True)

    def _run(self) -> None:
        while True:
            time.sleep(FLUSH_INTERVAL_S)
            try:
                self.flush()
            except Exception as exc:  # a full or vanished disk must not end training
                print(
                    f"tfrun: warning: could not write metrics ({type(exc).__name__}: {exc})",
                    file=sys.stderr,
                    flush=True,
                )


_appender = _Appender()
_local = _appender.local
_now = time.time


def flush() -> None:
    """Write every value logged so far (tfrun calls this when a task ends or is stopped)."""
    _appender.flush(everything=True)


def append(record: Mapping[str, Any], path: Path | None = None) -> None:
    """Add one record to this task's metrics file, on disk when this returns."""
    _appender.record(record, path)


def log_metric(name: str, value: float, step: int | None = None) -> None:
    """Record one value of a metric (from any script, any framework, any thread); cheap enough per step."""
    value = float(value)  # first: a value that is no number fails here, before any column grows
    step = None if step is None else int(step)
    try:
        names, values, steps, times, pending = _local.appends
    except AttributeError:  # this thread's first value
        names, values, steps, times, pending = _appender.for_this_thread().appends
    names(name)
    values(value)
    steps(step)
    times(_now())
    if len(pending) % 4096 == 1:  # the first value, then now and then: one branch per call
        _appender.started(pending)


def log_params(params: Mapping[str, Any] | None = None, **more: Any) -> None:
    """Record parameters of the run beside its metrics."""
    append({"params": {**(params or {}), **more}})


def log_epoch(epoch: int, logs: Mapping[str, Any], fit: int = 0) -> None:
    """Record a finished Keras epoch with its logs: ``epoch`` is the run's (0-based), which goes
    on across a script's ``fit`` calls; ``fit`` numbers the call (recorded from the second on)."""
    values = {k: float(v) for k, v in logs.items()}
    append({"epoch": epoch, **({"fit": fit} if fit else {}), **values})
    tensorboard.scalars(values, epoch)


# The fields of an epoch record that are no metric: which epoch, when, and which fit call.
EPOCH_FIELDS = ("epoch", "time", "fit")


def epoch_values(record: Mapping[str, Any]) -> dict[str, float]:
    """The metrics of an epoch record (what every reader shows, plots, or sends on)."""
    return {
        k: float(v)
        for k, v in record.items()
        if k not in EPOCH_FIELDS and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _rewrite(path: Path, records: list[dict[str, Any]]) -> None:
    rundir.write_atomic(path, b"".join(_line(record) for record in records), durable=True)


def reconcile_epochs(completed: int, last_logs: Mapping[str, Any] | None, fit: int = 0) -> None:
    """After a restore from a backup of ``completed`` epochs of the run (the last in fit call
    ``fit``): exactly epochs 0..completed-1.

    Drops epoch records the backup does not cover and adds the last backed-up epoch if
    the task stopped between writing the backup and writing its metrics. Rewrites the file
    at the start of an attempt, before the script logs anything (and again only if a fit
    call's backup then fails to load, from that call's first epoch on).
    """
    flush()
    path = metrics_path()
    old = read_metrics(path)
    records = [r for r in old if r.get("epoch") is None or r["epoch"] < completed]
    if completed and last_logs is not None and not any(r.get("epoch") == completed - 1 for r in records):
        records.append({"time": time.time(), "epoch": completed - 1, **({"fit": fit} if fit else {}), **last_logs})
    if records != old:
        _rewrite(path, records)
