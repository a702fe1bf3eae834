"""``tfrun cancel [RUN]``: cancel a run, or every unfinished point of a sweep."""

from __future__ import annotations

import argparse

from tfrun import rundir
from tfrun.cli.common import add_run
from tfrun.cli.output import say
from tfrun.runner.control import cancel, refresh
from tfrun.states import RunState


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``cancel``'s arguments."""
    add_run(parser)


def run(args: argparse.Namespace) -> int:
    """Cancel it; say what was cancelled, or that nothing was left to cancel."""
    path = rundir.find_run(args.run)
    done = cancel(path)
    for what in done:
        print(f"tfrun: cancelled {what}")
    if not done and rundir.is_run_dir(path):
        say(f"run {path.name} is {refresh([path])[0].get('state', RunState.UNKNOWN)}: nothing to cancel")
    elif not done:
        say(f"every run of sweep {path.name} has ended: nothing to cancel")
    return 0
