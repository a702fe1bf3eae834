"""Multirun: plan every point of a sweep, then launch them together.

Used by the Hydra launcher plugin (``launchers/hydra_plugins/tfrun_launcher``), which is a
thin adapter around :func:`launch_points`. Every point is planned (and validated) before
anything starts, so one bad point means nothing is submitted.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

from tfrun import runs
from tfrun.errors import ConfigError, RunFailed
from tfrun.plan import Plan

SWEEP_FILE = "sweep.json"


class SweepOutcome:
    """What the last multirun in this process did; the CLI turns it into an exit code."""

    failed: list[str] = []
    config_error: ConfigError | None = None
    sweep_dir: Path | None = None
    objective: str | None = None
    maximize: bool = True


def _plan_point(cfg: Any) -> Plan:
    from hydra.core.hydra_config import HydraConfig

    from tfrun.config.compose import to_run_config
    from tfrun.plan import build_plan, in_sweep

    hydra = HydraConfig.get()
    return in_sweep(build_plan(to_run_config(cfg), hydra.runtime.output_dir), Path(hydra.sweep.dir).resolve())


_VALIDATED = "_tfrun_validated"


def reuse_validated_compositions(hydra_context: Any) -> None:
    """Let :func:`plan_points` take the config Hydra's sweeper composed for a point.

    The sweeper composes every point once to validate the batch, then the launcher composes
    it again: on a 200-point sweep that second composition is about 40% of the time to
    submit. Hydra's ``load_sweep_config`` is deterministic for a master config and a list
    of overrides, so the validated config is the one a second call would build. Each is
    handed out once (exact same overrides only) and nothing is kept after the launch.
    """
    loader = hydra_context.config_loader
    if hasattr(loader, _VALIDATED):
        return
    compose = loader.load_sweep_config
    validated: dict[tuple[int, tuple[str, ...]], Any] = {}

    def load_sweep_config(master_config: Any, sweep_overrides: list[str]) -> Any:
        sweep_config = compose(master_config, sweep_overrides)
        validated[(id(master_config), tuple(sweep_overrides))] = sweep_config
        return sweep_config

    loader.load_sweep_config = load_sweep_config
    setattr(loader, _VALIDATED, (validated, compose))


def _compose_point(hydra_context: Any, config: Any, overrides: list[str]) -> Any:
    """The validated composition of these overrides if the sweeper made one, else a new one."""
    loader = hydra_context.config_loader
    validated, compose = getattr(loader, _VALIDATED, ({}, loader.load_sweep_config))
    found = validated.pop((id(config), tuple(overrides)), None)
    return found if found is not None else compose(config, overrides)


def _forget_validated(hydra_context: Any) -> None:
    validated, _ = getattr(hydra_context.config_loader, _VALIDATED, ({}, None))
    validated.clear()


def plan_points(hydra_context: Any, config: Any, job_overrides: Sequence[Sequence[str]],
                initial_job_idx: int) -> list[tuple[Plan, Any]]:
    """(plan, Hydra JobReturn) per point; each point's run dir gets its ``.hydra`` files."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import JobStatus, run_job
    from omegaconf import open_dict

    points = []
    for offset, overrides in enumerate(job_overrides):
        idx = initial_job_idx + offset
        # A sweeper (Optuna's, say) names trainer keys plainly; they are free-form: add-or-set.
        overrides = [("++" + o) if o.startswith("trainer.") else o for o in overrides]
        sweep_config = _compose_point(hydra_context, config, overrides)
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        HydraConfig.instance().set_config(sweep_config)
        ret = run_job(hydra_context=hydra_context, task_function=_plan_point, config=sweep_config,
                      job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        if ret.status == JobStatus.FAILED:
            raise ret._return_value  # a ConfigError for this point: stop before anything runs
        points.append((ret.return_value, ret))
    return points


def record_points(sweep_dir: Path, plans: Sequence[Plan], overrides: Sequence[Sequence[str]]) -> None:
    """Add points to the sweep's index (a tuning sweeper launches several batches)."""
    index = runs.read_json(sweep_dir / SWEEP_FILE, {"points": []})
    known = {p["run_dir"] for p in index["points"]}
    index["points"] += [{"run_id": p.run_id, "run_dir": p.run_dir, "overrides": list(o)}
                        for p, o in zip(plans, overrides) if p.run_dir not in known]
    runs.write_json(sweep_dir / SWEEP_FILE, index)


def record_objective(sweep_dir: Path, plan: Plan, metric: str, value: float | None) -> None:
    """Remember a point's objective value in the sweep's index."""
    index = runs.read_json(sweep_dir / SWEEP_FILE, {"points": []})
    for point in index["points"]:
        if point["run_dir"] == plan.run_dir:
            point["objective"] = {"metric": metric, "value": value}
    runs.write_json(sweep_dir / SWEEP_FILE, index)


def objective_value(plan: Plan, metric: str) -> float | None:
    """The final value of ``metric`` in a finished run's metrics (None if it never recorded it)."""
    from tfrun.compare import summary

    found = summary(Path(plan.run_dir)).get(metric)
    return found[0] if found else None


def best_point(sweep_dir: Path, maximize: bool) -> dict[str, Any] | None:
    """The point with the best objective value so far."""
    index = runs.read_json(sweep_dir / SWEEP_FILE, {"points": []})
    scored = [p for p in index["points"] if (p.get("objective") or {}).get("value") is not None]
    if not scored:
        return None
    return (max if maximize else min)(scored, key=lambda p: p["objective"]["value"])


def run_points(plans: Sequence[Plan], sweep_dir: Path) -> list[str]:
    """Launch planned points: locally one after another, on Slurm as job array(s)."""
    from tfrun import targets
    from tfrun.report import print_outcome

    if {p.target for p in plans} == {"slurm"}:
        from tfrun.targets import pack

        if pack.is_packed(plans):
            return pack.run_packed(plans, str(sweep_dir))
        return targets.get("slurm").run_many(plans, str(sweep_dir))
    states = []
    for num, plan in enumerate(plans):
        print(f"tfrun: sweep point {num + 1}/{len(plans)}: {plan.run_id}", file=sys.stderr, flush=True)
        state = targets.get(plan.target).run(plan)
        print_outcome(plan, state)
        states.append(state)
    return states


def launch_points(hydra_context: Any, config: Any, job_overrides: Sequence[Sequence[str]],
                  initial_job_idx: int) -> list[Any]:
    """Plan every point, launch them, and return Hydra JobReturns carrying each run's state."""
    from omegaconf import OmegaConf

    sweep_dir = Path(str(config.hydra.sweep.dir))
    SweepOutcome.sweep_dir, SweepOutcome.objective = sweep_dir, config.tfrun.get("objective")
    SweepOutcome.maximize = "min" not in str(OmegaConf.select(config, "hydra.sweeper.direction", default="maximize"))
    existed = sweep_dir.exists()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    try:
        points = plan_points(hydra_context, config, job_overrides, initial_job_idx)
    except ConfigError as exc:
        SweepOutcome.config_error = exc
        print(f"tfrun: error: {exc}", file=sys.stderr)
        if not existed or not (sweep_dir / SWEEP_FILE).exists():
            shutil.rmtree(sweep_dir, ignore_errors=True)  # nothing ran: leave nothing behind
        raise SystemExit(2)
    finally:
        _forget_validated(hydra_context)
    plans = [plan for plan, _ in points]
    if all(p.target == "slurm" for p in plans):
        from tfrun.targets.pack import point_requests

        plans = point_requests(plans)
        points = list(zip(plans, [ret for _, ret in points]))
    for warning in sorted({w for p in plans for w in p.warnings}):
        print(f"tfrun: warning: {warning}", file=sys.stderr)
    record_points(sweep_dir, plans, job_overrides)
    try:
        states = run_points(plans, sweep_dir)
    except ConfigError as exc:  # Slurm rejected the submission: nothing is queued
        SweepOutcome.config_error = exc
        print(f"tfrun: error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    return [_job_return(plan, ret, state, sweep_dir) for (plan, ret), state in zip(points, states)]


def _job_return(plan: Plan, ret: Any, state: str, sweep_dir: Path) -> Any:
    """The Hydra JobReturn of a point: its state, or with ``tfrun.objective`` the metric's
    final value (a tuning sweeper such as Optuna optimises it; a failed run is a failed trial)."""
    from hydra.core.utils import JobStatus

    from tfrun import mlflow_sync

    mlflow_sync.sync_if_asked(plan.run_dir, state)
    metric = plan.config["tfrun"].get("objective")
    if state not in runs.OK_STATES:
        SweepOutcome.failed.append(plan.run_id)
    if not metric:
        ret.return_value = state
        return ret
    value = objective_value(plan, metric) if state == "COMPLETED" else None
    record_objective(sweep_dir, plan, metric, value)
    if value is None:
        ret.status = JobStatus.FAILED
        ret.return_value = RunFailed(f"run {plan.run_id} {state}" + ("" if state != "COMPLETED" else
                                     f" without recording the objective metric {metric!r}"))
    else:
        ret.return_value = value
    return ret
