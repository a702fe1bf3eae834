"""``tfrun cancel [RUN]``: cancel a run, or every unfinished point of a sweep."""
from __future__ import annotations

import argparse

from tfrun import rundir
from tfrun.cli.common import add_run
from tfrun.targets.control import cancel


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``cancel``'s arguments."""
    add_run(parser)


def run(args: argparse.Namespace) -> int:
    """Cancel it; say what was cancelled."""
    for what in cancel(rundir.find_run(args.run)):
        print(f"tfrun: cancelled {what}")
    return 0
