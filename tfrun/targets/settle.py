"""How a run ended, as the fields of its status: one set of rules for every target.

A target gathers what it knows about the end (:class:`Ending`: the state it saw, the ranks'
exit codes, its own account of the first failure, whether it was cancelled) and
:func:`settle` applies the rules, in this order, the first that holds deciding:

1. cancelled (by ``tfrun cancel``, Ctrl-C, a pool's stop): CANCELLED;
2. preempted and not requeued: STOPPED, resumable with ``tfrun resume``;
3. stopped by its tuning policy (``prune.json``): PRUNED;
4. a hang the watchdog named and ended (not requeued): FAILED, with its account;
5. a failure: the first rank that failed and why (its own recorded error before the
   description of its exit);
6. COMPLETED: with its export's record.

What the ranks and the watchdog left in the run dir (their records, the attempts, the hang,
the policy's decision) is read here, so each target only says what it alone saw.
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Mapping

from tfrun import backends, rundir
from tfrun.model import export
from tfrun.rundir import Plan
from tfrun.states import RunState

TIME_LIMIT = "its time limit (compute.timeout_min) passed"


@dataclass(frozen=True)
class Ending:
    """What a target saw of a run's end."""

    state: str  # the state the target observed (Slurm's, mapped; the local launcher's; a pool's)
    # Each rank's exit code, None where it is not known (a rank killed before it recorded one);
    # None: not known to the target at all, the ranks' own records say.
    exit_codes: Mapping[int, int | None] | None = None
    # The target's own account of the first rank that failed ({"failed_rank", "host", "reason"}):
    # the local launcher saw it end first; srun names it before those it then terminated.
    first_failure: Mapping[str, Any] | None = None
    cancelled: bool = False  # asked to end for good (a cancel), whatever the ranks' exits say
    reason: str | None = None  # the target's words for the end, where no rule says more
    host: str | None = None  # where every rank ran, when the target knows (one machine)
    scheduler: str | None = None  # who reported the state, named in a reason ("Slurm")
    # The attempt whose end this is (its key, as its tasks name it): the records an earlier
    # attempt's ranks left are no account of it. None: the ranks' records, whichever there are.
    attempt: str | None = None


def settle(run_dir: str | os.PathLike[str], ending: Ending) -> dict[str, Any]:
    """The run's final status fields from ``ending`` and its run dir, by the rules above."""
    records = {
        rank: record
        for rank, record in rundir.rank_records(run_dir).items()
        if ending.attempt is None or record.get("attempt") == ending.attempt
    }
    codes = (
        dict(ending.exit_codes)
        if ending.exit_codes is not None
        else {rank: record.get("exit_code") for rank, record in records.items()}
    )
    # No failed rank and no reason unless a rule gives them: a hang an earlier attempt recorded
    # (and was requeued for) is no account of how this one ended.
    fields: dict[str, Any] = {
        "state": ending.state,
        "ended": time.time(),
        "failed_rank": None,
        "reason": None,
        "exit_codes": {str(rank): code for rank, code in sorted(codes.items())},
    }
    decided = _decided(run_dir, ending, records, codes)
    if decided is None and ending.reason:
        decided = {"reason": ending.reason}
    if decided is None and ending.state == RunState.TIMEOUT:
        decided = {"reason": TIME_LIMIT}
    fields.update(decided or {})
    if fields["state"] == RunState.COMPLETED:
        fields.update(export.status_fields(run_dir))  # rank 0 recorded it in export.json
    return fields


def _decided(
    run_dir: str | os.PathLike[str], ending: Ending, records: dict[int, dict[str, Any]], codes: dict[int, int | None]
) -> dict[str, Any] | None:
    """The fields of the first rule that holds (rules 1 to 5), or None."""
    state = ending.state
    if ending.cancelled:
        return {"state": RunState.CANCELLED, **({"reason": ending.reason} if ending.reason else {})}
    return (
        preempted_fields(run_dir, state)
        or rundir.pruned_fields(run_dir, state)
        or rundir.hang_fields(run_dir, state)
        or failure(ending, records, codes)
        or None
    )


def last_attempt(run_dir: str | os.PathLike[str], ended: bool = False) -> dict[str, Any]:
    """The run's latest attempt ({} if none); ``ended``: the latest that has ended."""
    tried = [a for a in rundir.attempts(run_dir) if a.get("ended") or not ended]
    return tried[-1] if tried else {}


def preempted_fields(run_dir: str | os.PathLike[str], state: str) -> dict[str, Any]:
    """A run that ended after a preemption it was not requeued for: STOPPED (resumable), and
    why; else nothing."""
    if state not in (RunState.FAILED, RunState.STOPPED):
        return {}
    last = last_attempt(run_dir)
    if last.get("reason") != "preempted" or last.get("requeued"):
        return {}
    why = last.get("why_not_requeued") or "Slurm ended it"
    return {"state": RunState.STOPPED, "failed_rank": None, "reason": f"preempted; not requeued ({why})"}


def failure(ending: Ending, records: dict[int, dict[str, Any]], codes: dict[int, int | None]) -> dict[str, Any]:
    """Which rank failed first, where, and why (a FAILED run; a TIMEOUT's only from the
    target's account or a rank that never finished: every exit after a time limit is the
    limit's doing); else nothing."""
    if ending.state not in (RunState.FAILED, RunState.TIMEOUT):
        return {}
    if ending.first_failure:
        first = dict(ending.first_failure)
        record = records.get(int(first["failed_rank"]), {})
        return {
            "failed_rank": first["failed_rank"],
            "host": first.get("host") or record.get("host"),
            "reason": record.get("error") or first.get("reason"),
        }  # the rank's own account is more precise
    failed = [rank for rank, code in codes.items() if code not in (None, 0)]
    if failed and ending.state == RunState.FAILED:
        rank = min(failed, key=lambda r: (records.get(r, {}).get("ended") or math.inf, r))
        record = records.get(rank, {})
        code = codes[rank]
        assert code is not None
        return {
            "failed_rank": rank,
            "host": record.get("host") or ending.host,
            "reason": record.get("error") or describe_exit(code),
        }
    unfinished = sorted(rank for rank, code in codes.items() if code is None)
    if unfinished:
        record = records.get(unfinished[0], {})
        said = f"{ending.scheduler} state" if ending.scheduler else "state"
        return {
            "failed_rank": unfinished[0],
            "host": record.get("host") or ending.host,
            "reason": f"killed before it finished ({said} {ending.state})",
        }
    return {}


def describe_exit(code: int) -> str:
    """'exit code 3' or 'killed by SIGKILL' from a process's return code."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def critical_ranks(plan: Plan) -> set[int]:
    """Ranks whose failure ends the run: all, unless the backend survives losing a server task."""
    if getattr(backends.get(plan.backend), "TOLERATES_WORKER_LOSS", False):
        return {t.rank for t in plan.tasks if t.runs_script}
    return {t.rank for t in plan.tasks}
