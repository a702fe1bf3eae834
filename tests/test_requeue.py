"""The one rule for requeues (tfrun.task.requeue): why an attempt stops, and whether it is
requeued, for every caller (a stop request, the watchdog's hang, a pack's runner). Pure."""

from __future__ import annotations

from typing import Any

import pytest

from tfrun.task.requeue import Cause, cause_of, counts, decide

COMPUTE = {
    "max_requeues": 2,
    "requeue_on_preempt": True,
    "requeue_on_hang": True,
    "timeout_min": 60,
    "signal_delay_s": 120,
}
PREEMPT_REQUEUE = {
    "signal": "SIGTERM",
    "sigterm": True,
    "preempted": True,
    "partition": "low",
    "preempt_mode": "REQUEUE",
}
PREEMPT_CANCEL = {**PREEMPT_REQUEUE, "partition": "scavenge", "preempt_mode": "CANCEL"}


def requeued(reason: str, **more: Any) -> dict[str, Any]:
    return {"reason": reason, "requeued": True, "requeued_by": "tfrun", **more}


TIMEOUT, HANG, STOPPED = requeued("timeout"), requeued("hang"), requeued("preempted", signal="SIGUSR2")
CANCELLED_PREEMPTION = requeued("preempted", preempt_mode="CANCEL")
SLURM_RULE = requeued("preempted", preempt_mode="REQUEUE")  # Slurm would have requeued it anyway
NOT_REQUEUED = {"reason": "timeout", "requeued": False}


@pytest.mark.parametrize(
    "cause, request_, earlier, compute, requeue, why",
    [
        # A time limit: requeued until max_requeues requeues of any kind were made.
        (Cause.TIME_LIMIT, {"signal": "SIGUSR2"}, [], {}, True, None),
        (Cause.TIME_LIMIT, {"signal": "SIGUSR2"}, [TIMEOUT], {}, True, None),
        (
            Cause.TIME_LIMIT,
            {"signal": "SIGUSR2"},
            [TIMEOUT, TIMEOUT],
            {},
            False,
            "time limit reached after 2 requeue(s) already (compute.max_requeues=2)",
        ),
        (
            Cause.TIME_LIMIT,
            {"signal": "SIGUSR2"},
            [HANG, CANCELLED_PREEMPTION],
            {},
            False,
            "time limit reached after 2 requeue(s) already (compute.max_requeues=2)",
        ),
        (Cause.TIME_LIMIT, {"signal": "SIGUSR2"}, [NOT_REQUEUED, NOT_REQUEUED, TIMEOUT], {}, True, None),
        (
            Cause.TIME_LIMIT,
            {"signal": "SIGUSR2"},
            [],
            {"max_requeues": 0},
            False,
            "time limit reached after 0 requeue(s) already (compute.max_requeues=0)",
        ),
        # A stop signal far from the time limit (a site's hook): bounded like a time limit, never unbounded.
        (
            Cause.PREEMPTED,
            {"signal": "SIGUSR2"},
            [STOPPED, STOPPED],
            {},
            False,
            "stopped on request after 2 requeue(s) already (compute.max_requeues=2)",
        ),
        # A preemption Slurm requeues by itself: always, and it does not count.
        (Cause.PREEMPTED, PREEMPT_REQUEUE, [TIMEOUT, TIMEOUT, TIMEOUT], {}, True, None),
        (Cause.TIME_LIMIT, {"signal": "SIGUSR2"}, [SLURM_RULE, SLURM_RULE, SLURM_RULE, TIMEOUT], {}, True, None),
        # A preemption Slurm cancels: requeued if compute.requeue_on_preempt, and counted.
        (Cause.PREEMPTED, PREEMPT_CANCEL, [TIMEOUT], {}, True, None),
        (
            Cause.PREEMPTED,
            PREEMPT_CANCEL,
            [TIMEOUT, CANCELLED_PREEMPTION],
            {},
            False,
            "stopped on request after 2 requeue(s) already (compute.max_requeues=2)",
        ),
        (
            Cause.PREEMPTED,
            PREEMPT_CANCEL,
            [],
            {"requeue_on_preempt": False},
            False,
            "partition scavenge ends preempted jobs (PreemptMode=CANCEL) and compute.requeue_on_preempt=false",
        ),
        # A SIGTERM Slurm did not answer about: the work is saved and requeued as for a preemption, counted.
        (
            Cause.PREEMPTED,
            {"signal": "SIGTERM", "sigterm": True},
            [TIMEOUT, HANG],
            {},
            False,
            "stopped on request after 2 requeue(s) already (compute.max_requeues=2)",
        ),
        # A hang: only with compute.requeue_on_hang, and counted with the others.
        (Cause.HANG, {}, [], {}, True, None),
        (Cause.HANG, {}, [], {"requeue_on_hang": False}, False, "compute.requeue_on_hang is false"),
        (Cause.HANG, {}, [TIMEOUT, STOPPED], {}, False, "hang after 2 requeue(s) already (compute.max_requeues=2)"),
        # A pack's restart after a point was killed by the warning: the point's own attempts count.
        (Cause.TIME_LIMIT, {"signal": "SIGUSR2"}, [requeued("timeout", job_id="7_1")], {}, True, None),
        # Never: a cancel or the time limit itself, and a trial its tuning policy pruned.
        (
            Cause.TERMINATED,
            {"signal": "SIGTERM", "preempted": False, "job_state": "CANCELLED"},
            [],
            {},
            False,
            "Slurm is ending the job (CANCELLED): not a preemption",
        ),
        (Cause.PRUNED, {"signal": "SIGUSR2"}, [], {}, False, "pruned by the tuning study's early-termination policy"),
    ],
)
def test_decide(cause: Cause, request_: dict, earlier: list, compute: dict, requeue: bool, why: str | None) -> None:
    decision = decide(cause, request_, earlier, {**COMPUTE, **compute})
    assert (decision.requeue, decision.why_not) == (requeue, why)


