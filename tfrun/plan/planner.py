"""Overrides -> plans: the one path every entry takes.

``tfrun``, ``tfrun --dry-run`` and ``tfrun.launch`` plan a single run with :func:`plan_run`;
``tfrun --dry-run -m`` and ``tfrun.sweep`` plan a grid sweep with :func:`compose_plans`;
``tfrun -m`` gets its points from Hydra's sweeper plugin, and the launcher plugin plans
them with :func:`plan_points`, the function :func:`compose_plans` uses too. Every config is
composed by :mod:`tfrun.config.compose` over the same search path, and every composed
config becomes a plan in :func:`plan_composed`.
"""
from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from omegaconf import DictConfig, open_dict, read_write

from tfrun import rundir
from tfrun.config import compose, hydra_compat
from tfrun.errors import ConfigError
from tfrun.paths import RunPaths
from tfrun.plan.build import build_plan, in_sweep
from tfrun.plan.pools import point_requests
from tfrun.rundir import Plan
from tfrun.states import RunState

if TYPE_CHECKING:  # a single run needs neither: imported where a sweep or a write uses them
    from tfrun.config import points


class TuningStudy(ConfigError):
    """A sweep whose points a tuning study chooses while it runs (``hydra/sweeper=tfrun``):
    ``--dry-run -m`` shows the study instead (:func:`tfrun.tune.tuning.preview`)."""


class Planned:
    """A plan and the composition it came from (what the run dir's ``.hydra`` files hold).

    A sweep point planned from its resolved values (:meth:`PointComposer.resolved`) composes
    its config only when asked (``compose``): a dry run of 10,000 points never needs them, and
    a launch writes its ``.hydra`` files from the same values (``files``)."""

    def __init__(self, plan: Plan, config: DictConfig | None = None, hydra: DictConfig | None = None,
                 compose: Callable[[], tuple[DictConfig, DictConfig]] | None = None,
                 files: Callable[[], points.PointFiles] | None = None) -> None:
        self.plan = plan
        self._config, self._hydra, self._compose = config, hydra, compose
        self._files = files
        self._file_data: points.PointFiles | None = None

    @property
    def composed(self) -> bool:
        """Whether the point's composition exists (else :attr:`config` composes it)."""
        return self._config is not None

    def _point_files(self) -> points.PointFiles | None:
        if self._file_data is None and self._files is not None and not self.composed:
            self._file_data = self._files()
        return self._file_data

    def _parts(self) -> tuple[DictConfig, DictConfig]:
        if self._config is None or self._hydra is None:
            assert self._compose is not None
            self._config, self._hydra = self._compose()
            self._compose = None
        return self._config, self._hydra

    @property
    def config(self) -> DictConfig:
        """The run's config without its hydra node."""
        return self._parts()[0]

    @property
    def hydra(self) -> DictConfig:
        """Only the hydra node, as HydraConfig holds it."""
        return self._parts()[1]

    @property
    def overrides(self) -> list[str]:
        """The overrides that made this run (a sweep point's own)."""
        files = self._point_files()
        return list(files.overrides) if files is not None else list(self.hydra.hydra.overrides.task)

    def write(self) -> None:
        """Create the run dir with its ``.hydra`` files, as Hydra's app would."""
        from tfrun.config import hydra_files

        refuse_existing([self])
        files = self._point_files()
        if files is not None:
            hydra_files.write_texts(self.plan.run_dir, files.output_subdir, files.config, files.hydra,
                                    hydra_files.dump(files.overrides))
        else:
            hydra_files.write(self.config, self.hydra, self.plan.run_dir)


def refuse_existing(planned: Sequence[Planned]) -> None:
    """A new run never starts in a run dir that holds one: its tasks would take the old run's
    backups for their own and carry on from them (a fixed ``hydra.run.dir``, a reused
    ``hydra.sweep.dir``). Going on with a run is asked for: ``tfrun resume``."""
    for one in planned:
        paths = RunPaths.of(one.plan.run_dir)
        if paths.plan.exists():
            state = rundir.read_status(paths.root).get("state") or "never started"
            on = "" if state == RunState.COMPLETED else f"to go on with that run: tfrun resume {paths.root}; "
            raise ConfigError(f"{paths.root} holds a run already ({state}): a new run is not started over it; "
                              f"{on}for a new one, choose another hydra.run.dir (hydra.sweep.dir for a sweep) "
                              f"or remove that dir")


