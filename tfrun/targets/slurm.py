"""Run Plans on Slurm through submitit: one job per run, one job array per sweep.

What is submitted was rendered at plan time (:mod:`tfrun.plan.sbatch`: submitit's
parameters, the exact sbatch script); ``submit``/``run``/``run_many`` act. State comes from one batched ``sacct``
query per poll for all of a launch's jobs, never one query per job.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from tfrun import deps, rundir
from tfrun.errors import ConfigError, LaunchError
from tfrun.paths import RunPaths, SweepPaths
from tfrun.plan import Plan, sbatch, submitit_compat
from tfrun.states import FINAL, RunState
from tfrun.targets import progress
from tfrun.targets.settle import Ending, last_attempt, settle
from tfrun.task import rendezvous

# Slurm's job states (sacct's, squeue's and scontrol's words) -> tfrun's. Anything not listed is
# shown as Slurm says it.
SLURM_TO_RUN_STATE: dict[str, RunState] = {
    "PENDING": RunState.PENDING,
    "REQUEUED": RunState.PENDING,
    "REQUEUE_HOLD": RunState.PENDING,
    "REQUEUE_FED": RunState.PENDING,
    "RESIZING": RunState.RUNNING,
    "RUNNING": RunState.RUNNING,
    "COMPLETING": RunState.RUNNING,
    "SUSPENDED": RunState.RUNNING,
    # Sent SIGSTOP (scancel -s STOP; squeue's and scontrol's word, sacct says RUNNING): it keeps its
    # allocation and goes on at SIGCONT. The same word as tfrun's own STOPPED, which is final.
    "STOPPED": RunState.RUNNING,
    "COMPLETED": RunState.COMPLETED,
    "CANCELLED": RunState.CANCELLED,
    "TIMEOUT": RunState.TIMEOUT,
    # Preempted and not requeued (PreemptMode=CANCEL): it can go on with tfrun resume. A job
    # Slurm requeues shows PENDING again (see query).
    "PREEMPTED": RunState.STOPPED,
    "FAILED": RunState.FAILED,
    "NODE_FAIL": RunState.FAILED,
    "OUT_OF_MEMORY": RunState.FAILED,
    "BOOT_FAIL": RunState.FAILED,
    "DEADLINE": RunState.TIMEOUT,
}
SLURM_PREEMPTED = "PREEMPTED"  # sacct's word for a preempted job, requeued or not


def tfrun_state(slurm_state: str) -> RunState | str:
    """Map a sacct state (``CANCELLED by 0`` included) to tfrun's vocabulary; a word it does not
    map is kept as Slurm says it, no state at all is UNKNOWN."""
    if not slurm_state:
        return RunState.UNKNOWN
    word = slurm_state.split()[0]
    return SLURM_TO_RUN_STATE.get(word, word)


def slurm_entry(run_dir: str) -> None:
    """What every srun task runs (pickled by submitit): the bootstrap, as a Slurm task."""
    import signal

    from tfrun.task import preempt

    # Held until the bootstrap's handlers are in place (then delivered to them): submitit's
    # own would requeue the job from rank 0 on SIGUSR2 behind tfrun's back. The task's
    # interpreter holds them from its start (tfrun.task.held); held again here for a call
    # that was started any other way.
    preempt.block()
    from tfrun.bootstrap import run_task

    # submitit ignores SIGTERM in its tasks (so that a preempted job lives until it is
    # requeued); the bootstrap takes it as a stop request, and a second one as the end.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    code = run_task(run_dir, launcher="slurm")
    if code:
        # Exit non-zero so that srun's --kill-on-bad-exit ends the step and Slurm marks the job FAILED.
        raise SystemExit(code)


def _executor(folder: str, params: dict[str, Any], python: str | Sequence[str]):  # -> submitit.SlurmExecutor
    import submitit

    try:
        executor = submitit.SlurmExecutor(folder=folder, python=sbatch.shell_words(python))
    except RuntimeError as exc:  # no srun on PATH
        raise LaunchError(f"compute.target=slurm needs Slurm's commands on PATH: {exc}") from exc
    executor.update_parameters(**params)
    return executor


def _rejected(exc: Exception) -> ConfigError:
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if "error" in ln.lower()] or text.splitlines()[-3:]
    return ConfigError("Slurm rejected the job: " + " / ".join(ln.strip() for ln in lines))


def submit(plans: Sequence[Plan], folder: str) -> list[str]:
    """Submit plans that share compute parameters: one job, or job arrays split at MaxArraySize.
    What is sent is the request the plan rendered (what ``--dry-run`` shows), not derived again."""
    params = dict(plans[0].request.get("parameters") or sbatch.plan_parameters(plans[0]))
    executor = _executor(folder, params, sbatch.task_python(plans[0]))
    ids: list[str] = []
    chunk = max(1, sbatch.max_array_size())
    for start in range(0, len(plans), chunk):
        part = plans[start : start + chunk]
        said = io.StringIO()
        try:
            # submitit prints sbatch's stderr when sbatch fails, and raises with the same text
            # in it: tfrun says it once, in its error.
            with contextlib.redirect_stderr(said):
                if len(part) == 1:
                    jobs = [executor.submit(slurm_entry, part[0].run_dir)]
                else:
                    with executor.batch():
                        jobs = [executor.submit(slurm_entry, p.run_dir) for p in part]
        except Exception as exc:  # submitit raises its own types with sbatch's stderr inside
            if ids:
                cancel(ids)
            raise _rejected(exc) from exc
        sys.stderr.write(said.getvalue())  # anything else written meanwhile
        ids += [str(job.job_id) for job in jobs]
    return ids


_told_no_accounting = False


def query(job_ids: Iterable[str]) -> dict[str, dict[str, str]]:
    """State and nodes of many jobs: ``{job_id: {"State": ..., "NodeList": ...}}``.

    One sacct call for them all. Without accounting (no slurmdbd, or sacct failing) the
    jobs sacct did not answer for come from one squeue call (queued and running jobs), then
    from scontrol (jobs ended in the last few minutes). A job none of them knows is left
    out, never reported as ended: callers keep its last known state.
    """
    wanted = sorted(set(job_ids))
    info = _sacct(wanted)
    # sacct says PREEMPTED of a job Slurm is about to requeue, too: the queue knows which.
    preempted = [j for j in wanted if j in info and info[j]["State"].startswith(SLURM_PREEMPTED)]
    if preempted:
        queued = _squeue(preempted)
        if queued is None:  # the queue did not answer: whether it is requeued is not known yet
            for job in preempted:
                del info[job]
        else:
            info.update(queued)
    missing = [j for j in wanted if j not in info]
    if missing:
        info.update(_squeue(missing) or {})
        for job in (j for j in missing if j not in info):
            found = _scontrol(job)
            if found:
                info[job] = found
    return info


def _sacct(job_ids: list[str]) -> dict[str, dict[str, str]]:
    global _told_no_accounting
    ids = sorted({j.split("_")[0] for j in job_ids})
    if not ids:
        return {}
    command = ["sacct", "-o", "JobID,State,NodeList,ExitCode", "--parsable2", "-j", ",".join(ids)]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=60)
        error = (out.stderr or "").strip() if out.returncode else ""
    except (OSError, subprocess.SubprocessError) as exc:
        out, error = None, str(exc)
    if out is None or error:
        if not _told_no_accounting:
            _told_no_accounting = True
            print(
                f"tfrun: Slurm accounting (sacct) does not answer ({error.splitlines()[-1] if error else '?'}): "
                f"job states come from squeue and scontrol, which forget a job minutes after it ends",
                file=sys.stderr,
                flush=True,
            )
        return {}
    return submitit_compat.read_sacct(out.stdout)


def _squeue(job_ids: list[str]) -> dict[str, dict[str, str]] | None:
    """Queued and running jobs (array elements one by one) from one squeue call; None if the
    queue did not answer (a job it no longer knows is an answer: left out)."""
    command = ["squeue", "-h", "-r", "-o", "%i|%T|%N", "-j", ",".join(sorted({j.split("_")[0] for j in job_ids}))]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode and "Invalid job id" not in out.stderr:
        return None
    found = {}
    for line in out.stdout.splitlines():
        job, state, nodes = (line.split("|") + ["", ""])[:3]
        if job.strip():
            found[job.strip()] = {"State": state.strip(), "NodeList": nodes.strip()}
    return found


def _scontrol(job_id: str) -> dict[str, str] | None:
    """A job that recently left the queue (the controller keeps it for MinJobAge)."""
    try:
        out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    fields = dict(word.split("=", 1) for word in out.stdout.split() if "=" in word)
    if out.returncode or "JobState" not in fields:
        return None
    return {"State": fields["JobState"], "NodeList": fields.get("NodeList", "")}


def cancel(job_ids: Iterable[str]) -> None:
    """scancel, once for all of them."""
    ids = list(job_ids)
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=60)


def scancel(args: list[str]) -> None:
    """``scancel ARGS`` whose failure is said, not raised (a stop request: the run is asked to
    stop whatever Slurm answers; a job that has ended already is what was asked for)."""
    try:
        done = subprocess.run(["scancel", *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"tfrun: scancel {' '.join(args)}: {exc}", file=sys.stderr, flush=True)
        return
    if done.returncode != 0 and "Invalid job id" not in done.stderr:
        print(
            f"tfrun: scancel {' '.join(args)}: {done.stderr.strip() or f'exit code {done.returncode}'}",
            file=sys.stderr,
            flush=True,
        )


_SRUN_TASK_ERROR = re.compile(r"^srun: error: (\S+): tasks? (\d+)(?:-\d+)?: (.+)$", re.M)


@dataclass(frozen=True)
class JobLog:
    """The part of a job's log (``%j_0_log.out``: the batch shell's and srun's lines) that its
    last attempt wrote, and that attempt's key as its tasks name it (None: not known)."""

    path: Path | None
    text: str
    attempt: str | None

    @classmethod
    def of(cls, run_dir: str) -> JobLog:
        status = rundir.read_status(run_dir)
        folder, jobs = status.get("submitit_folder"), status.get("job_ids") or []
        if status.get("srun_log"):  # a packed point: its own step's srun
            path = Path(status["srun_log"])
        elif folder and jobs:
            path = Path(folder) / f"{jobs[-1]}_0_log.out"
        else:
            return cls(None, "", None)
        text = rundir.tail(path, 200)
        # The log is appended to by every attempt: an earlier one's lines are not this one's.
        starts = list(sbatch.ATTEMPT_STARTS_RE.finditer(text))
        if not starts:
            return cls(path, text, None)
        job, restarts = starts[-1].groups()
        key = rendezvous.attempt_key({"SLURM_JOB_ID": job, "SLURM_RESTART_COUNT": restarts})
        return cls(path, text[starts[-1].end() :].partition("\n")[2], key)

    def srun_failure(self) -> dict[str, Any] | None:
        """The first task srun reported as failed (rank, host, how).

        srun names the task that failed first, before those it then terminated, which the
        ranks' records cannot do for a task killed by SIGKILL (it records nothing).
        """
        match = _SRUN_TASK_ERROR.search(self.text)
        if not match:
            return None
        host, rank, how = match.groups()
        reason = {"Killed": "killed by SIGKILL", "Terminated": "killed by SIGTERM"}.get(how.strip(), how.strip())
        return {"failed_rank": int(rank), "host": host, "reason": reason}

    def before_tasks(self) -> str:
        """Why an attempt none of whose tasks started ended: its setup (``compute.setup``, the
        deps' lines) or srun itself failed, in the words its log ends with."""
        said = [line.strip() for line in self.text.splitlines() if line.strip()]
        end = f": {said[-1]}" if said else " (its log says nothing)"
        return f"the job ended before any of its tasks started; the end of its log ({self.path}){end}"


