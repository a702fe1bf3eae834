"""What an attempt does once its script stopped on request (a stop signal, a preemption).

On Slurm rank 0 decides, by the one rule (:mod:`tfrun.task.requeue`), whether the job is
requeued, and requeues it; the other ranks wait for its decision, then for Slurm to end
them (or end at once when there is no requeue). Locally the launcher records the run as
stopped, resumable. What asked for the stop is recorded the moment it comes (rank 0,
:func:`record_in_background`), with Slurm's account of a SIGTERM.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from tfrun import rundir, variables
from tfrun.paths import RunPaths
from tfrun.rundir import Plan
from tfrun.task import identity, preempt, preemption, rendezvous, requeue


def say(message: str) -> None:
    """A line in the rank's log, marked as tfrun's."""
    print(f"tfrun: {message}", file=sys.stderr, flush=True)


def stop_decision(plan: Plan, request: dict) -> tuple[requeue.Cause, requeue.Decision]:
    """Rank 0, on Slurm, once its script stopped on request: why this attempt stops, and
    whether tfrun requeues the job (:func:`tfrun.task.requeue.decide`, the one rule)."""
    current = rendezvous.attempt_key()
    tried = rundir.attempts(plan.run_dir)
    started = next((a.get("started") for a in tried if a.get("attempt") == current), None)
    if RunPaths.of(plan.run_dir).prune.exists():  # a tuning policy stopped it: for good
        cause = requeue.Cause.PRUNED
    else:
        cause = requeue.cause_of(request, time.time() - started if started else None, plan.compute)
    earlier = [a for a in tried if a.get("attempt") != current]
    return cause, requeue.decide(cause, request, earlier, plan.compute)


def record_stop_request(plan: Plan, request: dict) -> None:
    """Rank 0, the moment a stop is requested: what asked (a preemption with its grace time is
    recorded even if the attempt is then killed before it can say more). For a SIGTERM it then
    asks Slurm, once, whether the job is being preempted: here, in a thread, not in the signal
    handler of every rank."""
    key = rendezvous.attempt_key()
    rundir.update_attempt(plan.run_dir, key, **{k: v for k, v in request.items() if k not in ("preempted", "sigterm")})
    job = preempt.job_id()
    if not (request.get("sigterm") and "preempted" not in request and job):
        return
    found = preemption.account(job, os.environ.get("SLURM_JOB_PARTITION"), os.environ.get("SLURM_JOB_QOS"))
    preempt.learn(found)
    if found.get("preempted"):
        grace = f"; {found['grace_s']} s of grace time" if found.get("grace_s") is not None else ""
        say(
            f"job {job} is being preempted (partition {found.get('partition', '?')}, "
            f"PreemptMode={found.get('preempt_mode') or '?'}{grace})"
        )
        rundir.update_attempt(
            plan.run_dir,
            key,
            reason=requeue.Cause.PREEMPTED.value,
            **{k: v for k, v in found.items() if k != "preempted"},
        )
    elif found:
        rundir.update_attempt(plan.run_dir, key, job_state=found.get("job_state"))
    else:
        say(f"Slurm did not say whether job {job} is being preempted: saving the work as for a preemption")


_recording: list[threading.Thread] = []


def record_in_background(plan: Plan, request: dict) -> None:
    """:func:`record_stop_request` in a thread: the signal handler that calls this runs in the
    main thread, which may be holding the attempts file's lock."""
    thread = threading.Thread(target=record_stop_request, args=(plan, request), name="tfrun-stop-record")
    _recording.append(thread)
    thread.start()


# How long the other ranks wait for rank 0 to decide, and then for Slurm to end them.
DECISION_WAIT_S = 120.0


