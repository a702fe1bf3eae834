"""The state of runs, and stopping them: what ``tfrun status|cancel|...`` and the Python API
share. They read the run dir and, for Slurm runs not yet finished, ask Slurm about all the
jobs concerned in one ``sacct`` call."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from tfrun import rundir
from tfrun.errors import UsageError
from tfrun.paths import RunPaths, SweepPaths, is_run_dir
from tfrun.states import FINAL, RunState
from tfrun.targets import progress


def run_dirs_of(path: Path) -> list[Path]:
    """The run dirs a path stands for: itself, or every point of a sweep."""
    if is_run_dir(path):
        return [path]
    index = rundir.read_json(SweepPaths.of(path).index)
    if index:
        return [Path(p["run_dir"]) for p in index["points"]]
    points = [p for p in sorted(path.iterdir(), key=lambda p: (len(p.name), p.name)) if is_run_dir(p)]
    if not points:
        raise UsageError(f"{path} is neither a run dir nor a sweep dir")
    return points


def refresh(run_dirs: Sequence[Path]) -> list[dict[str, Any]]:
    """Current status of each run; unfinished Slurm runs (and the allocations of the pools that
    hold unfinished items) are updated from one sacct call. A sweep whose last point is seen
    ending has its MLflow parent run closed."""
    statuses = _refreshed(run_dirs)
    for sweep_dir in {Path(d).parent for d in run_dirs if SweepPaths.of(Path(d).parent).mlflow.exists()}:
        from tfrun.tracking import mlflow_sync

        try:
            mlflow_sync.finish_sweep_if_ended(sweep_dir)
        except Exception as exc:  # a run's state must not depend on the tracking server
            print(f"tfrun: warning: could not close sweep {sweep_dir.name}'s MLflow run: {exc}", file=sys.stderr)
    return statuses


def _refreshed(run_dirs: Sequence[Path]) -> list[dict[str, Any]]:
    statuses = [rundir.read_status(d) for d in run_dirs]
    unfinished = [(d, s) for d, s in zip(run_dirs, statuses) if s.get("state") not in FINAL]
    pooled = [(d, s) for d, s in unfinished if s.get("pool")]  # their own status is their state
    live = [(d, s) for d, s in unfinished if not s.get("pool") and s.get("target") == "slurm" and s.get("job_ids")]
    if not live and not pooled:
        return statuses
    from tfrun.targets import slurm

    jobs = [j for _, s in live for j in s["job_ids"]]
    if pooled:
        from tfrun.targets import pool

        jobs += pool.allocations_of([s for _, s in pooled])
    info = slurm.query(jobs) if jobs else {}
    if pooled:
        pool.refresh_items(pooled, info)
    for run_dir, status in live:
        job = info.get(status["job_ids"][-1])
        if not job:
            continue
        state = slurm.shown_state(run_dir, slurm.tfrun_state(job["State"]))
        fields = slurm.settle(str(run_dir), state) if state in FINAL else {"state": state}
        status.update(rundir.update_status(run_dir, **slurm.allocation(job, state), **fields))
        if state in FINAL:
            from tfrun.tracking import mlflow_sync

            mlflow_sync.sync_if_asked(run_dir, fields["state"])
    return statuses


def _lost(run_dir: Path, status: dict[str, Any]) -> dict[str, Any]:
    """A local run not ended whose launcher (on this host) is gone: LOST, for it will not end
    by itself. Read again first: the launcher records the end just before it exits."""
    if (status.get("target") != "local" or status.get("state") in FINAL or not status.get("launcher_pid")
            or status.get("launcher_started") is None
            or status.get("launcher_host") != rundir.hostname() or _is_the_launcher(int(status["launcher_pid"]), status)):
        return status
    status = rundir.read_status(run_dir)
    return status if status.get("state") in FINAL else {**status, "state": RunState.LOST}


def current(run_dirs: Sequence[Path]) -> list[dict[str, Any]]:
    """Each run's status now (:func:`refresh`), a local run whose launcher is gone being
    LOST (:data:`tfrun.states.RunState.LOST`): it will not end by itself."""
    return [_lost(d, s) for d, s in zip(run_dirs, refresh(run_dirs))]


def snapshot(path: Path) -> progress.Snapshot:
    """The progress of a run or sweep now (``tfrun watch``): one :func:`refresh`, so at most
    one scheduler query for all its runs."""
    dirs = run_dirs_of(path)
    return progress.snapshot(path, dirs, current(dirs))


def in_use(launches: Sequence[Mapping[str, Any]]) -> list[bool]:
    """For each launch (a run dir and the process that launched it: ``run_dir``,
    ``launcher_host``, ``launcher_pid``, ``launcher_started``): may the run still start or
    run a task? Queued, running, requeued, or still being launched: yes; ended, LOST, or its
    run dir gone: no. Reads only, writes nothing (the runs may be other users'): unfinished
    Slurm runs are asked about in one scheduler query."""
    dirs = [Path(launch["run_dir"]) for launch in launches]
    statuses = [_readable_status(d) for d in dirs]
    waiting = [s["job_ids"][-1] for s in statuses if s and s.get("target") == "slurm"
               and s.get("state") not in FINAL and s.get("job_ids")]
    jobs: dict[str, dict[str, str]] = {}
    if waiting:
        from tfrun.targets import slurm

        jobs = {job: {**info, "State": slurm.tfrun_state(info["State"])} for job, info in slurm.query(waiting).items()}
    return [_may_run(d, s, launch, jobs) for d, s, launch in zip(dirs, statuses, launches)]


def _readable_status(run_dir: Path) -> dict[str, Any] | None:
    """A run's status; None if its run dir is gone; an unknown state if it cannot be read."""
    try:
        return rundir.read_status(run_dir) if run_dir.is_dir() else None
    except (OSError, ValueError):  # another user's run dir: what it is doing cannot be told
        return {"state": RunState.UNKNOWN}


def _may_run(run_dir: Path, status: dict[str, Any] | None, launch: Mapping[str, Any],
             jobs: Mapping[str, Mapping[str, str]]) -> bool:
    if status is None:
        return False
    state = status.get("state")
    if state is None:  # no status yet: being launched, if its launcher lives (here; elsewhere, assume so)
        return launch.get("launcher_host") != rundir.hostname() or _is_the_launcher(int(launch["launcher_pid"]), launch)
    if state in FINAL:
        return False
    if status.get("target") == "slurm" and status.get("job_ids"):
        job = jobs.get(status["job_ids"][-1])
        return job is None or job["State"] not in FINAL  # a job Slurm does not know: assume so
    return _lost(run_dir, status).get("state") != RunState.LOST or _tasks_alive(run_dir)


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


def _cancel_in_this_process(run_dir: Path) -> bool:
    from tfrun.targets import local

    return local.cancel_in_process(run_dir)


def _is_the_launcher(pid: int, status: Mapping[str, Any]) -> bool:
    """Is ``pid`` still the process that launched this run? Its start time must be the one
    recorded at launch (pids are reused: a SIGTERM must never reach another process)."""
    started = rundir.process_started(pid)
    recorded = status.get("launcher_started")
    if started is None or recorded is None:  # no such process, or a run recorded without it
        return False
    return abs(started - float(recorded)) < 1.0


def cancel(path: Path) -> list[str]:
    """Cancel a run or every unfinished point of a sweep; what was cancelled. A pool's item is
    cancelled alone; a whole sweep or study in a pool ends its pool."""
    dirs = run_dirs_of(path)
    if not is_run_dir(path):
        # First, so that a study's follower sees it before it sees its trials end: it starts no more.
        SweepPaths.of(path).cancel_request.touch()
    statuses = refresh(dirs)
    done = []
    pooled = [(d, s) for d, s in zip(dirs, statuses) if s.get("pool")]
    if pooled:
        from tfrun.targets import pool

        done += pool.cancel_items([d for d, _ in pooled], [s for _, s in pooled], whole=not is_run_dir(path))
    rest = [(d, s) for d, s in zip(dirs, statuses) if not s.get("pool")]
    job_ids = sorted({j.split("_")[0] if len(dirs) > 1 else j for _, s in rest
                      if s.get("state") not in FINAL for j in s.get("job_ids", [])})
    if job_ids:
        from tfrun.targets import slurm

        slurm.cancel(job_ids)
    for run_dir, status in rest:
        if status.get("state") in FINAL:
            continue
        name = status.get("run_id", run_dir.name)
        pid = status.get("launcher_pid")
        if status.get("target") == "local" and _cancel_in_this_process(run_dir):
            pass  # launched by this process (tfrun.launch(wait=False))
        elif status.get("target") == "local" and pid and status.get("launcher_host") == rundir.hostname():
            if _is_the_launcher(int(pid), status):
                # Asked, never signalled: the launcher may be a notebook or a study follower
                # running other things; it stops its tasks and records CANCELLED.
                RunPaths.of(run_dir).cancel_request.touch()
            else:  # gone; its pid may belong to another process by now
                rundir.update_status(run_dir, state=RunState.CANCELLED, ended=time.time(),
                                     reason=f"cancelled with tfrun cancel (its launcher, pid {pid}, had ended)")
        else:
            rundir.update_status(run_dir, state=RunState.CANCELLED, ended=time.time(),
                                 reason="cancelled with tfrun cancel")
        done.append(name + (f" (job {', '.join(status.get('job_ids', []))})" if status.get("job_ids") else ""))
    return done
