"""What tfrun prints when a run ends: where its outputs are, or which rank failed and why."""

from __future__ import annotations

import re
import sys

from tfrun import rundir
from tfrun.model.export import summary as export_summary
from tfrun.paths import RunPaths
from tfrun.plan import Plan
from tfrun.states import RunState


def failure_text(run_dir: str, status: dict) -> str:
    """Which rank failed, on which host, how, and the end of its log (after a hang, where its
    script is stuck: the end of its log is the watchdog's dump of every thread); a run that
    failed before any rank did (a job whose setup failed): why."""
    rank = status.get("failed_rank")
    if rank is None:
        return status.get("reason") or "failed, and no rank recorded why"
    record = rundir.rank_records(run_dir).get(int(rank), {})
    host = record.get("host") or status.get("host") or "?"
    # The status has the rank's own account (its error) where the rank's record is of the attempt
    # that failed; a record an earlier attempt left is not.
    reason = status.get("reason") or record.get("error") or "failed"
    log = RunPaths.of(run_dir).rank_log(int(rank))
    lines = [f"rank {rank} on {host} failed: {reason}"]
    stuck = stuck_at(rundir.tail(log, 400)) if status.get("hang") else None
    if stuck:
        lines.append(f"where its script is stuck (the watchdog's stacks in {log}):")
        lines += ["  | " + line for line in stuck]
    else:
        lines.append(f"last lines of {log}:")
        lines += ["  | " + line for line in rundir.tail(log, 15).splitlines()]
    return "\n".join(lines)


# A thread's block in a faulthandler dump ("Current thread 0x... (most recent call first):")
# and in py-spy's ('Thread 4242 (idle): "MainThread"'); the frames of the script's own code
# are those above runpy's, which the bootstrap's run_script runs it with.
_BLOCK = re.compile(r"^(?=(?:Current thread|Thread) (?:0x)?[0-9a-f]+)", re.M)
_RUNS_THE_SCRIPT = re.compile(r"bootstrap\.py.*run_script|run_script \(.*bootstrap\.py")


def stuck_at(log_text: str, most: int = 12) -> list[str] | None:
    """The frames of the script's thread in the last stack dump of a rank's log (faulthandler's,
    else py-spy's), most recent first, down to the script's own first line; None if the log
    holds no such dump."""
    blocks = [b for b in reversed(_BLOCK.split(log_text)) if _RUNS_THE_SCRIPT.search(b)]
    # faulthandler's first (Python's own traceback lines), py-spy's where the process could not answer
    for block in sorted(blocks, key=lambda b: not b.startswith(("Current thread 0x", "Thread 0x"))):
        frames = [line.strip() for line in block.splitlines()[1:] if line.startswith("  ")]
        own = [f for f in frames if "frozen runpy" not in f and "runpy.py" not in f]
        cut = next((i for i, f in enumerate(frames) if "frozen runpy" in f or "runpy.py" in f), len(frames))
        return (frames[:cut] or own)[:most]
    return None


def print_outcome(plan: Plan, state: str) -> None:
    """One summary after a run ends."""
    status = rundir.read_status(plan.run_dir)
    took = ""
    if status.get("started") and status.get("ended"):
        took = f" in {status['ended'] - status['started']:.1f} s"
    print(f"tfrun: run {plan.run_id} {state}{took}", file=sys.stderr)
    if state == RunState.FAILED:
        print("tfrun: " + failure_text(plan.run_dir, status), file=sys.stderr)
    if state == RunState.STOPPED:
        if status.get("reason"):
            print(f"tfrun: {status['reason']}", file=sys.stderr)
        print(f"tfrun: continue it with: tfrun resume {plan.run_dir}", file=sys.stderr)
    if status.get("export") and plan.target != "local":  # a local rank 0 printed it as it streamed
        print(f"tfrun: {export_summary(status['export'])}", file=sys.stderr)
    print(f"tfrun: run dir {plan.run_dir}", file=sys.stderr)
    print(f"tfrun: outputs {plan.output_dir}", file=sys.stderr)
