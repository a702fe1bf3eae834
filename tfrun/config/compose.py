"""Composition outside ``@hydra.main``: the same configs and overrides, for ``--dry-run``
and the Python API. Grid sweeps (``-m a=1,2``) expand to one plan per point."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from tfrun.config import resolvers, store
from tfrun.plan import Plan, build_plan

CONFIG_MODULE = "tfrun.conf"
CONFIG_NAME = "config"


def setup() -> None:
    """Register schemas and resolvers (idempotent)."""
    store.register()
    resolvers.register()


def to_run_config(cfg: DictConfig) -> dict[str, Any]:
    """The run's config as plain, resolved data (no ``hydra`` node)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    data.pop("hydra", None)
    return data


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """The override list of every point of a grid sweep, in Hydra's order."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]


def explain(exc: Exception, overrides: list[str], config_dir: str | None = None) -> str:
    """Hydra's message for a rejected composition, with its cause and the allowed keys."""
    message = str(exc).strip()
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause).strip() and str(cause).strip() not in message:
        message += "\n" + str(cause).strip()
    match = re.search(r"Could not override '([\w.]+)'", message)
    if match and "." in match.group(1):
        parent, key = match.group(1).rsplit(".", 1)
        rest = [o for o in overrides if not o.lstrip("+~").startswith(match.group(1) + "=")]
        try:
            node = OmegaConf.select(compose_config(rest, config_dir), parent)
            message = (f"{parent}.{key} is not a key of {parent}; "
                       f"allowed keys: {', '.join(sorted(node.keys()))}")
        except Exception:  # the explanation must not hide the original error
            pass
    # Hydra's search-path dump helps nobody here.
    return message.split("\nConfig search path:")[0]


def compose_config(overrides: list[str], config_dir: str | None = None, config_name: str = CONFIG_NAME) -> DictConfig:
    """Compose one run's config (with its ``hydra`` node) exactly as ``tfrun`` would."""
    from hydra import compose, initialize_config_module

    setup()
    extra = [f"hydra.searchpath=[file://{Path(config_dir).resolve()}]"] if config_dir else []
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose(config_name, overrides=[*extra, *overrides], return_hydra_config=True)


def write_hydra_files(cfg: DictConfig, run_dir: str | os.PathLike[str], overrides: list[str]) -> None:
    """The ``.hydra/`` files Hydra's app writes, so a run dir looks the same either way."""
    out = Path(run_dir) / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    hydra_node = cfg.hydra
    with open_dict(cfg):
        job = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"])
    OmegaConf.save(job, out / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hydra_node}), out / "hydra.yaml")
    OmegaConf.save(OmegaConf.create(list(overrides)), out / "overrides.yaml")


def compose_run(overrides: list[str], config_dir: str | None = None, config_name: str = CONFIG_NAME) -> Plan:
    """Compose and plan a single run, and create its run dir (the ``.hydra`` files)."""
    from hydra.core.hydra_config import HydraConfig

    cfg = compose_config(overrides, config_dir, config_name)
    with open_dict(cfg):
        cfg.hydra.job.num = 0
        cfg.hydra.runtime.output_dir = str(Path(cfg.hydra.run.dir).resolve())
    HydraConfig.instance().set_config(cfg)
    plan = build_plan(to_run_config(cfg), cfg.hydra.runtime.output_dir)
    write_hydra_files(cfg, plan.run_dir, overrides)
    return plan


def compose_plans(overrides: list[str], multirun: bool = False, config_dir: str | None = None,
                  config_name: str = CONFIG_NAME) -> list[Plan]:
    """Compose and plan every run that ``tfrun [-m] OVERRIDES`` would launch."""
    from hydra import compose, initialize_config_module
    from hydra.core.hydra_config import HydraConfig

    setup()
    extra = [f"hydra.searchpath=[file://{Path(config_dir).resolve()}]"] if config_dir else []
    points = sweep_points(overrides) if multirun else [overrides]
    plans = []
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        for num, point in enumerate(points):
            cfg = compose(config_name, overrides=[*extra, *point], return_hydra_config=True)
            with open_dict(cfg):
                cfg.hydra.job.num = num
                cfg.hydra.runtime.output_dir = (
                    os.path.join(cfg.hydra.sweep.dir, str(cfg.hydra.sweep.subdir)) if multirun else cfg.hydra.run.dir
                )
            HydraConfig.instance().set_config(cfg)
            plans.append(build_plan(to_run_config(cfg), cfg.hydra.runtime.output_dir))
    return plans
