"""Composition: tfrun's configs and the user's, with their overrides, through Hydra.

Every entry composes here, over one search path (:func:`session`): a single run
(``tfrun``, ``tfrun --dry-run``, ``tfrun.launch``) with :func:`compose_config`; a sweep
(``tfrun -m``, ``tfrun --dry-run -m``, ``tfrun.sweep``) from the config Hydra's multirun
composes (:func:`compose_sweep`), its points composed one by one by the composer the
launcher plugin installs (:mod:`tfrun.config.points`). ``tfrun -m`` runs Hydra's multirun
itself (:func:`multirun`), so that its sweeper plugins drive the points.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator, cast

from omegaconf import DictConfig, OmegaConf

from tfrun.config import hydra_compat, overrides, resolvers
from tfrun.errors import ConfigError

CONFIG_MODULE = "tfrun.conf"
CONFIG_NAME = "config"
TASK_NAME = "app"  # hydra.job.name


def _expose_launcher_plugin() -> None:
    # Hydra finds plugins by listing the hydra_plugins namespace's directories. A
    # default editable install maps packages through an import hook that such a
    # listing cannot see, so name the plugin's real directory explicitly.
    import importlib.util

    import hydra_plugins

    spec = importlib.util.find_spec("hydra_plugins.tfrun_launcher")
    if spec is None or not spec.submodule_search_locations:
        return
    parent = str(Path(list(spec.submodule_search_locations)[0]).parent)
    if parent not in list(hydra_plugins.__path__):
        hydra_plugins.__path__.append(parent)


def setup() -> None:
    """Register resolvers, and show Hydra tfrun's plugins (the launcher, the sweepers, the schemas'
    config source) (idempotent)."""
    resolvers.register()
    _expose_launcher_plugin()


def normalize_overrides(argv: list[str]) -> list[str]:
    """The command line's overrides as Hydra's grammar reads them (:func:`overrides.normalize`)."""
    return overrides.normalize(argv)


def to_run_config(cfg: DictConfig) -> dict[str, Any]:
    """The run's config as plain, resolved data (no ``hydra`` node)."""
    # A config's keys are strs, which the type of to_container (any container, any key) cannot say.
    data = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    assert isinstance(data, dict)
    data.pop("hydra", None)
    return data


@contextlib.contextmanager
def session(config_dir: str | None = None) -> Iterator[Any]:
    """Hydra over tfrun's configs and the user's config dir, placed where Hydra's app places
    ``--config-dir`` (so ``--config-name`` may name a config that is only there); yields
    Hydra's ``Hydra`` object. Whatever global Hydra there was is put back afterwards."""
    from hydra import version

    if config_dir and not Path(config_dir).is_dir():
        raise ConfigError.invalid("--config-dir", config_dir, "an existing directory")
    setup()
    backup = hydra_compat.save_global_hydra()
    version.setbase("1.3")
    hydra = hydra_compat.create_hydra(TASK_NAME, hydra_compat.search_path(CONFIG_MODULE, config_dir))
    try:
        yield hydra
    finally:
        hydra_compat.restore_global_hydra(backup)


def compose_config(overrides: list[str], config_dir: str | None = None, config_name: str = CONFIG_NAME) -> DictConfig:
    """Compose one run's config (with its ``hydra`` node) exactly as ``tfrun`` would."""
    with session(config_dir):
        return compose_run(overrides, config_name)


def compose_run(overrides: list[str], config_name: str = CONFIG_NAME) -> DictConfig:
    """A single run's config, with its ``hydra`` node, in an open :func:`session`."""
    from hydra import compose

    return compose(config_name, overrides=list(overrides), return_hydra_config=True)


def compose_sweep(overrides: list[str], config_name: str = CONFIG_NAME) -> DictConfig:
    """A sweep's config, in an open :func:`session`, as Hydra's multirun composes it before
    its sweeper splits it into points."""
    from hydra.core.global_hydra import GlobalHydra

    return hydra_compat.compose_multirun_config(GlobalHydra.instance().hydra, config_name, list(overrides))


def grid_points(sweep: DictConfig) -> list[list[str]]:
    """Every point of a grid sweep, in order, as Hydra's basic sweeper makes them from the
    sweep's config: ``hydra.sweeper.params``, then the command line's own overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.select(sweep, "hydra.sweeper.params") or {}
    lines = [f"{key}={value}" for key, value in params.items()] + list(sweep.hydra.overrides.task)
    return hydra_compat.grid_points(OverridesParser.create().parse_overrides(lines))


def multirun(
    overrides: list[str],
    task_function: Callable[[Any], Any],
    config_dir: str | None = None,
    config_name: str = CONFIG_NAME,
) -> Any:
    """``tfrun -m``: Hydra's multirun over :func:`session`'s search path; its sweeper plugin
    (basic, Optuna, ...) calls the tfrun launcher plugin with batches of points."""
    with session(config_dir) as hydra:
        return hydra_compat.multirun(hydra, config_name, task_function, list(overrides))