@contextlib.contextmanager
def _hydra_node_held(cfg: DictConfig, output_dir: str) -> Iterator[DictConfig]:
    """``HydraConfig`` holds the run's hydra node (yielded) and ``cfg`` loses it, so that
    ``${hydra:...}`` interpolations mean this run while it is resolved, as in Hydra's jobs."""
    from hydra.core.hydra_config import HydraConfig

    with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
        cfg.hydra.runtime.output_dir = output_dir
    holder = HydraConfig.instance()
    before = holder.cfg
    hydra = hydra_compat.hold_hydra_node(cfg)
    try:
        with read_write(cfg), open_dict(cfg):
            del cfg["hydra"]
        yield hydra
    finally:
        holder.cfg = before


def plan_composed(cfg: DictConfig, output_dir: str, sweep_dir: Path | None = None) -> Planned:
    """Plan a composed config (hydra node included) whose run dir is ``output_dir``."""
    with _hydra_node_held(cfg, output_dir) as hydra:
        plan = build_plan(compose.to_run_config(cfg), output_dir)
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
    from tfrun.config import points

    composer = points.install(loader)
    sweep_dir = Path(str(sweep.hydra.sweep.dir)).resolve()
    planned = []
    try:
        for offset, overrides in enumerate(job_overrides):
            # A sweeper (Optuna's, say) names trainer keys plainly; they are free-form: add-or-set.
            normalized = compose.normalize_overrides(list(overrides))
            idx = initial_job_idx + offset
            # A point the sweeper composed already is planned from that composition.
            resolved = None if composer.validated(sweep, normalized) else composer.resolved(sweep, normalized)
            if resolved is None:
                cfg, output_dir = _point(composer, sweep, normalized, idx)
                planned.append(plan_composed(cfg, output_dir, sweep_dir))
                continue
            # The same plan as composing the point would give (tests/test_plan.py compares them),
            # without composing it: its config is composed only if the launch writes it.
            run_config, point_sweep_dir = resolved
            output_dir = os.path.abspath(os.path.join(point_sweep_dir, str(idx)))
            plan = in_sweep(build_plan(run_config, output_dir), sweep_dir)
            planned.append(Planned(plan, compose=functools.partial(_point_parts, composer, sweep, normalized, idx),
                                   files=functools.partial(composer.files, sweep, normalized, idx, output_dir)))
    finally:
        composer.forget_points()  # the validated compositions of this batch are used or dead
    return planned


def _point(composer: points.PointComposer, sweep: DictConfig, overrides: list[str],
           idx: int) -> tuple[DictConfig, str]:
    """A point's composed config (hydra node included) and its run dir."""
    cfg = composer.take(sweep, overrides)
    with open_dict(cfg):
        cfg.hydra.job.id = idx
        cfg.hydra.job.num = idx
    return cfg, os.path.abspath(os.path.join(str(cfg.hydra.sweep.dir), str(cfg.hydra.sweep.subdir)))


def _point_parts(composer: points.PointComposer, sweep: DictConfig, overrides: list[str],
                 idx: int) -> tuple[DictConfig, DictConfig]:
    """(config, hydra node) of a point planned from its resolved values, composed now."""
    cfg, output_dir = _point(composer, sweep, overrides, idx)
    with _hydra_node_held(cfg, output_dir) as hydra:
        return cfg, hydra


def sweep_requests(plans: Sequence[Plan]) -> list[Plan]:
    """A sweep's plans as it will be submitted: on Slurm, packed points become items of a pool."""
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
        refuse_existing(planned)  # before any is written: a refused sweep leaves no run dir behind
        for one in planned:
            one.write()
    plans = [one.plan for one in planned]
    return sweep_requests(plans) if multirun else plans