def shown_state(run_dir: str | os.PathLike[str], state: str) -> str:
    """A job waiting to run again after a preemption is PREEMPTED (Slurm says PENDING); one that
    accounting says was preempted (STOPPED here) is COMPLETED if its last attempt completed the run.

    The last attempt that ended decides: a requeued job can start again, and its new attempt
    be recorded, before accounting stops saying PENDING. And from Slurm 24.11 on, a job that
    was preempted, then requeued by tfrun (PreemptMode=CANCEL, compute.requeue_on_preempt),
    ends PREEMPTED in accounting when its next attempt completes."""
    if state not in (RunState.PENDING, RunState.STOPPED):
        return state
    if state == RunState.STOPPED:
        return RunState.COMPLETED if last_attempt(run_dir).get("reason") == "completed" else state
    last = last_attempt(run_dir, ended=True)
    return RunState.PREEMPTED if last.get("reason") == "preempted" and last.get("requeued") is not False else state


def ending(run_dir: str, state: str) -> Ending:
    """What Slurm saw of a job's end: its state (as :func:`shown_state` says it) and, for a
    failure or a time limit, the task srun reported first in the last attempt's part of the
    job's log; the ranks' records of that attempt say the rest. A failed attempt that started
    no task ends with the words its log ends with."""
    if state not in (RunState.FAILED, RunState.TIMEOUT):
        return Ending(state=state, scheduler="Slurm")
    log = JobLog.of(run_dir)
    first = log.srun_failure()
    reason = None
    if state == RunState.FAILED and first is None and log.attempt is not None:
        if not any(r.get("attempt") == log.attempt for r in rundir.rank_records(run_dir).values()):
            reason = log.before_tasks()
    return Ending(state=state, first_failure=first, scheduler="Slurm", attempt=log.attempt, reason=reason)


