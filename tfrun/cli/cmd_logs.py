"""``tfrun logs [RUN] [--rank N] [-f]``: a rank's log, followed until the run ends."""
from __future__ import annotations

import argparse
import sys
import time

from tfrun import rundir
from tfrun.cli.common import add_run
from tfrun.paths import RunPaths, is_run_dir
from tfrun.states import FINAL
from tfrun.targets.control import refresh, run_dirs_of


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``logs``'s arguments."""
    add_run(parser)
    parser.add_argument("--rank", type=int, default=0, help="which rank's log")
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing until the run ends")


def run(args: argparse.Namespace) -> int:
    """Print the log (and, with --follow, what it gains until the run ends)."""
    path = rundir.find_run(args.run)
    run_dir = run_dirs_of(path)[0] if not is_run_dir(path) else path
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
            return 0 if log.exists() else 1
        if refresh([run_dir])[0].get("state") in FINAL:
            args.follow = False  # one last read for what landed before the end
            continue
        time.sleep(1.0)
