"""Overrides -> plans: the one path every entry takes.

``tfrun``, ``tfrun --dry-run`` and ``tfrun.launch`` plan a single run with :func:`plan_run`;
``tfrun --dry-run -m`` and ``tfrun.sweep`` plan a grid sweep with :func:`compose_plans`;
``tfrun -m`` gets its points from Hydra's sweeper plugin, and the launcher plugin plans
them with :func:`plan_points`, the function :func:`compose_plans` uses too. Each takes its
runs from config/ in one hand-over (:mod:`tfrun.config.composition`: composed, resolved,
checked, typed), and every run becomes a plan in :func:`plan_composed`.
"""

from __future__ import annotations

from typing import Any, Sequence

from omegaconf import DictConfig

from tfrun import rundir
from tfrun.config import composition
from tfrun.config.composition import Composition, TuningStudy
from tfrun.errors import ConfigError
from tfrun.paths import RunPaths
from tfrun.plan.build import build_plan
from tfrun.plan.pools import point_requests
from tfrun.rundir import Plan
from tfrun.states import RunState

__all__ = [
    "Planned",
    "TuningStudy",
    "compose_plans",
    "plan_points",
    "plan_run",
    "plan_sweep",
    "refuse_existing",
    "sweep_requests",
]


class Planned:
    """A plan and the composition it came from (what the run dir's ``.hydra`` files hold)."""

    def __init__(self, plan: Plan, source: Composition) -> None:
        self.plan, self.source = plan, source

    @property
    def composed(self) -> bool:
        """Whether the point's composition exists (else :attr:`config` composes it)."""
        return self.source.composed

    @property
    def config(self) -> DictConfig:
        """The run's config without its hydra node."""
        return self.source.config

    @property
    def hydra(self) -> DictConfig:
        """Only the hydra node, as HydraConfig holds it."""
        return self.source.hydra

    @property
    def overrides(self) -> list[str]:
        """The overrides that made this run (a sweep point's own)."""
        return self.source.overrides

    def write(self) -> None:
        """Create the run dir with its ``.hydra`` files, as Hydra's app would."""
        refuse_existing([self])
        self.source.write(self.plan.run_dir)


def refuse_existing(planned: Sequence[Planned]) -> None:
    """A new run never starts in a run dir that holds one: its tasks would take the old run's
    backups for their own and carry on from them (a fixed ``hydra.run.dir``, a reused
    ``hydra.sweep.dir``). Going on with a run is asked for: ``tfrun resume``."""
    for one in planned:
        paths = RunPaths.of(one.plan.run_dir)
        if paths.plan.exists():
            state = rundir.read_status(paths.root).get("state") or "never started"
            on = "" if state == RunState.COMPLETED else f"to go on with that run: tfrun resume {paths.root}; "
            raise ConfigError(
                f"{paths.root} holds a run already ({state}): a new run is not started over it; "
                f"{on}for a new one, choose another hydra.run.dir (hydra.sweep.dir for a sweep) "
                f"or remove that dir"
            )


def plan_composed(source: Composition) -> Planned:
    """Plan a run config as config/ handed it over."""
    return Planned(build_plan(source.run, source.output_dir, source.sweep_dir), source)


def plan_run(
    overrides: Sequence[str], config_dir: str | None = None, config_name: str = composition.CONFIG_NAME
) -> Planned:
    """A single run: composed and planned, its run dir not created yet (:meth:`Planned.write`)."""
    return plan_composed(composition.single(overrides, config_dir, config_name))


def plan_points(
    loader: Any, sweep: DictConfig, job_overrides: Sequence[Sequence[str]], initial_job_idx: int = 0
) -> list[Planned]:
    """Plan a batch of a sweep's points (``sweep``: the multirun's config), composed and checked
    by config/ (:func:`tfrun.config.composition.points`). Nothing is written: a bad point
    raises before any run dir exists."""
    return [plan_composed(one) for one in composition.points(loader, sweep, job_overrides, initial_job_idx)]


def sweep_requests(plans: Sequence[Plan]) -> list[Plan]:
    """A sweep's plans as it will be submitted: on Slurm, packed points become items of a pool."""
    if plans and all(p.target == "slurm" for p in plans):
        return point_requests(plans)
    return list(plans)


def plan_sweep(
    overrides: Sequence[str], config_dir: str | None = None, config_name: str = composition.CONFIG_NAME
) -> list[Planned]:
    """Every point of a grid sweep, as ``tfrun -m`` with Hydra's basic sweeper plans them."""
    return [plan_composed(one) for one in composition.grid(overrides, config_dir, config_name)]


def compose_plans(
    overrides: Sequence[str],
    multirun: bool = False,
    config_dir: str | None = None,
    config_name: str = composition.CONFIG_NAME,
    write: bool = False,
) -> list[Plan]:
    """Every plan ``tfrun [-m] OVERRIDES`` would launch (``write``: and create their run dirs,
    once every point is planned, as a launch does)."""
    if multirun:
        planned = plan_sweep(overrides, config_dir, config_name)
    else:
        planned = [plan_run(overrides, config_dir, config_name)]
    if write:
        refuse_existing(planned)  # before any is written: a refused sweep leaves no run dir behind
        for one in planned:
            one.write()
    plans = [one.plan for one in planned]
    return sweep_requests(plans) if multirun else plans