class _LogTail:
    """Prints what a log file gained since the last call."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def pump(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        if data:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()


def _sweep_line(total: int, states: dict[str, str], shown: str) -> str:
    """A live count of states: rewritten in place on a terminal, one line per change otherwise."""
    counts: dict[str, int] = {}
    for state in states.values():
        counts[state] = counts.get(state, 0) + 1
    line = f"tfrun: sweep of {total}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    if line != shown:
        if sys.stderr.isatty():
            print(f"\r{line}   ", end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)
    return line


def show_sweep(view: progress.SweepView | None, plans: Sequence[Plan], states: dict[str, str], shown: str) -> str:
    """The sweep's progress after a poll: the live view on a terminal (drawn from the status
    files this poll just updated: no query of its own), else :func:`_sweep_line`."""
    if view is None:
        return _sweep_line(len(plans), states, shown)
    dirs = [Path(p.run_dir) for p in plans]
    view.show(progress.snapshot(dirs[0].parent, dirs, [rundir.read_status(d) for d in dirs]))
    return shown


def allocation(job: dict[str, str], state: str) -> dict[str, str]:
    """``{"nodes": ...}`` from a job's sacct record while it runs. Before it runs there are
    none, and just after it ends sacct briefly shows only the batch host: the running job's
    list is the allocation (rank 0 also records it from inside the job)."""
    return {"nodes": job["NodeList"]} if state == RunState.RUNNING and job.get("NodeList") else {}


def follow(plans: Sequence[Plan], job_ids: Sequence[str], poll_s: float) -> list[str]:
    """Poll until every job ends (one sacct per poll); print state changes and rank 0's log.

    Ctrl-C detaches: the jobs keep running. Returns the final tfrun state of every plan.
    """
    tail = _LogTail(RunPaths.of(plans[0].run_dir).rank_log(0)) if len(plans) == 1 else None
    last: dict[str, str] = {}
    final: dict[str, str] = {}
    view = progress.sweep_view() if len(plans) > 1 else None
    try:
        _poll(plans, job_ids, poll_s, tail, last, final, view)
    finally:
        if view is not None:
            view.close()
    _await_release(job_ids, tail)
    if len(plans) > 1 and sys.stderr.isatty() and view is None:
        print(file=sys.stderr)
    return [final[j] for j in job_ids]


# How long tfrun waits, once its jobs have ended, for Slurm to end what is left of them: Slurm
# sends SIGTERM, then SIGKILL after KillWait (30 s by default).
RELEASE_WAIT_S = 45.0
RELEASE_POLL_S = 0.5
RELEASE_TOLD_AFTER_S = 2.0


def _completing(job_ids: Sequence[str]) -> dict[str, str] | None:
    """The jobs Slurm is still ending (COMPLETING: processes of theirs still run on a node, or
    its epilog does), with the nodes it waits on; None if the queue did not answer."""
    queued = _squeue(list(job_ids))
    if queued is None:
        return None
    wanted = set(job_ids) | {j.split("_")[0] for j in job_ids}
    return {job: found["NodeList"] for job, found in queued.items() if job in wanted and found["State"] == "COMPLETING"}


def _await_release(job_ids: Sequence[str], tail: _LogTail | None) -> None:
    """Once every job has ended (as accounting says), wait until Slurm has freed their nodes.

    sacct says how a job ended the moment its batch script ends; Slurm then ends what is left
    of it on each node (COMPLETING: processes, an epilog), which a busy or slow node can take
    seconds to do. Returning before would say the run is over while some of it may still run.
    Bounded: a node that cannot end a process is Slurm's to drain. Ctrl-C ends the wait: the
    outcome is known already."""
    with contextlib.suppress(KeyboardInterrupt):
        _wait_while_completing(job_ids, tail)


def _wait_while_completing(job_ids: Sequence[str], tail: _LogTail | None) -> None:
    start = time.monotonic()
    told = False
    while True:
        left = _completing(job_ids)
        waited = time.monotonic() - start
        if tail:  # after the query: once the job has left the queue, nothing more is written
            tail.pump()
        if not left:  # none left, or the queue did not answer: nothing to wait for
            return
        if waited >= RELEASE_WAIT_S:
            print(
                f"tfrun: Slurm is still ending job(s) {_jobs_on(left)} after {waited:.0f} s; not waiting longer",
                file=sys.stderr,
                flush=True,
            )
            return
        if not told and waited >= RELEASE_TOLD_AFTER_S:
            told = True
            print(f"tfrun: waiting for Slurm to end job(s) {_jobs_on(left)}", file=sys.stderr, flush=True)
        time.sleep(RELEASE_POLL_S)


def _jobs_on(found: dict[str, str], shown: int = 5) -> str:
    named = [f"{job} (on {nodes})" if nodes else job for job, nodes in sorted(found.items())]
    more = f" and {len(named) - shown} more" if len(named) > shown else ""
    return ", ".join(named[:shown]) + more


def _poll(
    plans: Sequence[Plan],
    job_ids: Sequence[str],
    poll_s: float,
    tail: _LogTail | None,
    last: dict[str, str],
    final: dict[str, str],
    view: progress.SweepView | None,
) -> None:
    """:func:`follow`'s loop: one query per poll, state changes recorded, progress shown."""
    shown = ""
    while len(final) < len(plans):
        info = query(job_ids)
        for plan, job_id in zip(plans, job_ids):
            if job_id in final:
                continue
            # A job the scheduler did not answer for keeps its last state: never taken as gone.
            state = tfrun_state(info[job_id]["State"]) if job_id in info else last.get(job_id, RunState.PENDING)
            state = shown_state(plan.run_dir, state)
            fields = settle(plan.run_dir, ending(plan.run_dir, state)) if state in FINAL else {"state": state}
            if state != last.get(job_id):
                last[job_id] = state
                rundir.update_status(plan.run_dir, **fields, **allocation(info.get(job_id, {}), state))
                if len(plans) == 1:  # as settled: a hang the watchdog ended is FAILED, not Slurm's CANCELLED
                    print(f"tfrun: job {job_id} {fields['state']}", file=sys.stderr, flush=True)
            if state in FINAL:  # recorded above: a job is first seen final only once
                final[job_id] = fields["state"]
        if tail:
            tail.pump()
        if len(plans) > 1:
            shown = show_sweep(view, plans, last, shown)
        if len(final) < len(plans):
            time.sleep(poll_s)


