"""Sweeps: plan every point, then launch them together.

Used by the Hydra launcher plugin (``launchers/hydra_plugins/tfrun_launcher``), which is a
thin adapter around :func:`launch_points`, and by ``tfrun.sweep`` (:func:`run_points`).
Every point is planned (and validated) before anything starts, so one bad point means
nothing is submitted and no run dir is made.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

from tfrun import rundir
from tfrun.errors import ConfigError, RunFailed
from tfrun.paths import SweepPaths
from tfrun.plan import Plan, planner
from tfrun.states import OK, RunState


class SweepOutcome:
    """What the last multirun in this process did; the CLI turns it into an exit code."""

    failed: list[str] = []
    config_error: ConfigError | None = None
    sweep_dir: Path | None = None
    objective: str | None = None
    maximize: bool = True


def record_points(sweep_dir: Path, plans: Sequence[Plan], overrides: Sequence[Sequence[str]], **fields: Any) -> None:
    """Add points to the sweep's index (a tuning sweeper launches several batches), each with
    ``fields`` (a trial's number), in one write: a reader never sees a point without them."""

    def add(index: dict[str, Any]) -> None:
        known = {p["run_dir"] for p in index["points"]}
        for point in index["points"]:  # (one recorded before: its fields are these now)
            if point["run_dir"] in {p.run_dir for p in plans}:
                point.update(fields)
        index["points"] += [
            {"run_id": p.run_id, "run_dir": p.run_dir, "overrides": list(o), **fields}
            for p, o in zip(plans, overrides)
            if p.run_dir not in known
        ]

    rundir.update_json(SweepPaths.of(sweep_dir).index, add, {"points": []})


def record_study(sweep_dir: Path, metric: str, direction: str) -> None:
    """A tuning study's objective and direction, in the sweep's index (``tfrun runs --sweep``
    judges the objective by them)."""
    path = SweepPaths.of(sweep_dir).index
    with rundir.locked(path):
        index = rundir.read_json(path, {"points": []})
        index["objective"] = {"metric": metric, "direction": direction}
        rundir.write_json(path, index)


def record_objective(sweep_dir: Path, plan: Plan, metric: str, value: float | None) -> None:
    """Remember a point's objective value in the sweep's index."""
    rundir.update_point(sweep_dir, plan.run_dir, objective={"metric": metric, "value": value})


def objective_value(plan: Plan, metric: str) -> float | None:
    """The final value of ``metric`` in a finished run's metrics (None if it never recorded it)."""
    from tfrun.tracking.compare import summary

    found = summary(Path(plan.run_dir)).get(metric)
    return found[0] if found else None


def run_points(plans: Sequence[Plan], sweep_dir: Path) -> list[str]:
    """Launch planned points: as the items of a pool (a packed Slurm sweep, a local sweep whose
    points fit one slot), as one submission where their target has one (Slurm's job arrays),
    else one run after another."""
    from tfrun import runner, targets
    from tfrun.plan import pools

    if pools.in_pool(plans):
        return targets.POOL.run_many(plans, sweep_dir)
    if len({p.target for p in plans}) == 1 and targets.get(plans[0].target).batches:
        return targets.get(plans[0].target).run_many(plans, sweep_dir)
    states = []  # points of different shapes (a sweep over nodes, backends): each a run of its own
    for num, plan in enumerate(plans):
        print(f"tfrun: sweep point {num + 1}/{len(plans)}: {plan.run_id}", file=sys.stderr, flush=True)
        states.append(runner.launch(plan, warn=None))
    return states


def _remove_empty_sweep(sweep_dir: Path) -> None:
    """Nothing ran: leave nothing behind, the runs dir Hydra's sweeper made for it included."""
    shutil.rmtree(sweep_dir, ignore_errors=True)
    try:
        sweep_dir.parent.rmdir()
    except OSError:  # not empty (other runs are there) or already gone: it stays as it is
        pass


def launch_points(
    hydra_context: Any,
    config: Any,
    job_overrides: Sequence[Sequence[str]],
    initial_job_idx: int,
    task_function: Any = None,
) -> list[Any]:
    """Plan every point, launch them, and return Hydra JobReturns carrying each run's state."""
    from omegaconf import OmegaConf

    sweep_dir = Path(str(config.hydra.sweep.dir))
    SweepOutcome.sweep_dir, SweepOutcome.objective = sweep_dir, config.tfrun.get("objective")
    SweepOutcome.maximize = "min" not in str(OmegaConf.select(config, "hydra.sweeper.direction", default="maximize"))
    existed = sweep_dir.exists()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    try:
        planned = planner.plan_points(hydra_context.config_loader, config, job_overrides, initial_job_idx)
        planner.refuse_existing(planned)  # a reused sweep dir: before any point is written
    except Exception as exc:  # a point that cannot run (ConfigError), or that Hydra cannot compose
        if not existed or not SweepPaths.of(sweep_dir).index.exists():
            _remove_empty_sweep(sweep_dir)
        if not isinstance(exc, ConfigError):
            raise
        SweepOutcome.config_error = exc
        print(f"tfrun: error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    plans = planner.sweep_requests([one.plan for one in planned])
    returns = [_job(one, hydra_context, task_function) for one in planned]
    for warning in sorted({w for p in plans for w in p.warnings}):
        print(f"tfrun: warning: {warning}", file=sys.stderr)
    record_points(sweep_dir, plans, job_overrides)
    try:
        states = run_points(plans, sweep_dir)
    except ConfigError as exc:  # Slurm rejected the submission: nothing is queued
        SweepOutcome.config_error = exc
        print(f"tfrun: error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    return [_job_return(plan, ret, state, sweep_dir) for plan, ret, state in zip(plans, returns, states)]


def _job(planned: planner.Planned, hydra_context: Any, task_function: Any) -> Any:
    """A planned point as Hydra's job: its run dir and ``.hydra`` files, its JobReturn, and
    the Hydra callbacks a job gets (``on_job_start``/``on_job_end``: here, once it is planned)."""
    from hydra.core.utils import JobReturn, JobRuntime, JobStatus
    from omegaconf import OmegaConf

    planned.write()
    # A point planned from resolved values has no composition, and none is made for this:
    # Hydra reads a JobReturn's configs only in its callbacks, and a sweep with callbacks is
    # composed point by point (PointComposer.resolved).
    ret = JobReturn(
        overrides=planned.overrides,
        cfg=planned.config if planned.composed else None,
        hydra_cfg=planned.hydra if planned.composed else None,
        working_dir=os.getcwd(),
        task_name=JobRuntime.instance().get("name"),
        status=JobStatus.COMPLETED,
    )
    ret.return_value = planned.plan
    callbacks = getattr(hydra_context, "callbacks", None)
    if callbacks is not None and planned.composed and planned.hydra.hydra.get("callbacks"):
        whole = OmegaConf.merge(planned.config, planned.hydra)
        callbacks.on_job_start(config=whole, task_function=task_function)
        callbacks.on_job_end(config=whole, job_return=ret)
    return ret


def _job_return(plan: Plan, ret: Any, state: str, sweep_dir: Path) -> Any:
    """The Hydra JobReturn of a point: its state, or with ``tfrun.objective`` the metric's
    final value (a tuning sweeper such as Optuna optimises it; a failed run is a failed trial)."""
    from hydra.core.utils import JobStatus

    from tfrun.tracking import mlflow_sync

    mlflow_sync.sync_if_asked(plan.run_dir, state)
    metric = plan.config["tfrun"].get("objective")
    if state not in OK:
        SweepOutcome.failed.append(plan.run_id)
    if not metric:
        ret.return_value = str(
            state
        )  # the word, not the enum: a Hydra callback may write it out (YAML refuses an enum)
        return ret
    value = objective_value(plan, metric) if state == RunState.COMPLETED else None
    record_objective(sweep_dir, plan, metric, value)
    if value is None:
        ret.status = JobStatus.FAILED
        ret.return_value = RunFailed(
            f"run {plan.run_id} {state}"
            + ("" if state != RunState.COMPLETED else f" without recording the objective metric {metric!r}")
        )
    else:
        ret.return_value = value
    return ret
