"""``tfrun resume [RUN]``: launch a stopped, cancelled, failed or timed-out run again in its own
run dir; it continues from its last backup."""

from __future__ import annotations

import argparse
import sys

from tfrun import rundir
from tfrun.cli.common import add_run
from tfrun.errors import UsageError
from tfrun.paths import RunPaths
from tfrun.runner.control import refresh
from tfrun.states import FINAL, OK, RunState


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``resume``'s arguments."""
    add_run(parser)


def run(args: argparse.Namespace) -> int:
    """Launch the run again where its plan says; 0 if it then completed."""
    from tfrun import runner
    from tfrun.plan import Plan

    path = rundir.find_one_run(args.run)
    status = refresh([path])[0]
    if status.get("state") == RunState.PRUNED:  # its tasks would stop at their start (prune.json)
        raise UsageError(
            f"run {path} was pruned by its tuning study's policy ({status.get('reason')}): it is not "
            f"resumed; to train it on anyway, remove {RunPaths.of(path).prune} and resume it"
        )
    if status.get("state") not in FINAL or status.get("state") == RunState.COMPLETED:
        raise UsageError(
            f"run {path} is {status.get('state', RunState.UNKNOWN)}: only a stopped, cancelled, failed "
            f"or timed-out run can be resumed"
        )
    plan = Plan.load(path)
    print(f"tfrun: resuming {plan.run_id} (it continues from its last backup)", file=sys.stderr)
    state = runner.launch(plan, warn=None)  # (its warnings were told when it was launched first)
    return 0 if state in OK else 1