def _prepare(plan: Plan) -> None:
    os.makedirs(RunPaths.of(plan.run_dir).rank_log(0).parent, exist_ok=True)
    plan.save()


def launch(plans: Sequence[Plan], folder: str) -> list[str]:
    """Write the plans, submit them, record the job ids. Nothing is left queued on error."""
    for plan in plans:
        _prepare(plan)
    try:
        for plan in plans:
            deps.prepare(plan)  # build_on=login: a broken spec fails here, before anything is queued
        job_ids = submit(plans, folder)
    except ConfigError as exc:
        for plan in plans:
            rundir.update_status(
                plan.run_dir,
                run_id=plan.run_id,
                state=RunState.FAILED,
                target="slurm",
                reason=str(exc),
                ended=time.time(),
            )
        raise
    now = time.time()
    for plan, job_id in zip(plans, job_ids):
        earlier = rundir.read_status(plan.run_dir).get("job_ids") or []  # a resumed run keeps its history
        rundir.update_status(
            plan.run_dir,
            run_id=plan.run_id,
            state=RunState.PENDING,
            target="slurm",
            submitit_folder=folder,
            backend=plan.backend,
            job_ids=[*earlier, job_id],
            submitted=now,
            started=now,
            ended=None,
            world_size=len(plan.tasks),
            failed_rank=None,
            reason=None,
            pool=None,
            pool_item=None,
        )  # (an item of a pool resumed as a job of its own)
    return job_ids


