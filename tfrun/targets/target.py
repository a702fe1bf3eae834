"""What every compute target does for a run, as Hydra's ``Launcher`` and torchx's ``Scheduler``
are interfaces over where jobs go: start and follow (``run``, ``run_many``), bring a status up to
date (``poll``), ``cancel``, and ``signal`` (a stop request). Three implement it: this machine's
processes (:class:`LocalTarget`), one Slurm job per run or one array per sweep
(:class:`SlurmTarget`), and the items of a warm pool, on Slurm or here (:class:`PoolTarget`).

Requeues and logs are no target's methods: a requeue is decided inside the job, the only place
that sees its signals and its time limit (:mod:`tfrun.task.requeue`, one rule for every target),
and every target's ranks write their logs into the run dir (:class:`tfrun.paths.RunPaths`).

The runner (:mod:`tfrun.runner`) asks a target for these and never looks at which one it has;
:func:`tfrun.targets.get` and :func:`tfrun.targets.of` are the one place a name or a status
becomes a target.
"""

from __future__ import annotations

import os
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Mapping, Sequence

from tfrun import rundir
from tfrun.errors import TfrunError
from tfrun.paths import RunPaths
from tfrun.states import FINAL, RunState

if TYPE_CHECKING:
    from tfrun.plan import Plan

Statuses = Sequence[tuple[Path, dict[str, Any]]]  # (run dir, its status, updated in place by poll)


class Target(ABC):
    """Where the tasks of a run are started and how they are followed."""

    name: str
    batches = False  # does run_many start a sweep's points as one submission (Slurm's job arrays)?
    # Does a run's life need the process that started it (its tasks are its children), or can it
    # be handed to a scheduler and followed from anywhere (compute.wait=false)?
    follows_here = False

    @abstractmethod
    def run(self, plan: Plan, out: IO[bytes] | None = None) -> str:
        """Start the plan's tasks and follow them to their end (with ``compute.wait=false``, until
        they are in the scheduler's hands); the run's state then. ``out``: where the tasks' output
        is shown, if the target shows it here."""

    def submit(self, plan: Plan, folder: Path) -> str:
        """Hand the run to the scheduler without following it (a tuning study follows its
        trials itself); its job id. Only for a target that does not follow its runs here."""
        raise TfrunError(f"a {self.name} run is not handed to a scheduler: the process that starts it follows it")

    def run_many(self, plans: Sequence[Plan], sweep_dir: Path) -> list[str]:
        """The points of a sweep, each one's state; by default one run after another."""
        return [self.run(plan) for plan in plans]

    def jobs(self, statuses: Statuses) -> list[str]:
        """The scheduler's jobs :meth:`poll` needs to know about (one query for every target)."""
        return []

    def poll(self, statuses: Statuses, info: dict[str, dict[str, str]]) -> None:
        """Bring unfinished runs' statuses up to date from ``info`` (the scheduler's records of
        :meth:`jobs`), in their files and in place. A run that follows itself has nothing to do."""

    def starting(self, run_dir: Path) -> threading.Event | None:
        """For a run this process is about to run in a thread of its own (a target that
        follows its runs here): an event set once the run's tasks have been started; until
        then a task that cannot start may still fail the launch. None for other targets."""
        return None

    def abandoned(self, status: dict[str, Any]) -> bool:
        """Will this unfinished run not end by itself (nothing follows it any more)?"""
        return False

    def may_run(self, run_dir: Path, status: dict[str, Any], info: Mapping[str, Mapping[str, str]]) -> bool:
        """May this unfinished run still start or run a task (``info``: the scheduler's records
        of :meth:`jobs`)? Read only: the run may be another user's."""
        return True

    @abstractmethod
    def cancel(self, statuses: Statuses, whole: bool) -> list[str]:
        """Cancel unfinished runs (``whole``: every point of a sweep or study); what was cancelled."""

    @abstractmethod
    def signal(self, run_dir: Path, status: dict[str, Any], signum: int) -> None:
        """Send ``signum`` to the run's tasks (a stop request: they back up and stop)."""


