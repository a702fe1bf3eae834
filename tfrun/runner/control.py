"""The state of runs, and stopping them: what ``tfrun status|cancel|...`` and the Python API
share. They read the run dir and, for Slurm runs not yet finished, ask Slurm about all the
jobs concerned in one ``sacct`` call."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from tfrun import rundir
from tfrun.errors import UsageError
from tfrun.paths import SweepPaths, is_run_dir
from tfrun.states import FINAL, RunState
from tfrun.targets import progress
from tfrun.targets.target import launcher_alive


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
    by_target = _by_target([(d, s) for d, s in zip(run_dirs, statuses) if s.get("state") not in FINAL])
    jobs = [job for target, unfinished in by_target for job in target.jobs(unfinished)]
    info: dict[str, dict[str, str]] = {}
    if jobs:
        from tfrun.targets import slurm

        info = slurm.query(jobs)  # one scheduler query for every target's runs
    for target, unfinished in by_target:
        target.poll(unfinished, info)
    return statuses


def _by_target(runs: Sequence[tuple[Path, dict[str, Any]]]) -> list[tuple[Any, list[tuple[Path, dict[str, Any]]]]]:
    """Runs (dir, status) grouped by the target that runs them (:func:`tfrun.targets.of`)."""
    from tfrun import targets

    groups: dict[str, tuple[targets.Target, list[tuple[Path, dict[str, Any]]]]] = {}
    for run_dir, status in runs:
        target = targets.of(status)
        groups.setdefault(target.name, (target, []))[1].append((run_dir, status))
    return list(groups.values())


def _lost(run_dir: Path, status: dict[str, Any]) -> dict[str, Any]:
    """A run not ended that will not end by itself (a local run whose launcher is gone): LOST.
    Read again first: the launcher records the end just before it exits."""
    from tfrun import targets

    if status.get("state") in FINAL or not targets.of(status).abandoned(status):
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
    from tfrun import targets

    dirs = [Path(launch["run_dir"]) for launch in launches]
    statuses = [_readable_status(d) for d in dirs]
    waiting = [
        job for d, s in zip(dirs, statuses) if s and s.get("state") not in FINAL for job in targets.of(s).jobs([(d, s)])
    ]
    jobs: dict[str, dict[str, str]] = {}
    if waiting:
        from tfrun.targets import slurm

        jobs = slurm.query(waiting)
    return [_may_run(d, s, launch, jobs) for d, s, launch in zip(dirs, statuses, launches)]


def _readable_status(run_dir: Path) -> dict[str, Any] | None:
    """A run's status; None if its run dir is gone; an unknown state if it cannot be read."""
    try:
        return rundir.read_status(run_dir) if run_dir.is_dir() else None
    except (OSError, ValueError):  # another user's run dir: what it is doing cannot be told
        return {"state": RunState.UNKNOWN}


def _may_run(
    run_dir: Path, status: dict[str, Any] | None, launch: Mapping[str, Any], jobs: Mapping[str, Mapping[str, str]]
) -> bool:
    if status is None:
        return False
    state = status.get("state")
    if state is None:  # no status yet: being launched, if its launcher lives (here; elsewhere, assume so)
        return launch.get("launcher_host") != rundir.hostname() or launcher_alive(int(launch["launcher_pid"]), launch)
    if state in FINAL:
        return False
    from tfrun import targets

    return targets.of(status).may_run(run_dir, status, jobs)


def cancel(path: Path) -> list[str]:
    """Cancel a run or every unfinished point of a sweep; what was cancelled. A pool's item is
    cancelled alone; a whole sweep or study in a pool ends its pool."""
    dirs = run_dirs_of(path)
    whole = not is_run_dir(path)
    if whole:
        # First, so that a study's follower sees it before it sees its trials end: it starts no more.
        SweepPaths.of(path).cancel_request.touch()
    return [name for target, runs in _by_target(list(zip(dirs, refresh(dirs)))) for name in target.cancel(runs, whole)]


def signal(run_dir: Path, signum: int) -> None:
    """Send ``signum`` to an unfinished run's tasks through its target (SIGUSR2: back up and
    stop); a run that has ended has nothing to signal."""
    from tfrun import targets

    status = rundir.read_status(run_dir)
    if status.get("state") not in FINAL:
        targets.of(status).signal(run_dir, status, signum)
