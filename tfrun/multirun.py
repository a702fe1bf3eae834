"""Multirun: plan every point of a sweep, then launch them together.

Used by the Hydra launcher plugin (``launchers/hydra_plugins/tfrun_launcher``), which is a
thin adapter around :func:`launch_points`. Every point is planned (and validated) before
anything starts, so one bad point means nothing is submitted.
"""
from __future__ import annotations

import os
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


def plan_points(hydra_context: Any, config: Any, job_overrides: Sequence[Sequence[str]],
                initial_job_idx: int) -> list[tuple[Plan, Any]]:
    """(plan, Hydra JobReturn) per point; each point's run dir gets its ``.hydra`` files."""
    from omegaconf import open_dict

    from tfrun.config import points as composer

    compose = composer.install(hydra_context)
    found = []
    try:
        for offset, overrides in enumerate(job_overrides):
            idx = initial_job_idx + offset
            # A sweeper (Optuna's, say) names trainer keys plainly; they are free-form: add-or-set.
            overrides = [("++" + o) if o.startswith("trainer.") else o for o in overrides]
            sweep_config = compose.take(config, overrides)
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = idx
                sweep_config.hydra.job.num = idx
            found.append(_plan_job(hydra_context, sweep_config))
    finally:
        compose.forget_points()  # the validated compositions of this batch are used or dead
    return found


def _plan_job(hydra_context: Any, config: Any) -> tuple[Plan, Any]:
    """Hydra's ``run_job`` for a point whose job is to be planned: the output dir, its
    ``.hydra/`` files, ``HydraConfig`` set while planning, a JobReturn. Without Hydra's
    per-job logging set-up and its copies of the config (a third of the time to plan a
    point); with Hydra callbacks configured, Hydra's own ``run_job`` runs them."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import JobReturn, JobRuntime, JobStatus, run_job
    from omegaconf import OmegaConf, open_dict, read_write

    from tfrun.config.compose import save_yaml

    if config.hydra.get("callbacks"):
        ret = run_job(hydra_context=hydra_context, task_function=_plan_point, config=config,
                      job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    else:
        output_dir = Path(str(config.hydra.sweep.dir), str(config.hydra.sweep.subdir)).absolute()
        before = HydraConfig.instance().cfg
        with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
            config.hydra.runtime.output_dir = str(output_dir)
        HydraConfig.instance().set_config(config)
        ret = JobReturn(overrides=OmegaConf.to_container(config.hydra.overrides.task),
                        hydra_cfg=HydraConfig.instance().cfg, working_dir=os.getcwd())
        # The point's config is this point's own (a copy made for it): the task config is
        # that config without its hydra node, which HydraConfig now holds (as in run_job,
        # minus a copy of the whole config per point).
        ret.cfg = config
        with read_write(config), open_dict(config):
            del config["hydra"]
        output_dir.mkdir(parents=True, exist_ok=True)
        if ret.hydra_cfg.hydra.output_subdir is not None:
            hydra_output = output_dir / str(ret.hydra_cfg.hydra.output_subdir)
            save_yaml(ret.cfg, hydra_output / "config.yaml")
            save_yaml(ret.hydra_cfg, hydra_output / "hydra.yaml")
            save_yaml(ret.hydra_cfg.hydra.overrides.task, hydra_output / "overrides.yaml")
        try:
            ret.return_value, ret.status = _plan_point(ret.cfg), JobStatus.COMPLETED
        except Exception as exc:
            ret.return_value, ret.status = exc, JobStatus.FAILED
        finally:
            HydraConfig.instance().cfg = before
        ret.task_name = JobRuntime.instance().get("name")
    if ret.status == JobStatus.FAILED:
        raise ret._return_value  # a ConfigError for this point: stop before anything runs
    return ret.return_value, ret


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