class LocalTarget(Target):
    """Processes on this machine, followed by the process that started them."""

    name = "local"
    follows_here = True

    def run(self, plan: Plan, out: IO[bytes] | None = None) -> str:
        from tfrun.targets import local

        return local.run(plan, out)

    def starting(self, run_dir: Path) -> threading.Event | None:
        from tfrun.targets import local

        return local.starting(run_dir)

    def abandoned(self, status: dict[str, Any]) -> bool:
        # Its launcher follows it; one on this host that is gone recorded no end: it never will.
        # (One on another host cannot be looked at from here.)
        pid = status.get("launcher_pid")
        if not pid or status.get("launcher_started") is None or status.get("launcher_host") != rundir.hostname():
            return False
        return not launcher_alive(int(pid), status)

    def may_run(self, run_dir: Path, status: dict[str, Any], info: Mapping[str, Mapping[str, str]]) -> bool:
        return not self.abandoned(status) or _tasks_alive(run_dir)

    def cancel(self, statuses: Statuses, whole: bool) -> list[str]:
        from tfrun.targets import local

        done = []
        for run_dir, status in statuses:
            if status.get("state") in FINAL:
                continue
            pid = status.get("launcher_pid")
            if local.cancel_in_process(run_dir):
                pass  # launched by this process (tfrun.launch(wait=False))
            elif pid and status.get("launcher_host") == rundir.hostname():
                if launcher_alive(int(pid), status):
                    # Asked, never signalled: the launcher may be a notebook or a study follower
                    # running other things; it stops its tasks and records CANCELLED.
                    RunPaths.of(run_dir).cancel_request.touch()
                else:  # gone; its pid may belong to another process by now
                    rundir.update_status(
                        run_dir,
                        state=RunState.CANCELLED,
                        ended=time.time(),
                        reason=f"cancelled with tfrun cancel (its launcher, pid {pid}, had ended)",
                    )
            else:
                rundir.update_status(
                    run_dir, state=RunState.CANCELLED, ended=time.time(), reason="cancelled with tfrun cancel"
                )
            done.append(str(status.get("run_id", run_dir.name)))
        return done

    def signal(self, run_dir: Path, status: dict[str, Any], signum: int) -> None:
        for record in rundir.rank_records(run_dir).values():
            if record.get("ended") is None and record.get("pid") and record.get("host") == rundir.hostname():
                try:
                    os.kill(int(record["pid"]), signum)
                except ProcessLookupError:  # it has just ended: there is nothing to signal
                    pass


