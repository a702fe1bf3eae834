"""Every use tfrun makes of Hydra's (and OmegaConf's) private parts, in one place.

Composition outside ``@hydra.main`` needs Hydra's own search path and ``Hydra`` object;
composing sweep points once per choice of group options needs the steps Hydra's config
loader takes after composing; grid sweeps are split as Hydra's basic sweeper splits them.
None of that is public API. Each function here wraps one such part, and
``tests/test_compat.py`` checks every one against the installed Hydra, naming the
upgrade that changed it. Nothing else in tfrun (its Hydra plugins included) imports
``hydra._internal`` or ``omegaconf._utils``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from omegaconf import DictConfig


def search_path(config_module: str, config_dir: str | None) -> Any:
    """The search path Hydra's app builds: tfrun's configs (``pkg://<config_module>``), and
    ``--config-dir`` where the app puts it (after the app's configs, before the schemas)."""
    from hydra._internal.utils import create_automatic_config_search_path
    from hydra.core.config_search_path import SearchPathQuery

    path = create_automatic_config_search_path(None, f"{config_module}.app", None)
    if config_dir:
        path.prepend("command-line", f"file://{Path(config_dir).resolve()}", anchor=SearchPathQuery("schema"))
    return path


def create_hydra(task_name: str, path: Any) -> Any:
    """Hydra's ``Hydra`` object over that search path, installed as the global one."""
    from hydra._internal.hydra import Hydra

    return Hydra.create_main_hydra2(task_name, path)


def save_global_hydra() -> Any:
    """The global Hydra as it is now (restored by :func:`restore_global_hydra`)."""
    from hydra.initialize import get_gh_backup

    return get_gh_backup()


def restore_global_hydra(backup: Any) -> None:
    """Put back what :func:`save_global_hydra` saved."""
    from hydra.initialize import restore_gh_from_backup

    restore_gh_from_backup(backup)


def hold_hydra_node(cfg: Any) -> DictConfig:
    """``HydraConfig.instance().set_config(cfg)`` without its copy of the ``hydra`` node; returns
    what ``HydraConfig`` now holds (the config its ``hydra`` node is read from).

    Hydra's ``set_config`` makes ``OmegaConf.masked_copy(cfg, "hydra")`` (a deep copy of the
    largest node, ~10 ms) and re-parents the copy's ``hydra`` node on ``cfg``, so that
    ``${hydra:...}`` and the ``hydra`` node's own interpolations resolve as in a job. A
    point's composed config is its own copy already, so the holder here shares the node:
    same readonly flag, same parent, same answers to ``HydraConfig.get()``."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    OmegaConf.set_readonly(cfg.hydra, True)
    holder = OmegaConf.create({})
    holder.__dict__["_content"]["hydra"] = cfg._get_node("hydra")  # its parent stays cfg
    # HydraConfig.cfg is typed HydraConf, but what Hydra's own set_config stores there is a
    # DictConfig with a ``hydra`` node (it silences the checker the same way).
    HydraConfig.instance().cfg = holder  # type: ignore[assignment]
    return holder


def basic_sweeper() -> tuple[type, type]:
    """Hydra's basic sweeper (``hydra/sweeper=basic``) and its config dataclass, which
    ``hydra/sweeper=tfrun_basic`` extends (only its check of each batch differs)."""
    from hydra._internal.core_plugins.basic_sweeper import (
        BasicSweeper,
        BasicSweeperConf,
    )

    return BasicSweeper, BasicSweeperConf


def typed_keys(node: Any) -> frozenset[str]:
    """The keys of a structured config's node whose values have a declared type, not ``Any``:
    OmegaConf checks a value set there, Hydra's override included. OmegaConf tells a value's
    declared type only through the node that holds it (``DictConfig._get_node``, private);
    its public ``get_type`` tells the type of the value itself."""
    from omegaconf import AnyNode

    return frozenset(str(key) for key in node if not isinstance(node._get_node(key), AnyNode))


def grid_points(parsed_overrides: list[Any]) -> list[list[str]]:
    """Every point of a grid sweep, as Hydra's basic sweeper orders them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    return BasicSweeper.split_arguments(parsed_overrides, max_batch_size=None)[0]


def apply_overrides(parsed_overrides: list[Any], config: Any) -> None:
    """Apply value overrides to a composed config the way Hydra's loader does after composing."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    ConfigLoaderImpl._apply_overrides_to_config(parsed_overrides, config)


def overrides_dirname(parsed_overrides: list[Any], kv_sep: str, item_sep: str, exclude_keys: list[str]) -> str:
    """``hydra.job.override_dirname`` of these overrides, as Hydra computes it."""
    from hydra._internal.config_loader_impl import get_overrides_dirname

    return str(
        get_overrides_dirname(overrides=parsed_overrides, kv_sep=kv_sep, item_sep=item_sep, exclude_keys=exclude_keys)
    )


def caching_repo(loader: Any, config_name: str, hydra_overrides: list[str]) -> Any:
    """The loader's config repository for this config (answers ``group_exists``), or None
    where the loader has no such method (another Hydra: compose every point the slow way)."""
    make = getattr(loader, "_parse_overrides_and_create_caching_repo", None)
    if make is None:
        return None
    return make(config_name, hydra_overrides)[1]


def route_sweep_compositions(loader: Any, compose: Callable[[Any, list[str]], Any]) -> None:
    """Make the loader's ``load_sweep_config`` (the sweeper's and the launcher's way to
    compose a point) call ``compose`` instead."""
    loader.load_sweep_config = compose


def omegaconf_dumper() -> Any:
    """OmegaConf's YAML dumper class (its representer quotes strings that read back as other types)."""
    from omegaconf._utils import get_omega_conf_dumper

    return get_omega_conf_dumper()


def _multirun_overrides(hydra: Any, config_name: str, overrides: list[str]) -> list[str]:
    """What Hydra's app does for ``--multirun``: ``hydra.mode=MULTIRUN`` unless the config
    already says so (the sweep's points then carry it too)."""
    from hydra.types import RunMode

    if hydra.get_mode(config_name=config_name, overrides=overrides) != RunMode.MULTIRUN:
        return [*overrides, "hydra.mode=MULTIRUN"]
    return list(overrides)


def compose_multirun_config(hydra: Any, config_name: str, overrides: list[str]) -> Any:
    """The config ``Hydra.multirun`` composes before its sweeper runs (``hydra.overrides.task``
    holds the command line's overrides, ``hydra.overrides.hydra`` the ``hydra.*`` ones)."""
    from hydra.types import RunMode

    return hydra.compose_config(
        config_name=config_name, overrides=_multirun_overrides(hydra, config_name, overrides), run_mode=RunMode.MULTIRUN
    )


def multirun(hydra: Any, config_name: str, task_function: Callable[[Any], Any], overrides: list[str]) -> Any:
    """What Hydra's app does for ``--multirun``: ``Hydra.multirun`` (the sweeper, then the launcher)."""
    return hydra.multirun(
        config_name=config_name,
        task_function=task_function,
        overrides=_multirun_overrides(hydra, config_name, overrides),
    )
