"""``tfrun tensorboard SWEEP``: TensorBoard over a sweep's runs, each named by the parameters
that differ between the points (``trainer.lr=0.01,trainer.batch_size=32``).

Names hold commas and may hold colons, which ``--logdir_spec name:path,...`` cannot carry,
so TensorBoard gets one ``--logdir``: a dir of symbolic links, one per run, named by its
parameters, to the run's ``tensorboard/`` dir (:mod:`tfrun.tracking.tensorboard`). A link
to a run that has no events yet is dangling until the run writes some: TensorBoard, which
rescans its logdir every few seconds, then shows it. Nothing here imports TensorBoard or
TensorFlow; the command runs it as a child process.
"""
from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tfrun import rundir
from tfrun.tracking import compare

EVENTS_DIR = "tensorboard"  # in a run dir, where its events are
_MAX_NAME = 200  # bytes; file names may have 255


@dataclass(frozen=True)
class BoardRun:
    """One run as TensorBoard shows it."""

    name: str
    run_dir: Path

    @property
    def events(self) -> Path:
        """The run's TensorBoard dir (it may not exist yet)."""
        return self.run_dir / EVENTS_DIR

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
    names = [_safe(",".join(f"{k}={p.get(k, '-')}" for k in varying)) or _safe(d.name)
             for d, p in zip(run_dirs, params)]
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
    return [python or sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir),
            "--host", host, "--port", str(port)]


def describe(runs: Sequence[BoardRun], cmd: Sequence[str]) -> str:
    """What ``tfrun tensorboard`` says before serving: each run, then the command."""
    lines = [f"  {run.name}  {run.events}" + ("" if run.has_events else "  (no events yet)") for run in runs]
    return "\n".join([f"tfrun: TensorBoard over {len(runs)} run(s):", *lines, "  " + shlex.join(cmd)])


def available() -> bool:
    """Whether the ``tensorboard`` package is installed (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def is_run_or_sweep(path: Path) -> bool:
    """A run dir, or a dir whose sweep index or subdirs hold run dirs."""
    if rundir.is_run_dir(path):
        return True
    return path.is_dir() and ((path / rundir.SWEEP_FILE).is_file()
                              or any(rundir.is_run_dir(p) for p in path.iterdir() if p.is_dir()))