class SlurmTarget(Target):
    """One Slurm job per run (a job array per sweep), submitted with the request the plan rendered."""

    name = "slurm"
    batches = True

    def run(self, plan: Plan, out: IO[bytes] | None = None) -> str:
        from tfrun.targets import slurm

        return slurm.run(plan)

    def submit(self, plan: Plan, folder: Path) -> str:
        from tfrun.targets import slurm

        return slurm.launch([plan], str(folder))[0]

    def run_many(self, plans: Sequence[Plan], sweep_dir: Path) -> list[str]:
        from tfrun.targets import slurm

        return slurm.run_many(plans, str(sweep_dir))

    def jobs(self, statuses: Statuses) -> list[str]:
        return [j for _, s in statuses if s.get("job_ids") for j in s["job_ids"]]

    def poll(self, statuses: Statuses, info: dict[str, dict[str, str]]) -> None:
        from tfrun.targets import slurm
        from tfrun.targets.settle import settle
        from tfrun.tracking import mlflow_sync

        for run_dir, status in statuses:
            job = info.get(status["job_ids"][-1]) if status.get("job_ids") else None
            if not job:
                continue
            state = slurm.shown_state(run_dir, slurm.tfrun_state(job["State"]))
            fields = settle(str(run_dir), slurm.ending(str(run_dir), state)) if state in FINAL else {"state": state}
            status.update(rundir.update_status(run_dir, **slurm.allocation(job, state), **fields))
            if state in FINAL:
                mlflow_sync.sync_if_asked(run_dir, fields["state"])

    def may_run(self, run_dir: Path, status: dict[str, Any], info: Mapping[str, Mapping[str, str]]) -> bool:
        from tfrun.targets import slurm

        job = info.get(status["job_ids"][-1]) if status.get("job_ids") else None
        return job is None or slurm.tfrun_state(job["State"]) not in FINAL  # a job Slurm does not know: assume so

    def cancel(self, statuses: Statuses, whole: bool) -> list[str]:
        from tfrun.targets import slurm

        # A sweep's points are cancelled by their arrays, one run by its job.
        job_ids = sorted(
            {
                j.split("_")[0] if whole else j
                for _, s in statuses
                if s.get("state") not in FINAL
                for j in s.get("job_ids", [])
            }
        )
        if job_ids:
            slurm.cancel(job_ids)
        done = []
        for run_dir, status in statuses:
            if status.get("state") in FINAL:
                continue
            rundir.update_status(
                run_dir, state=RunState.CANCELLED, ended=time.time(), reason="cancelled with tfrun cancel"
            )
            jobs = status.get("job_ids", [])
            done.append(str(status.get("run_id", run_dir.name)) + (f" (job {', '.join(jobs)})" if jobs else ""))
        return done

    def signal(self, run_dir: Path, status: dict[str, Any], signum: int) -> None:
        import signal

        from tfrun.targets import slurm

        if not status.get("job_ids"):
            return
        job = status["job_ids"][-1]
        # Each request is for the job's state only: Slurm refuses a signal to a job that is not
        # running, after retrying for a minute and a half. A job that waits has nothing to back
        # up: it is cancelled.
        slurm.scancel(["--state=PENDING", job])
        slurm.scancel(["--state=RUNNING", f"--signal={signal.Signals(signum).name.removeprefix('SIG')}", job])


class PoolTarget(Target):
    """The items of a warm pool (packed sweep points, tuning trials, a local sweep's points):
    fed to slots its allocations hold; their own statuses say their state."""

    name = "pool"
    batches = True

    def run(self, plan: Plan, out: IO[bytes] | None = None) -> str:
        return self.run_many([plan], Path(plan.run_dir).parent)[0]

    def run_many(self, plans: Sequence[Plan], sweep_dir: Path) -> list[str]:
        from tfrun.targets.pool.sweep import run_sweep

        return run_sweep(plans, sweep_dir)

    def jobs(self, statuses: Statuses) -> list[str]:
        from tfrun.targets import pool

        return pool.allocations_of([s for _, s in statuses])

    def poll(self, statuses: Statuses, info: dict[str, dict[str, str]]) -> None:
        from tfrun.targets import pool

        pool.refresh_items(list(statuses), info)

    def cancel(self, statuses: Statuses, whole: bool) -> list[str]:
        from tfrun.targets import pool

        return pool.cancel_items([d for d, _ in statuses], [s for _, s in statuses], whole=whole)

    def signal(self, run_dir: Path, status: dict[str, Any], signum: int) -> None:
        from tfrun.targets.pool import Pool

        Pool.open(status["pool"]).signal(run_dir, signum)  # its coordinator signals that item's processes only


def _tasks_alive(run_dir: Path) -> bool:
    """Does a task of this local run still run here (its launcher killed, say, and not it)?
    A rank's pid names its task only if that process started before the rank recorded its
    start: a pid reused later belongs to a process started later."""
    for record in rundir.rank_records(run_dir).values():
        if record.get("ended") is None and record.get("pid") and record.get("host") == rundir.hostname():
            started = rundir.process_started(int(record["pid"]))
            if started is not None and started <= float(record.get("started") or 0) + 1.0:
                return True
    return False


def launcher_alive(pid: int, status: dict[str, Any] | Any) -> bool:
    """Is ``pid`` still the process that launched this run? Its start time must be the one
    recorded at launch (pids are reused: a signal must never reach another process)."""
    started = rundir.process_started(pid)
    recorded = status.get("launcher_started")
    if started is None or recorded is None:  # no such process, or a run recorded without it
        return False
    return abs(started - float(recorded)) < 1.0
