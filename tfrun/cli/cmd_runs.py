"""``tfrun runs [--last N] [--sweep SWEEP [--sort METRIC]]``: recent runs (in the order they were
launched, the latest last), or a sweep's runs with the parameters that differ and their metrics."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tfrun import rundir, variables
from tfrun.cli.common import duration
from tfrun.cli.output import say
from tfrun.paths import RunPaths
from tfrun.runner.control import refresh, run_dirs_of
from tfrun.states import RunState


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``runs``'s arguments."""
    parser.add_argument("--runs-dir", help=f"where runs are (default: ${variables.RUNS_DIR} or ./tfrun-runs)")
    parser.add_argument("--last", type=int, default=20, help="how many to show")
    parser.add_argument(
        "--sweep", help="a sweep (dir or id): its runs with the parameters that differ and their metrics"
    )
    parser.add_argument(
        "--sort",
        help="with --sweep: order by this metric's final value, best first (a tuning "
        "study's objective by its direction, another metric lowest first if it names a "
        "loss or error)",
    )


def run(args: argparse.Namespace) -> int:
    """Print the table."""
    if args.sweep:
        from tfrun.tracking.compare import sweep_table

        sweep = rundir.find_run(args.sweep)
        dirs = run_dirs_of(sweep)
        print(sweep_table(sweep, dirs, refresh(dirs), sort=args.sort))
        return 0
    root = rundir.runs_root(args.runs_dir)
    dirs = list(rundir.iter_runs(root))[-args.last :] if args.last > 0 else []
    if not dirs:
        say(
            f"no runs under {root} (runs are looked for in $TFRUN_RUNS_DIR, else ./tfrun-runs; --runs-dir DIR "
            "names another)"
        )
        return 0
    statuses = refresh(dirs)
    print(
        f"{'RUN':<34} {'NAME':<12} {'STATE':<10} {'BACKEND':<8} {'COMPUTE':<8} {'JOBS':<10} {'LAUNCHED':<12} DURATION"
    )
    for run_dir, status in zip(dirs, statuses):
        run_id = status.get("run_id") or run_dir.name
        jobs = ",".join(status.get("job_ids") or []) or "-"
        state = status.get("state", RunState.UNKNOWN)
        print(
            f"{run_id:<34} {name_of(run_dir):<12} {state:<10} {status.get('backend', '?'):<8} "
            f"{status.get('target', '?'):<8} {jobs:<10} {_when(rundir.launched(run_dir)):<12} {duration(status)}"
        )
    return 0


def name_of(run_dir: Path) -> str:
    """The run's ``tfrun.name`` label, or '-'."""
    plan = rundir.read_json(RunPaths.of(run_dir).plan) or {}
    return str(((plan.get("config") or {}).get("tfrun") or {}).get("name") or "-")


def _when(stamp: float) -> str:
    return time.strftime("%m-%d %H:%M", time.localtime(stamp)) if stamp else "-"
