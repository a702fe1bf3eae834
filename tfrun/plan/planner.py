"""Overrides -> plans: the one path every entry takes.

``tfrun``, ``tfrun --dry-run`` and ``tfrun.launch`` plan a single run with :func:`plan_run`;
``tfrun --dry-run -m`` and ``tfrun.sweep`` plan a grid sweep with :func:`compose_plans`;
``tfrun -m`` gets its points from Hydra's sweeper plugin, and the launcher plugin plans
them with :func:`plan_points`, the function :func:`compose_plans` uses too. Every config is
composed by :mod:`tfrun.config.compose` over the same search path, and every composed
config becomes a plan in :func:`plan_composed`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, open_dict, read_write

from tfrun.config import compose, hydra_files, points
from tfrun.errors import ConfigError
from tfrun.plan.build import build_plan, in_sweep
from tfrun.plan.packing import point_requests
from tfrun.rundir import Plan


class TuningStudy(ConfigError):
    """A sweep whose points a tuning study chooses while it runs (``hydra/sweeper=tfrun``):
    ``--dry-run -m`` shows the study instead (:func:`tfrun.targets.tuning.preview`)."""


@dataclass(frozen=True)
class Planned:
    """A plan and the composition it came from (what the run dir's ``.hydra`` files hold)."""

    plan: Plan
    config: DictConfig  # the run's config without its hydra node
    hydra: DictConfig  # only the hydra node, as HydraConfig holds it

    @property
    def overrides(self) -> list[str]:
        """The overrides that made this run (a sweep point's own)."""
        return list(self.hydra.hydra.overrides.task)

    def write(self) -> None:
        """Create the run dir with its ``.hydra`` files, as Hydra's app would."""
        hydra_files.write(self.config, self.hydra, self.plan.run_dir)


def plan_composed(cfg: DictConfig, output_dir: str, sweep_dir: Path | None = None) -> Planned:
    """Plan a composed config (hydra node included) whose run dir is ``output_dir``.

    ``HydraConfig`` holds the run's hydra node while its config is resolved, so that
    ``${hydra:...}`` interpolations mean this run, as in Hydra's own jobs.
    """
    from hydra.core.hydra_config import HydraConfig

    with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
        cfg.hydra.runtime.output_dir = output_dir
    holder = HydraConfig.instance()
    before = holder.cfg
    holder.set_config(cfg)
    hydra = holder.cfg
    try:
        with read_write(cfg), open_dict(cfg):
            del cfg["hydra"]
        plan = build_plan(compose.to_run_config(cfg), output_dir)
    finally:
        holder.cfg = before
    if sweep_dir is not None:
        plan = in_sweep(plan, sweep_dir)
    return Planned(plan, cfg, hydra)


def plan_run(overrides: Sequence[str], config_dir: str | None = None,
             config_name: str = compose.CONFIG_NAME) -> Planned:
    """A single run: composed and planned, its run dir not created yet (:meth:`Planned.write`)."""
    with compose.session(config_dir):
        cfg = compose.compose_run(list(overrides), config_name)
        with open_dict(cfg):
            cfg.hydra.job.num = 0
        return plan_composed(cfg, str(Path(cfg.hydra.run.dir).resolve()))


def plan_points(loader: Any, sweep: DictConfig, job_overrides: Sequence[Sequence[str]],
                initial_job_idx: int = 0) -> list[Planned]:
    """Plan a batch of a sweep's points (``sweep``: the multirun's config), each composed by
    the loader's :class:`tfrun.config.points.PointComposer`. Nothing is written: a bad
    point raises before any run dir exists."""
    composer = points.install(loader)
    sweep_dir = Path(str(sweep.hydra.sweep.dir)).resolve()
    planned = []
    try:
        for offset, overrides in enumerate(job_overrides):
            # A sweeper (Optuna's, say) names trainer keys plainly; they are free-form: add-or-set.
            cfg = composer.take(sweep, compose.normalize_overrides(list(overrides)))
            idx = initial_job_idx + offset
            with open_dict(cfg):
                cfg.hydra.job.id = idx
                cfg.hydra.job.num = idx
            output_dir = os.path.abspath(os.path.join(str(cfg.hydra.sweep.dir), str(cfg.hydra.sweep.subdir)))
            planned.append(plan_composed(cfg, output_dir, sweep_dir))
    finally:
        composer.forget_points()  # the validated compositions of this batch are used or dead
    return planned


def sweep_requests(plans: Sequence[Plan]) -> list[Plan]:
    """A sweep's plans as it will be submitted: on Slurm, packed points become job steps."""
    if plans and all(p.target == "slurm" for p in plans):
        return point_requests(plans)
    return list(plans)


def plan_sweep(overrides: Sequence[str], config_dir: str | None = None,
               config_name: str = compose.CONFIG_NAME) -> list[Planned]:
    """Every point of a grid sweep, as ``tfrun -m`` with Hydra's basic sweeper plans them."""
    from hydra.core.global_hydra import GlobalHydra

    with compose.session(config_dir):
        sweep = compose.compose_sweep(list(overrides), config_name)
        sweeper = str(sweep.hydra.sweeper.get("_target_", ""))
        if sweeper.endswith(".TfrunSweeper"):
            raise TuningStudy("hydra/sweeper=tfrun chooses its trials while it runs, so they cannot be planned "
                              "ahead (tfrun.sweep): run `tfrun -m ...` to tune; `tfrun --dry-run -m ...` shows "
                              "the study and its first trial's plan")
        if not sweeper.endswith(".BasicSweeper"):
            raise ConfigError(f"hydra/sweeper={sweeper.rsplit('.', 1)[-1]} chooses its points while it runs, so "
                              f"only a grid sweep can be planned ahead (--dry-run -m, tfrun.sweep): run `tfrun -m "
                              f"...` to tune, or --dry-run without -m to see one run's plan")
        loader = GlobalHydra.instance().config_loader()
        return plan_points(loader, sweep, compose.grid_points(sweep))


def compose_plans(overrides: Sequence[str], multirun: bool = False, config_dir: str | None = None,
                  config_name: str = compose.CONFIG_NAME, write: bool = False) -> list[Plan]:
    """Every plan ``tfrun [-m] OVERRIDES`` would launch (``write``: and create their run dirs,
    once every point is planned, as a launch does)."""
    if multirun:
        planned = plan_sweep(overrides, config_dir, config_name)
    else:
        planned = [plan_run(overrides, config_dir, config_name)]
    if write:
        for one in planned:
            one.write()
    plans = [one.plan for one in planned]
    return sweep_requests(plans) if multirun else plans