def _detached(job_ids: Sequence[str], where: str) -> None:
    print(
        f"tfrun: jobs keep running: {', '.join(job_ids)}\n"
        f"tfrun: follow with `tfrun status {where}` and `tfrun logs {where} -f`",
        file=sys.stderr,
    )


def run(plan: Plan) -> str:
    """Submit one run as one Slurm job and, unless ``compute.wait=false``, follow it."""
    job_ids = launch([plan], sbatch.submitit_folder(plan))
    print(f"tfrun: submitted job {job_ids[0]}; run dir {plan.run_dir}", file=sys.stderr, flush=True)
    if not plan.compute["wait"]:
        _detached(job_ids, plan.run_dir)
        return RunState.PENDING
    try:
        return follow([plan], job_ids, plan.compute["poll_s"])[0]
    except KeyboardInterrupt:
        _detached(job_ids, plan.run_dir)
        return RunState.DETACHED


def run_many(plans: Sequence[Plan], sweep_dir: str) -> list[str]:
    """Submit a sweep as job array(s) and, unless ``compute.wait=false``, follow them all."""
    folder = str(SweepPaths.of(sweep_dir).submitit)
    ordered: list[Plan] = []
    job_ids: list[str] = []
    with progress.busy(f"submitting {len(plans)} run(s) to Slurm") if len(plans) > 1 else contextlib.nullcontext():
        for group in sbatch.parameter_groups(plans):
            job_ids += launch(group, folder)
            ordered += group
    print(
        f"tfrun: submitted {len(ordered)} run(s) as job(s) {', '.join(sorted({j.split('_')[0] for j in job_ids}))}; "
        f"sweep dir {sweep_dir}",
        file=sys.stderr,
        flush=True,
    )
    if not plans[0].compute["wait"]:
        _detached(sorted({j.split("_")[0] for j in job_ids}), sweep_dir)
        return [RunState.PENDING] * len(plans)
    try:
        states = follow(ordered, job_ids, plans[0].compute["poll_s"])
    except KeyboardInterrupt:
        _detached(job_ids, sweep_dir)
        return [RunState.DETACHED] * len(plans)
    by_dir = {p.run_dir: s for p, s in zip(ordered, states)}
    return [by_dir[p.run_dir] for p in plans]
