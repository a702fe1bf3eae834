"""What tfrun prints when a run ends: where its outputs are, or which rank failed and why."""
from __future__ import annotations

import sys

from tfrun import rundir
from tfrun.model.export import summary as export_summary
from tfrun.paths import RunPaths
from tfrun.plan import Plan


def failure_text(run_dir: str, status: dict) -> str:
    """Which rank failed, on which host, how, and the end of its log."""
    rank = status.get("failed_rank")
    if rank is None:
        return ""
    record = rundir.rank_records(run_dir).get(int(rank), {})
    host = record.get("host") or status.get("host") or "?"
    reason = record.get("error") or status.get("reason") or "failed"  # the rank's own account first
    log = RunPaths.of(run_dir).rank_log(int(rank))
    lines = [f"rank {rank} on {host} failed: {reason}", f"last lines of {log}:"]
    lines += ["  | " + line for line in rundir.tail(log, 15).splitlines()]
    return "\n".join(lines)


def print_outcome(plan: Plan, state: str) -> None:
    """One summary after a run ends."""
    status = rundir.read_status(plan.run_dir)
    took = ""
    if status.get("started") and status.get("ended"):
        took = f" in {status['ended'] - status['started']:.1f} s"
    print(f"tfrun: run {plan.run_id} {state}{took}", file=sys.stderr)
    if state == "FAILED":
        print("tfrun: " + failure_text(plan.run_dir, status), file=sys.stderr)
    if state == "STOPPED":
        if status.get("reason"):
            print(f"tfrun: {status['reason']}", file=sys.stderr)
        print(f"tfrun: continue it with: tfrun resume {plan.run_dir}", file=sys.stderr)
    if status.get("export"):
        print(f"tfrun: {export_summary(status['export'])}", file=sys.stderr)
    print(f"tfrun: run dir {plan.run_dir}", file=sys.stderr)
    print(f"tfrun: outputs {plan.output_dir}", file=sys.stderr)
