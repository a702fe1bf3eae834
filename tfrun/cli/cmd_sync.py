"""``tfrun sync [RUN]``: send MLflow what a run (or each point of a sweep) recorded and it lacks."""

from __future__ import annotations

import argparse
import sys

from tfrun import rundir
from tfrun.cli.common import add_run
from tfrun.errors import TRACKING, require
from tfrun.runner.control import refresh, run_dirs_of


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``sync``'s arguments."""
    add_run(parser)


def run(args: argparse.Namespace) -> int:
    """Sync every run; 1 if MLflow could not be reached for one of them (nothing is lost)."""
    require("tfrun sync", ["mlflow"], TRACKING)
    from tfrun.tracking import mlflow_sync

    dirs = run_dirs_of(rundir.find_run(args.run))
    code = 0
    for run_dir, status in zip(dirs, refresh(dirs)):
        try:
            known = mlflow_sync.sync(run_dir, status.get("state"))
        except ValueError as exc:
            print(f"tfrun: error: {exc}", file=sys.stderr)
            return 2
        except Exception as exc:  # MLflow's and its store's own errors: reported, the next run is tried
            print(
                f"tfrun: {run_dir.name}: MLflow unreachable ({type(exc).__name__}: {str(exc)[:300]}); "
                "nothing lost: the run dir keeps everything, run tfrun sync again later",
                file=sys.stderr,
            )
            code = 1
            continue
        ended = f", ended {known['ended']}" if known.get("ended") else ", still running"
        print(f"{run_dir.name}: MLflow run {known['run_id']} at {known['tracking_uri']} up to date{ended}")
        if known.get("registered"):
            print(f"{run_dir.name}: {mlflow_sync.registered_text(known['registered'])}")
    return code
