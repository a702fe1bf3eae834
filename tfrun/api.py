"""tfrun from Python: ``tfrun.launch``, ``tfrun.sweep``, ``tfrun.Run``.

Composes exactly like the command line (same configs, same overrides) and never calls
``sys.exit`` or needs a terminal, so it works from a notebook. Errors are exceptions
(:class:`tfrun.ConfigError` for bad input, nothing started).
"""

from __future__ import annotations

import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from tfrun import rundir
from tfrun.errors import ConfigError, TfrunError
from tfrun.paths import RunPaths
from tfrun.states import ENDED, OK, RunState


class Run:
    """A run directory and what can be done with it."""

    def __init__(self, path: str | Path):
        self.dir = Path(path).resolve()

    @classmethod
    def load(cls, path_or_id: str | Path, runs_dir: str | Path | None = None) -> "Run":
        """Reopen an earlier run by its dir, its id, or a unique part of its id."""
        root = Path(runs_dir) if runs_dir else rundir.runs_root()
        return cls(rundir.find_run(str(path_or_id), root))

    @property
    def id(self) -> str:
        """The run's id (its path under the runs dir)."""
        return str(rundir.read_status(self.dir).get("run_id") or self.dir.name)

    def info(self) -> dict[str, Any]:
        """The whole status record, refreshed from Slurm if the run is not finished (a local
        run whose launcher is gone without recording its end is LOST)."""
        from tfrun.runner.control import current

        return current([self.dir])[0]

    def status(self) -> str:
        """PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, STOPPED, PRUNED or LOST."""
        return str(self.info().get("state", RunState.PENDING))

    def wait(self, timeout_s: float | None = None, poll_s: float = 2.0) -> str:
        """Block until the run ends, or is LOST (its launcher died: it will not end by
        itself), or timeout_s passes; its state."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while (state := self.status()) not in ENDED:
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(poll_s)
        return state

    def logs(self, rank: int = 0) -> str:
        """A rank's log so far."""
        path = RunPaths.of(self.dir).rank_log(rank)
        return path.read_text(errors="replace") if path.exists() else ""

    def metrics(self) -> list[dict[str, Any]]:
        """The run's metric records (Keras epochs and tfrun.log_metric values)."""
        from tfrun.tracking import metrics

        return metrics.read_metrics(RunPaths.of(self.dir).metrics)

    def cancel(self) -> None:
        """Cancel the run if it is not finished."""
        from tfrun.runner.control import cancel

        cancel(self.dir)

    def __repr__(self) -> str:
        return f"Run({self.id!r}, dir={str(self.dir)!r})"


class _Text:
    """A byte sink for the local launcher where sys.stdout has no buffer (notebooks)."""

    def write(self, data: bytes) -> None:
        sys.stdout.write(data.decode(errors="replace"))

    def flush(self) -> None:
        sys.stdout.flush()


def _out() -> Any:
    return getattr(sys.stdout, "buffer", None) or _Text()


def _start(plans: Sequence[Any], wait: bool, sweep_dir: Path | None = None) -> None:
    """Launch planned runs: those a scheduler runs are submitted (followed by Run.wait), those
    this process runs run here, in the foreground or in a thread."""
    from tfrun import runner, targets

    for plan in plans:
        for warning in plan.warnings:
            warnings.warn(warning, stacklevel=3)
    if not targets.get(plans[0].target).follows_here:
        for plan in plans:
            plan.compute["wait"] = False  # the API follows through Run.wait, never a terminal
        if sweep_dir is None:
            runner.launch(plans[0], report=False, warn=None)
        else:
            from tfrun.runner.sweeps import run_points

            run_points(plans, sweep_dir)
        return
    from tfrun.tracking import mlflow_sync

    def run_all() -> None:
        states = []
        for plan in plans:
            states.append(runner.launch(plan, out=_out(), report=False, warn=None))
        if sweep_dir is not None:  # and closes the sweep's parent run, if the points made one
            mlflow_sync.finish_sweep(sweep_dir, failed=any(s not in OK for s in states))

    if wait:
        run_all()
    else:
        _run_in_background(run_all, plans, targets.get(plans[0].target).starting(plans[0].run_dir))


