"""``tfrun plot [RUN] [--metric M] [-o PNG]``: a PNG of a metric's learning curves, one line per run."""

from __future__ import annotations

import argparse
from pathlib import Path

from tfrun import rundir
from tfrun.cli.common import add_run
from tfrun.errors import TRACKING, require
from tfrun.runner.control import run_dirs_of


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``plot``'s arguments."""
    add_run(parser)
    parser.add_argument("--metric", default="loss", help="the metric to draw")
    parser.add_argument("-o", "--output", help="PNG path (default: plot-METRIC.png in the run or sweep dir)")


def run(args: argparse.Namespace) -> int:
    """Draw the curves; print where the PNG went."""
    require("tfrun plot", ["matplotlib"], TRACKING)
    from tfrun.tracking.compare import labels, plot

    path = rundir.find_run(args.run)
    dirs = run_dirs_of(path)
    out = Path(args.output) if args.output else path / f"plot-{args.metric}.png"
    print(plot(dirs, args.metric, out, labels(path, dirs)))
    return 0