def test_only_requeues_slurm_would_not_make_count() -> None:
    assert [
        counts(a)
        for a in (
            TIMEOUT,
            HANG,
            STOPPED,
            CANCELLED_PREEMPTION,
            SLURM_RULE,
            NOT_REQUEUED,
            {**TIMEOUT, "requeued_by": "slurm"},
        )
    ] == [True, True, True, True, False, False, False]
    assert decide(Cause.PREEMPTED, PREEMPT_REQUEUE, [], COMPUTE).counted is False


@pytest.mark.parametrize(
    "request_, elapsed_s, cause",
    [
        # SIGUSR1/SIGUSR2: the warning near the time limit (60 min, warned 120 s before), else a stop signal.
        ({"signal": "SIGUSR2"}, 3600 - 120 - 30, Cause.TIME_LIMIT),
        ({"signal": "SIGUSR1"}, 3600 - 120 - 80, Cause.TIME_LIMIT),  # Slurm may warn up to a minute early
        ({"signal": "SIGUSR2"}, 600, Cause.PREEMPTED),
        ({"signal": "SIGUSR2"}, None, Cause.PREEMPTED),  # no attempt start known: a stop signal, still bounded
        # SIGTERM: a preemption unless Slurm said otherwise; no answer saves the work as for one.
        ({"signal": "SIGTERM", "sigterm": True, "preempted": True}, 600, Cause.PREEMPTED),
        ({"signal": "SIGTERM", "sigterm": True}, 600, Cause.PREEMPTED),
        ({"signal": "SIGTERM", "sigterm": True, "preempted": False, "job_state": "CANCELLED"}, 600, Cause.TERMINATED),
        # A preemption during a time limit's stop is a preemption; the time limit's own SIGTERM is not.
        ({"signal": "SIGUSR2", "sigterm": True, "preempted": True}, 3500, Cause.PREEMPTED),
        ({"signal": "SIGUSR2", "sigterm": True, "preempted": False}, 3500, Cause.TIME_LIMIT),
    ],
)
def test_cause_of(request_: dict, elapsed_s: float | None, cause: Cause) -> None:
    assert cause_of(request_, elapsed_s, COMPUTE) is cause
