"""How a pool's item ended, as the fields of its status: what its launcher would record for a
run of its own (its state, exit codes, the rank that failed first and how, its export, a hang
or a prune's account)."""
from __future__ import annotations

import signal
import time
from typing import Any

from tfrun import backends, rundir
from tfrun.model import export
from tfrun.paths import RunPaths
from tfrun.states import RunState
from tfrun.task import preempt


def fields(run_dir: str, codes: dict[int, int], outcome: str | None, stopped: bool) -> dict[str, Any]:
    """An item's final status fields from its ranks' exit codes and what was decided before its
    end (``outcome``: cancelled, timeout); ``stopped``: a rank stopped on request."""
    if outcome == "cancelled" or RunPaths.of(run_dir).cancel_request.exists():
        state = RunState.CANCELLED
    elif outcome == "timeout":
        state = RunState.TIMEOUT
    elif all(c == 0 for c in codes.values()):
        state = RunState.COMPLETED
    elif stopped and all(c in (0, preempt.EXIT_PREEMPTED) for c in codes.values()):
        state = RunState.STOPPED
    else:
        state = RunState.FAILED
    found: dict[str, Any] = {"state": state, "ended": time.time(),
                             "exit_codes": {str(r): c for r, c in sorted(codes.items())}}
    if state == RunState.COMPLETED:
        found.update(export.status_fields(run_dir))
    if state == RunState.CANCELLED:
        found["reason"] = "cancelled with tfrun cancel"
    if state == RunState.TIMEOUT:
        found["reason"] = "its time limit (compute.timeout_min) passed"
    if state == RunState.FAILED:
        found.update(failure(run_dir, codes))
    if state == RunState.STOPPED:
        found["reason"] = "stopped on request; continue it with: tfrun resume " + run_dir
    found.update(rundir.hang_fields(run_dir, state))
    found.update(rundir.pruned_fields(run_dir, found["state"]))
    return found


def describe_exit(code: int) -> str:
    """'exit code 3' or 'killed by SIGKILL'."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def critical_ranks(plan: rundir.Plan) -> set[int]:
    """Ranks whose failure ends the item: all, unless the backend survives losing a server task."""
    if getattr(backends.get(plan.backend), "TOLERATES_WORKER_LOSS", False):
        return {t.rank for t in plan.tasks if t.runs_script}
    return {t.rank for t in plan.tasks}


def failure(run_dir: str, codes: dict[int, int]) -> dict[str, Any]:
    """Which rank failed first and how: its own record's account, else its exit."""
    records = rundir.rank_records(run_dir)
    failed = [(records.get(r, {}).get("ended") or float("inf"), r) for r, c in codes.items() if c != 0]
    if not failed:
        return {}
    rank = min(failed)[1]
    record = records.get(rank, {})
    return {"failed_rank": rank, "host": record.get("host") or rundir.hostname(),
            "reason": record.get("error") or describe_exit(codes[rank])}
