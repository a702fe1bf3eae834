"""``tfrun watch [RUN|SWEEP]``: a live table of runs while they train (:mod:`tfrun.cli.live`),
refreshed until every run has ended. Anywhere but a terminal (a pipe, a log file, CI) it
prints one plain line per change of a run's state or epoch, without escape codes."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tfrun import rundir
from tfrun.cli.common import add_run
from tfrun.cli.live import render
from tfrun.cli.output import EXIT_INTERRUPTED
from tfrun.runner import control
from tfrun.targets import progress
from tfrun.targets.progress import Snapshot


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``watch``'s arguments."""
    add_run(parser)
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")


def _live(path: Path, interval: float) -> Snapshot:
    from rich.console import Console
    from rich.live import Live

    console = Console()
    snap = control.snapshot(path)
    with Live(render(snap, console.height), console=console, auto_refresh=False, transient=False) as live:
        while not snap.ended:
            time.sleep(interval)
            snap = control.snapshot(path)
            live.update(render(snap, console.height), refresh=True)
    return snap


def _plain(path: Path, interval: float) -> Snapshot:
    before = None
    while True:
        snap = control.snapshot(path)
        for line in progress.changes(before, snap):
            print(line, flush=True)
        before = snap
        if snap.ended:
            return snap
        time.sleep(interval)


def run(args: argparse.Namespace) -> int:
    """Refresh the view every ``--interval`` s until every run has ended; 0 if all completed."""
    path = rundir.find_run(args.run)
    live = sys.stdout.isatty()
    try:
        snap = _live(path, args.interval) if live else _plain(path, args.interval)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    if live:  # under the table; plain lines already end with the last state (or the sweep's counts)
        print(f"tfrun: {progress.summary(snap)}", file=sys.stderr, flush=True)
    return snap.exit_code
