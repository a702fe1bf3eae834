"""``tfrun tensorboard SWEEP``: TensorBoard over a sweep's runs, each named by the parameters
that differ between the points (``trainer.lr=0.01,trainer.batch_size=32``).

Names hold commas and may hold colons, which ``--logdir_spec name:path,...`` cannot carry,
so TensorBoard gets one ``--logdir``: a dir of symbolic links, one per run, named by its
parameters, to the run's ``tensorboard/`` dir (:mod:`tfrun.tracking.tensorboard`). A link
to a run that has no events yet is dangling until the run writes some: TensorBoard, which
rescans its logdir every few seconds, then shows it. Nothing here imports TensorBoard or
TensorFlow; the command runs it as a child process, and another one
(``python -m tfrun.tracking.board --every 5 RUN_DIR...``) that converts the runs'
``tfrun.log_metric`` values into TensorBoard scalars (:class:`Converter`).
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from tfrun.paths import RunPaths, SweepPaths, is_run_dir
from tfrun.tracking import compare, metrics, tensorboard

_MAX_NAME = 200  # bytes; file names may have 255


@dataclass(frozen=True)
class BoardRun:
    """One run as TensorBoard shows it."""

    name: str
    run_dir: Path

    @property
    def events(self) -> Path:
        """The run's TensorBoard dir (it may not exist yet)."""
        return RunPaths.of(self.run_dir).tensorboard

    @property
    def has_events(self) -> bool:
        """Whether the run wrote any event file yet."""
        return self.events.is_dir() and any(self.events.rglob("events.out.tfevents.*"))


def _safe(name: str) -> str:
    name = name.replace(os.sep, "_").replace("\0", "")
    return name if len(name.encode()) <= _MAX_NAME else name.encode()[:_MAX_NAME].decode(errors="ignore")


def board_runs(path: Path, run_dirs: Sequence[Path]) -> list[BoardRun]:
    """The runs of a sweep (or the one run) named by their differing parameters; a run whose
    parameters do not tell it apart (a single run, repeated points) keeps its dir's name."""
    params = compare.point_params(path, run_dirs) if len(run_dirs) > 1 else [{} for _ in run_dirs]
    varying = compare.varying_keys(params)
    names = [
        _safe(",".join(f"{k}={p.get(k, '-')}" for k in varying)) or _safe(d.name) for d, p in zip(run_dirs, params)
    ]
    repeated = {n for n in names if names.count(n) > 1}
    return [BoardRun(f"{n}#{d.name}" if n in repeated else n, d) for n, d in zip(names, run_dirs)]


def link_runs(runs: Sequence[BoardRun], into: Path) -> Path:
    """Fill ``into`` with one link per run (name -> the run's events dir); returns ``into``."""
    into.mkdir(parents=True, exist_ok=True)
    for run in runs:
        os.symlink(run.events.resolve(), into / run.name, target_is_directory=True)
    return into


def command(logdir: Path, host: str, port: int, python: str | None = None) -> list[str]:
    """The TensorBoard command over ``logdir``."""
    return [
        python or sys.executable,
        "-m",
        "tensorboard.main",
        "--logdir",
        str(logdir),
        "--host",
        host,
        "--port",
        str(port),
    ]


def describe(runs: Sequence[BoardRun], cmd: Sequence[str]) -> str:
    """What ``tfrun tensorboard`` says before serving: each run, then the command."""
    lines = [f"  {run.name}  {run.events}" + ("" if run.has_events else "  (no events yet)") for run in runs]
    return "\n".join([f"tfrun: TensorBoard over {len(runs)} run(s):", *lines, "  " + shlex.join(cmd)])


def is_run_or_sweep(path: Path) -> bool:
    """A run dir, or a dir whose sweep index or subdirs hold run dirs."""
    if is_run_dir(path):
        return True
    return path.is_dir() and (
        SweepPaths.of(path).index.is_file() or any(is_run_dir(p) for p in path.iterdir() if p.is_dir())
    )


def has_values(run_dir: Path) -> bool:
    """Whether the run logged any ``tfrun.log_metric`` value (to be converted for TensorBoard)."""
    try:
        with open(RunPaths.of(run_dir).metrics, "rb") as f:
            return any(b'"name": ' in line for line in f)
    except FileNotFoundError:
        return False


METRICS_EVENTS = "metrics"  # under a run's tensorboard/: its log_metric values, converted


class Converter:
    """Writes a run's ``log_metric`` values (from ``metrics.jsonl``) as TensorBoard scalars
    under ``<run dir>/tensorboard/metrics``, and on each call what was added since; the
    first call starts that dir afresh, so a value is never shown twice."""

    def __init__(self, run_dir: Path):
        import shutil

        self.run_dir, self.tail = run_dir, metrics.Tail(RunPaths.of(run_dir).metrics)
        self.folder = RunPaths.of(run_dir).tensorboard / METRICS_EVENTS
        shutil.rmtree(self.folder, ignore_errors=True)
        self.writer: Any = None  # made with the first values: a run without any shows no empty run
        self.write: Any = None

    def __call__(self) -> int:
        import tensorflow as tf

        values = [r for r in self.tail.new_records() if r.get("name") is not None]
        if not values:
            return 0
        if self.writer is None:
            self.writer = tf.summary.create_file_writer(str(self.folder))
            self.write = _batch_function(self.writer)
        self.write(
            tf.constant([str(r["name"]) for r in values]),
            tf.constant([float(r["value"]) for r in values], tf.float32),
            tf.constant([int(r.get("step") or 0) for r in values], tf.int64),
        )
        self.writer.flush()
        return len(values)


def _batch_function(writer: Any) -> Any:
    """One traced function that writes a whole batch of scalars (an op per value from Python
    costs ~50-700 us)."""
    import tensorflow as tf

    metadata = tensorboard.scalar_metadata()

    @tf.function(
        input_signature=[
            tf.TensorSpec([None], tf.string),
            tf.TensorSpec([None], tf.float32),
            tf.TensorSpec([None], tf.int64),
        ]
    )
    def write(tags: Any, values: Any, steps: Any) -> Any:
        with writer.as_default():
            for i in tf.range(tf.shape(values)[0]):
                tf.summary.write(tag=tags[i], tensor=values[i], step=steps[i], metadata=metadata)
        return tf.constant(0)

    return write


def convert(run_dirs: Sequence[Path], every_s: float | None = None) -> None:
    """``python -m tfrun.tracking.board [--every S] RUN_DIR...``: the runs' ``log_metric``
    values as TensorBoard scalars; with ``every_s``, again and again until its parent ends."""
    import time

    parent = os.getppid()
    converters = [Converter(d) for d in run_dirs]
    while True:
        for converter in converters:
            converter()
        if every_s is None or os.getppid() != parent:
            return
        time.sleep(every_s)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tfrun.tracking.board")
    parser.add_argument("--every", type=float, default=None, help="seconds between conversions (default: once)")
    parser.add_argument("run_dirs", nargs="+", type=Path)
    args = parser.parse_args()
    convert(args.run_dirs, args.every)
