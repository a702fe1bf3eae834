"""``tfrun logs [RUN] [--rank N] [-f]``: a rank's log, followed until the run ends."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tfrun import rundir
from tfrun.cli.common import add_run
from tfrun.cli.output import say
from tfrun.errors import TfrunError, UsageError
from tfrun.paths import RunPaths
from tfrun.runner.control import refresh, run_dirs_of
from tfrun.states import FINAL, RunState


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``logs``'s arguments."""
    add_run(
        parser,
        help="run dir, run id, unique part of an id (default: the latest run); of a sweep, "
        "its first point (SWEEP/N for another)",
    )
    parser.add_argument("--rank", type=int, default=0, help="which rank's log")
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing until the run ends")


def _the_run(path: Path) -> Path:
    """The run dir whose log is shown: the run itself, or a sweep's first point (said)."""
    if rundir.is_run_dir(path):
        return path
    points = run_dirs_of(path)
    say(
        f"{path} is a sweep of {len(points)} run(s): the log of its first point, {points[0]} "
        f"(tfrun logs {points[0].parent}/N for point N)"
    )
    return points[0]


def _check_rank(run_dir: Path, rank: int) -> None:
    tasks = len((rundir.read_json(RunPaths.of(run_dir).plan) or {}).get("tasks") or [])
    if tasks and not 0 <= rank < tasks:
        ranks = "1 task (rank 0)" if tasks == 1 else f"{tasks} tasks (ranks 0 to {tasks - 1})"
        raise UsageError(f"--rank {rank}: run {run_dir.name} has {ranks}")


def run(args: argparse.Namespace) -> int:
    """Print the log (and, with --follow, what it gains until the run ends)."""
    run_dir = _the_run(rundir.find_run(args.run))
    _check_rank(run_dir, args.rank)
    log = RunPaths.of(run_dir).rank_log(args.rank)
    offset = 0
    while True:
        if log.exists():
            with open(log, "rb") as f:
                f.seek(offset)
                data = f.read()
            offset += len(data)
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        if not args.follow:
            break
        if refresh([run_dir])[0].get("state") in FINAL:
            args.follow = False  # one last read for what landed before the end
            continue
        time.sleep(1.0)
    if not log.exists():
        state = refresh([run_dir])[0].get("state", RunState.UNKNOWN)
        raise TfrunError(f"rank {args.rank} of run {run_dir.name} has no log yet ({log}); the run is {state}")
    return 0