def after_stop_request(plan: Plan, ident: identity.TaskIdentity, code: int) -> int:
    """On Slurm, rank 0 decides (and requeues the job); every rank then waits to be ended, or
    leaves once rank 0 has said the job is not requeued."""
    job = preempt.job_id()
    if ident.launcher != "slurm" or not job or os.environ.get(variables.POOL):
        # Local: the launcher records a resumable stop. A pool's item: the coordinator of its
        # allocation decides what follows (the allocation's requeue, or the item's end).
        if ident.rank == 0:
            for thread in _recording:
                thread.join(timeout=30)
            rundir.update_attempt(plan.run_dir, rendezvous.attempt_key(), ended=time.time(), reason="stopped")
        return code
    if ident.rank != 0:
        return _follow_rank_0(plan, code)
    deadline = time.monotonic() + preemption.QUERY_BUDGET_S + 5
    for thread in _recording:  # what asked is recorded first, then what was done
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    request = preempt.stop_request()
    cause, decision = stop_decision(plan, request)
    if cause is requeue.Cause.TERMINATED:
        # A requeue made meanwhile (the watchdog's, for a hang) stays recorded as it was.
        made = this_attempt(plan.run_dir)
        rundir.update_attempt(
            plan.run_dir,
            rendezvous.attempt_key(),
            ended=made.get("ended") or time.time(),
            terminated=True,
            **({} if "requeued" in made else {"requeued": False}),
        )
        preempt.end_as_terminated()
    if not decision.requeue:
        say(
            f"{decision.why_not}: not requeued"
            if cause is not requeue.Cause.PREEMPTED
            else f"{cause.value}: not requeued ({decision.why_not}); continue it with: tfrun resume {plan.run_dir}"
        )
        rundir.update_attempt(
            plan.run_dir,
            rendezvous.attempt_key(),
            ended=time.time(),
            reason=cause.value,
            requeued=False,
            why_not_requeued=decision.why_not,
        )
        return code
    if requeue.requeued_as_it_ends(request):
        # Requeued by tfrun as well, it would be requeued once more when its next attempt
        # ends; kept waiting, Slurm would kill it at the end of the grace time, and then
        # requeue that one too. So the tasks end (rank 0 last: the others wait for this record).
        say(
            f"{cause.value}: job {job} ends now and Slurm requeues it (PreemptMode=REQUEUE, Slurm "
            f"{request.get('slurm_version')}); it resumes from the backup"
        )
        rundir.update_attempt(
            plan.run_dir,
            rendezvous.attempt_key(),
            ended=time.time(),
            reason=cause.value,
            requeued=True,
            requeued_by="slurm",
            requeued_as_it_ends=True,
        )
        return code
    return _requeue(plan, job, cause, request, code)


def _follow_rank_0(plan: Plan, code: int) -> int:
    """Not rank 0: wait for its decision, then for Slurm to end this task (or end now)."""
    preempt.deciding()
    decided = _await_decision(plan.run_dir)
    if decided.get("terminated") or decided.get("reason") == requeue.Cause.HANG.value:
        # Slurm is ending the job (a cancel, the watchdog ending a hang): end as that SIGTERM would.
        preempt.learn({"job_state": decided.get("job_state") or "ended by the watchdog"})
        preempt.end_as_terminated()
    if decided.get("requeued_as_it_ends"):  # Slurm requeues the job as its tasks end: rank 0 has recorded the end
        return code
    if decided.get("requeued") is not False:
        preempt.wait_to_be_stopped(DECISION_WAIT_S)
    return code


def completed_earlier(run_dir: str) -> dict | None:
    """The attempt of this same Slurm job that completed the run, if one did: Slurm starts a job
    it requeued during a preemption once more after its next attempt ends (see
    :data:`tfrun.task.requeue.REQUEUES_PREEMPTED_AS_IT_ENDS`), and that attempt has nothing left to do."""
    job, current = preempt.job_id(), rendezvous.attempt_key()
    done = [
        a
        for a in rundir.attempts(run_dir)
        if job and a.get("job_id") == job and a.get("attempt") != current and a.get("reason") == "completed"
    ]
    return done[-1] if done else None


def _requeue(plan: Plan, job: str, cause: requeue.Cause, request: dict, code: int) -> int:
    # Said and recorded first: Slurm ends this task the moment the requeue is done.
    say(f"{cause.value}: requeueing job {job}; it resumes from the backup")
    key = rendezvous.attempt_key()
    rundir.update_attempt(plan.run_dir, key, ended=time.time(), reason=cause.value, requeued=True, requeued_by="tfrun")
    preempt.await_end()  # the requeue's SIGTERM ends this task
    failure = preempt.requeue(job)
    if failure and requeue.slurm_requeues(request):
        # The grace time ran out first: Slurm has requeued it (once, and not again by tfrun).
        say(f"{cause.value}: job {job} is requeued by Slurm ({failure})")
        rundir.update_attempt(plan.run_dir, key, requeued_by="slurm")
    elif failure:
        say(f"could not requeue job {job}: {failure}")
        rundir.update_attempt(plan.run_dir, key, requeued=False, requeued_by=None, error=failure)
        return code
    preempt.wait_to_be_stopped(DECISION_WAIT_S)
    return code


def this_attempt(run_dir: str) -> dict:
    """This attempt's record so far."""
    key = rendezvous.attempt_key()
    return next((a for a in rundir.attempts(run_dir) if a.get("attempt") == key), {})


def _await_decision(run_dir: str) -> dict:
    """Rank 0's record of this attempt once it has decided (requeued or not), or after
    DECISION_WAIT_S what there is."""
    deadline = time.monotonic() + DECISION_WAIT_S
    while True:
        record = this_attempt(run_dir)
        if "requeued" in record or time.monotonic() > deadline:
            return record
        time.sleep(0.5)
