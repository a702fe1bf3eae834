"""Overrides -> checked run configs: what config/ hands plan/, once per run.

A single run (:func:`single`), a grid sweep's points (:func:`grid`) and a batch of points a
sweeper chose (:func:`points`) are composed (:mod:`tfrun.config.compose`,
:mod:`tfrun.config.points`), resolved with their own ``hydra`` node, checked
(:func:`tfrun.config.run_config.from_data`) and handed over as :class:`Composition`\\ s: the
typed :class:`tfrun.config.run_config.RunConfig` a plan is built from, its run dir, and the
composition itself, which the run dir's ``.hydra`` files are written from.

A sweep point's composition stays here: :class:`tfrun.config.points.PointComposer` stands in
for Hydra's config loader, which the sweeper calls too, and keeps the compositions it made
for the launcher (and the bases of the points it resolves without composing them).
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from omegaconf import DictConfig, open_dict, read_write

from tfrun.config import compose, hydra_compat, run_config
from tfrun.config.run_config import RunConfig
from tfrun.errors import ConfigError

if TYPE_CHECKING:  # a single run needs none: imported where a sweep or a write uses them
    from tfrun.config import points as points_module


CONFIG_NAME = compose.CONFIG_NAME  # the config a run composes unless --config-name names another


class TuningStudy(ConfigError):
    """A sweep whose points a tuning study chooses while it runs (``hydra/sweeper=tfrun``):
    ``--dry-run -m`` shows the study instead (:func:`tfrun.tune.tuning.preview`)."""


class Composition:
    """A run's checked config (:attr:`run`), where it runs (:attr:`output_dir`, and the sweep's
    dir for a point), and the composition it came from (what the ``.hydra`` files hold).

    A sweep point resolved from its base's values (:meth:`PointComposer.resolved`) composes
    its config only when asked (``compose``): a dry run of 10,000 points never needs them, and
    its ``.hydra`` files are written from the same values (``files``)."""

    def __init__(
        self,
        run: RunConfig,
        output_dir: str,
        sweep_dir: str | None = None,
        config: DictConfig | None = None,
        hydra: DictConfig | None = None,
        compose: Callable[[], tuple[DictConfig, DictConfig]] | None = None,
        files: Callable[[], points_module.PointFiles] | None = None,
    ) -> None:
        self.run, self.output_dir, self.sweep_dir = run, output_dir, sweep_dir
        self._config, self._hydra, self._compose = config, hydra, compose
        self._files = files
        self._file_data: points_module.PointFiles | None = None

    @property
    def composed(self) -> bool:
        """Whether the composition exists (else :attr:`config` composes it)."""
        return self._config is not None

    def _point_files(self) -> points_module.PointFiles | None:
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

    def write(self, run_dir: str | os.PathLike[str]) -> None:
        """The run dir's ``.hydra`` files, as Hydra's app writes them."""
        from tfrun.config import hydra_files

        files = self._point_files()
        if files is not None:
            hydra_files.write_texts(
                run_dir, files.output_subdir, files.config, files.hydra, hydra_files.dump(files.overrides)
            )
        else:
            hydra_files.write(self.config, self.hydra, run_dir)


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


def checked(cfg: DictConfig, output_dir: str, sweep_dir: str | None = None) -> Composition:
    """A composed config (hydra node included) whose run dir is ``output_dir``, resolved as
    that run and checked."""
    with _hydra_node_held(cfg, output_dir) as hydra:
        data = compose.to_run_config(cfg)
    return Composition(run_config.from_data(data), output_dir, sweep_dir, cfg, hydra)


def single(
    overrides: Sequence[str], config_dir: str | None = None, config_name: str = compose.CONFIG_NAME
) -> Composition:
    """A single run, as ``tfrun OVERRIDES`` composes it: composed, resolved, checked."""
    with compose.session(config_dir):
        cfg = compose.compose_run(list(overrides), config_name)
        with open_dict(cfg):
            cfg.hydra.job.num = 0
        return checked(cfg, str(Path(cfg.hydra.run.dir).resolve()))


def points(
    loader: Any, sweep: DictConfig, job_overrides: Sequence[Sequence[str]], initial_job_idx: int = 0
) -> list[Composition]:
    """A batch of a sweep's points (``sweep``: the multirun's config), each composed by the
    loader's :class:`tfrun.config.points.PointComposer` and checked: a bad point raises before
    any is planned."""
    from tfrun.config import points as points_module

    composer = points_module.install(loader)
    sweep_dir = str(Path(str(sweep.hydra.sweep.dir)).resolve())
    found = []
    try:
        for offset, overrides in enumerate(job_overrides):
            # A sweeper (Optuna's, say) names trainer keys plainly; they are free-form: add-or-set.
            normalized = compose.normalize_overrides(list(overrides))
            idx = initial_job_idx + offset
            # A point the sweeper composed already is checked from that composition.
            resolved = None if composer.validated(sweep, normalized) else composer.resolved(sweep, normalized)
            if resolved is None:
                cfg, output_dir = _point(composer, sweep, normalized, idx)
                found.append(checked(cfg, output_dir, sweep_dir))
                continue
            # The same run config as composing the point would give (tests/test_plan.py compares
            # the plans), without composing it: its config is composed only if asked for.
            data, point_sweep_dir = resolved
            output_dir = os.path.abspath(os.path.join(point_sweep_dir, str(idx)))
            found.append(
                Composition(
                    run_config.from_data(data),
                    output_dir,
                    sweep_dir,
                    compose=functools.partial(_point_parts, composer, sweep, normalized, idx),
                    files=functools.partial(composer.files, sweep, normalized, idx, output_dir),
                )
            )
    finally:
        composer.forget_points()  # the validated compositions of this batch are used or dead
    return found


def _point(
    composer: points_module.PointComposer, sweep: DictConfig, overrides: list[str], idx: int
) -> tuple[DictConfig, str]:
    """A point's composed config (hydra node included) and its run dir."""
    cfg = composer.take(sweep, overrides)
    with open_dict(cfg):
        cfg.hydra.job.id = idx
        cfg.hydra.job.num = idx
    return cfg, os.path.abspath(os.path.join(str(cfg.hydra.sweep.dir), str(cfg.hydra.sweep.subdir)))


