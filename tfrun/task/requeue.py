"""The one rule for requeueing a run's Slurm job: may this attempt be requeued, and why not.

Pure: a function of why the attempt stops, what asked, the run's earlier attempts (as
``attempts.json`` records them) and the compute settings. The bootstrap (a stop request),
the watchdog (a hang) and a pack's runner (a point killed before it could stop) all ask it.

Every requeue tfrun makes counts toward ``compute.max_requeues``, whatever its cause (a
time limit, a stop signal, a preemption Slurm would cancel, a hang, a pack's restart), so
a run that cannot finish is not requeued forever. A preemption under ``PreemptMode=REQUEUE``
is always requeued and does not count: Slurm requeues such a job by itself once the grace
time is over, tfrun only does it as soon as the backup is written.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Iterable, Mapping


class Cause(str, enum.Enum):
    """Why an attempt stops, as ``attempts.json`` records it (``reason``)."""

    TIME_LIMIT = "timeout"  # SIGUSR1/SIGUSR2 near the time limit: Slurm's warning
    PREEMPTED = "preempted"  # Slurm preempting the job (SIGTERM), or a stop signal far from the time limit
    TERMINATED = "terminated"  # a SIGTERM that is no preemption: a cancel, the time limit, srun ending the step
    HANG = "hang"  # the watchdog found a rank without progress
    PRUNED = "pruned"  # a tuning policy stopped the trial for good


@dataclass(frozen=True)
class Decision:
    """Whether to requeue; ``why_not`` when not; ``counted``: whether it counts toward max_requeues."""

    requeue: bool
    why_not: str | None = None
    counted: bool = True


def slurm_requeues(record: Mapping[str, Any]) -> bool:
    """Will Slurm requeue this preempted job by itself (``PreemptMode=REQUEUE``)?"""
    return bool(record.get("preempted")) and "REQUEUE" in str(record.get("preempt_mode") or "").upper()


# From this Slurm release on, a job preempted under PreemptMode=REQUEUE that ends within its
# grace time is requeued by Slurm as it ends; and one requeued by anyone else (scontrol
# requeue) before that is requeued once more when its next attempt ends, completed or not.
# Slurm 22.05 records the early end as COMPLETED and requeues nothing (both seen on 22.05.8
# and 24.11.5; the releases between are taken to behave as 22.05 does).
REQUEUES_PREEMPTED_AS_IT_ENDS = (24, 11)


def release(version: str | None) -> tuple[int, int] | None:
    """(major, minor) of a Slurm version as ``scontrol show config`` gives it (``24.11.5``)."""
    parts = (version or "").strip().split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def requeued_as_it_ends(request: Mapping[str, Any]) -> bool:
    """Does Slurm requeue this preempted job when its tasks end, so that tfrun must not requeue
    it (see :data:`REQUEUES_PREEMPTED_AS_IT_ENDS`)? Asked of the release the cluster reported."""
    found = release(request.get("slurm_version"))
    return slurm_requeues(request) and found is not None and found >= REQUEUES_PREEMPTED_AS_IT_ENDS


def counts(attempt: Mapping[str, Any]) -> bool:
    """Does this earlier attempt's requeue count toward ``compute.max_requeues``?"""
    if not attempt.get("requeued"):
        return False
    if attempt.get("requeued_by") == "slurm":
        return False
    by_slurm_rule = (
        attempt.get("reason") == Cause.PREEMPTED.value and "REQUEUE" in str(attempt.get("preempt_mode") or "").upper()
    )
    return not by_slurm_rule


def done(earlier: Iterable[Mapping[str, Any]]) -> int:
    """How many requeues of the run so far count toward ``compute.max_requeues``."""
    return sum(1 for attempt in earlier if counts(attempt))


_WHAT = {
    Cause.TIME_LIMIT: "time limit reached",
    Cause.PREEMPTED: "stopped on request",
    Cause.HANG: "hang",
}


def decide(
    cause: Cause, request: Mapping[str, Any], earlier: Iterable[Mapping[str, Any]], compute: Mapping[str, Any]
) -> Decision:
    """May this attempt, stopping for ``cause`` (``request``: what asked, as
    :func:`tfrun.task.preempt.stop_request` gives it), be requeued after ``earlier`` attempts?"""
    if cause is Cause.PRUNED:
        return Decision(False, "pruned by the tuning study's early-termination policy")
    if cause is Cause.TERMINATED:
        state = request.get("job_state") or "ending"
        return Decision(False, f"Slurm is ending the job ({state}): not a preemption")
    if cause is Cause.HANG and not compute.get("requeue_on_hang"):
        return Decision(False, "compute.requeue_on_hang is false")
    if cause is Cause.PREEMPTED and slurm_requeues(request):
        return Decision(True, counted=False)
    if cause is Cause.PREEMPTED and request.get("preempted") and not compute.get("requeue_on_preempt", True):
        where = f"partition {request.get('partition')} ends preempted jobs (PreemptMode={request.get('preempt_mode')})"
        return Decision(False, f"{where} and compute.requeue_on_preempt=false")
    limit = int(compute.get("max_requeues", 3))
    so_far = done(earlier)
    if so_far >= limit:
        return Decision(
            False, f"{_WHAT.get(cause, cause.value)} after {so_far} requeue(s) already (compute.max_requeues={limit})"
        )
    return Decision(True)


# Slurm's time-limit warning comes signal_delay_s before the limit, up to about a minute early
# (it checks limits periodically); the attempt's start it is measured from comes after the
# job's own (the batch script's setup lines run first).
WARNING_EARLY_S = 90.0


def cause_of(request: Mapping[str, Any], elapsed_s: float | None, compute: Mapping[str, Any]) -> Cause:
    """Why an attempt stops, from what asked (``request``, with Slurm's answer about a SIGTERM
    when rank 0 had one) and how long it has run: no Slurm query here.

    A SIGTERM is a preemption unless Slurm said otherwise: when it did not answer, the work
    is saved and requeued as for one. SIGUSR1/SIGUSR2 is the time-limit warning when it
    comes near the limit, else a stop signal (a site's preemption hook, ``scancel --signal``):
    both count toward ``compute.max_requeues``, so a wrong guess changes only the name."""
    if request.get("preempted"):
        return Cause.PREEMPTED
    if request.get("signal") == "SIGTERM":
        return Cause.TERMINATED if request.get("preempted") is False else Cause.PREEMPTED
    limit_s = float(compute.get("timeout_min") or 0) * 60
    near = limit_s - float(compute.get("signal_delay_s") or 0) - WARNING_EARLY_S
    return Cause.TIME_LIMIT if limit_s and elapsed_s is not None and elapsed_s >= near else Cause.PREEMPTED