def _run_in_background(run_all: Callable[[], None], plans: Sequence[Any], started: threading.Event | None) -> None:
    """Run ``run_all`` in a thread; return once the first run's tasks have been started
    (``started`` is set: its handle is then usable and a cancel reaches it) or its launch
    failed, which raises here as it would in the foreground. The event, not the run's status:
    the status says RUNNING before the tasks are started, and one that could not start would
    then fail in a thread nobody reads.

    A launch that fails after this returned is in the run's status (local.run records it
    FAILED, and the points of a sweep it did not get to are recorded FAILED too), where
    Run.wait() finds it."""
    assert started is not None, "only a target that follows its runs here runs them in a thread"
    failed: list[BaseException] = []

    def guarded() -> None:
        try:
            run_all()
        except BaseException as exc:  # kept for the caller; the runs' statuses say it too
            failed.append(exc)
            _never_started(plans, exc)

    thread = threading.Thread(target=guarded, daemon=True, name="tfrun-local")
    thread.start()
    while thread.is_alive() and not started.wait(0.05):
        pass
    if failed and not thread.is_alive():
        raise failed[0]


def _never_started(plans: Sequence[Any], exc: BaseException) -> None:
    """The runs a failed launch did not get to (the later points of a sweep, or a run whose
    launch failed before it wrote a status): FAILED, so that Run.wait() returns."""
    for plan in plans:
        try:
            if not rundir.read_status(plan.run_dir).get("state"):
                rundir.update_status(
                    plan.run_dir,
                    run_id=plan.run_id,
                    state=RunState.FAILED,
                    target=plan.target,
                    ended=time.time(),
                    reason=f"not started: the launch failed ({type(exc).__name__}: {exc})",
                )
        except OSError:  # its run dir cannot be written either: the exception the caller gets says why
            continue


def _overrides(overrides: Sequence[str]) -> list[str]:
    from tfrun.config.compose import normalize_overrides

    return normalize_overrides([str(o) for o in overrides])


def _config_dir(config_dir: str | None) -> str | None:
    """As on the command line: ./conf is the project's config dir unless one is given."""
    return config_dir if config_dir is not None or not Path("conf").is_dir() else str(Path("conf").resolve())


def _raise_config_error(exc: Exception, overrides: list[str], config_dir: str | None) -> None:
    """Hydra's and OmegaConf's composition errors become the ConfigError the CLI would print."""
    if type(exc).__module__.startswith(("hydra", "omegaconf")):
        from tfrun.config.explain import explain

        raise ConfigError(explain(exc, overrides, config_dir)) from exc


def launch(overrides: Sequence[str] = (), config_dir: str | None = None, wait: bool = True) -> Run:
    """Compose a run like ``tfrun OVERRIDES``, start it and return its handle.

    ``wait=True`` blocks until it ends (see ``Run.status()``); a failed run is not an
    exception, a wrong configuration is (:class:`tfrun.ConfigError`).
    """
    from tfrun.config import resolvers
    from tfrun.plan.planner import plan_run

    resolvers.reset_run_id()
    overrides, config_dir = _overrides(overrides), _config_dir(config_dir)
    try:
        planned = plan_run(overrides, config_dir=config_dir)
    except Exception as exc:
        _raise_config_error(exc, overrides, config_dir)
        raise
    planned.write()
    plan = planned.plan
    _start([plan], wait)
    run = Run(plan.run_dir)
    if wait:
        run.wait()
    return run


def sweep(overrides: Sequence[str] = (), config_dir: str | None = None, wait: bool = True) -> list[Run]:
    """Like ``tfrun -m OVERRIDES`` (grid sweeps): the runs of every point."""
    from tfrun.config import resolvers
    from tfrun.plan.planner import plan_sweep, refuse_existing, sweep_requests
    from tfrun.runner.sweeps import record_points

    resolvers.reset_run_id()
    overrides, config_dir = _overrides(overrides), _config_dir(config_dir)
    try:
        planned = plan_sweep(overrides, config_dir=config_dir)
    except Exception as exc:
        _raise_config_error(exc, overrides, config_dir)
        raise
    if not planned:
        raise TfrunError("the sweep has no points")
    refuse_existing(planned)
    for one in planned:  # once every point is planned: a bad point leaves no run dirs behind
        one.write()
    plans = sweep_requests([one.plan for one in planned])
    sweep_dir = Path(plans[0].run_dir).parent
    record_points(sweep_dir, plans, [one.overrides for one in planned])
    _start(plans, wait, sweep_dir)
    handles = [Run(p.run_dir) for p in plans]
    if wait:
        for handle in handles:
            handle.wait()
    return handles