def _point_parts(
    composer: points_module.PointComposer, sweep: DictConfig, overrides: list[str], idx: int
) -> tuple[DictConfig, DictConfig]:
    """(config, hydra node) of a point resolved from its base's values, composed now."""
    cfg, output_dir = _point(composer, sweep, overrides, idx)
    with _hydra_node_held(cfg, output_dir) as hydra:
        return cfg, hydra


def grid(
    overrides: Sequence[str], config_dir: str | None = None, config_name: str = compose.CONFIG_NAME
) -> list[Composition]:
    """Every point of a grid sweep, as ``tfrun -m`` with Hydra's basic sweeper makes them."""
    from hydra.core.global_hydra import GlobalHydra

    with compose.session(config_dir):
        sweep = compose.compose_sweep(list(overrides), config_name)
        sweeper = str(sweep.hydra.sweeper.get("_target_", ""))
        if sweeper.endswith(".TfrunSweeper"):
            raise TuningStudy(
                "hydra/sweeper=tfrun chooses its trials while it runs, so they cannot be planned "
                "ahead (tfrun.sweep): run `tfrun -m ...` to tune; `tfrun --dry-run -m ...` shows "
                "the study and its first trial's plan"
            )
        if not sweeper.endswith(".BasicSweeper"):
            raise ConfigError(
                f"hydra/sweeper={sweeper.rsplit('.', 1)[-1]} chooses its points while it runs, so "
                f"only a grid sweep can be planned ahead (--dry-run -m, tfrun.sweep): run `tfrun -m "
                f"...` to tune, or --dry-run without -m to see one run's plan"
            )
        loader = GlobalHydra.instance().config_loader()
        return points(loader, sweep, compose.grid_points(sweep))
