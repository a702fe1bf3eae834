"""Composition outside ``@hydra.main``: the same configs and overrides, for ``--dry-run``
and the Python API. Grid sweeps (``-m a=1,2``) expand to one plan per point."""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf, open_dict

from tfrun.config import resolvers, store
from tfrun.plan import Plan, build_plan, in_sweep

CONFIG_MODULE = "tfrun.conf"
CONFIG_NAME = "config"


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
    """Register schemas, resolvers and the launcher plugin (idempotent)."""
    store.register()
    resolvers.register()
    _expose_launcher_plugin()


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


def _type_name(tp: Any) -> str:
    name = getattr(tp, "__name__", None)
    return name if name and not getattr(tp, "__args__", None) else str(tp).replace("typing.", "")


def _explain_parse(exc: Any) -> str:
    """An override Hydra's grammar rejects: name its key and value, say what to do."""
    from tfrun.config.validate import SAFE_VALUE, SAFE_VALUE_HELP

    override = re.sub(r"^\+\+(?=trainer\.)", "", exc.override)  # our own add-or-set prefix
    key, sep, value = override.partition("=")
    cause = exc.__context__ if str(exc.__context__ or "").strip() else None
    reason = (str(cause) if cause else exc.message).strip().splitlines()[0].rstrip(".")
    shown = f"{key}={value!r}" if sep else repr(override)
    if SAFE_VALUE.fullmatch(value):  # e.g. ~/data: fine as a value, but Hydra wants it quoted
        hint = f"quote it: {key}='{value}'"
    elif key.lstrip("+~").startswith("trainer."):
        hint = f"trainer values may only use {SAFE_VALUE_HELP}"
    else:
        hint = "quote a value with blanks or special characters, e.g. key='a b'"
    return f"{shown} could not be parsed ({reason}): {hint}."


def _explain_validation(cause: Any) -> str | None:
    """A value of the wrong type for a schema field: key, value and the field's type."""
    import dataclasses
    import typing

    key, value = getattr(cause, "full_key", None), getattr(cause, "value", None)
    owner = getattr(cause, "object_type", None)
    if not key:
        return None
    reason = str(getattr(cause, "msg", cause)).strip().splitlines()[0].rstrip(".")
    wanted = ""
    if owner is not None and dataclasses.is_dataclass(owner):
        field_type = typing.get_type_hints(owner).get(str(getattr(cause, "key", "")))
        wanted = f"expected {_type_name(field_type)} " if field_type is not None else ""
    return f"{key}={value!r} is not valid: {wanted}({reason})."


def _explain_unknown_key(full_key: str, overrides: list[str], config_dir: str | None) -> str | None:
    """An override of a key the schema does not have: list the keys it does have."""
    parent, _, key = full_key.rpartition(".")
    rest = [o for o in overrides if not o.lstrip("+~").startswith(full_key + "=")]
    try:
        cfg = compose_config(rest, config_dir)
        node = OmegaConf.select(cfg, parent) if parent else cfg
        keys = sorted(k for k in node.keys() if k != "hydra")
    except Exception:  # the explanation must not hide the original error
        return None
    if OmegaConf.get_type(node) is dict:  # a free-form mapping (deps.env): any key may be added
        given = [o.lstrip("+~") for o in overrides if o.lstrip("+~").startswith(full_key + "=")]
        return f"{full_key} is not in {parent} yet; add it with +{given[0] if given else full_key + '=VALUE'}"
    where = parent or "the config"
    return f"{full_key} is not a key of {where}; allowed keys: {', '.join(keys)}"


def explain(exc: Exception, overrides: list[str], config_dir: str | None = None) -> str:
    """One message for a composition Hydra rejected: the key, the value, what is allowed."""
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(exc, OverrideParseException):
        return _explain_parse(exc)
    if isinstance(exc, MissingConfigException) and exc.options is not None and exc.missing_cfg_file:
        group, _, name = exc.missing_cfg_file.rpartition("/")
        if group:
            return (f"{group}={name} is not an option of {group}; "
                    f"available options: {', '.join(exc.options) or '(none)'}")
    message = str(exc).strip()
    cause = exc.__cause__ or exc.__context__
    if type(cause).__name__ == "ValidationError" and message.startswith("Error merging override"):
        explained = _explain_validation(cause)
        if explained:
            return explained
    match = re.search(r"Could not override '([\w.]+)'", message)
    if match:
        explained = _explain_unknown_key(match.group(1), overrides, config_dir)
        if explained:
            return explained
    if cause is not None and str(cause).strip() and str(cause).strip() not in message:
        message += "\n" + str(cause).strip()
    # Hydra's search-path dump helps nobody here.
    return message.split("\nConfig search path:")[0]


@contextlib.contextmanager
def _hydra(config_dir: str | None) -> Iterator[None]:
    """Hydra's compose API over tfrun's configs and the user's config dir, placed in the
    search path as Hydra's app places ``--config-dir``: ``--config-name`` may then name a
    config that is only there (a ``hydra.searchpath`` override is read after the primary
    config is loaded)."""
    from hydra import version
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_automatic_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    backup = get_gh_backup()
    version.setbase("1.3")
    search_path = create_automatic_config_search_path(None, f"{CONFIG_MODULE}.app", None)
    if config_dir:  # where Hydra's app puts --config-dir: after tfrun's configs, before the schemas
        search_path.prepend("command-line", f"file://{Path(config_dir).resolve()}", anchor=SearchPathQuery("schema"))
    Hydra.create_main_hydra2("app", search_path)
    try:
        yield
    finally:
        restore_gh_from_backup(backup)


def compose_config(overrides: list[str], config_dir: str | None = None, config_name: str = CONFIG_NAME) -> DictConfig:
    """Compose one run's config (with its ``hydra`` node) exactly as ``tfrun`` would."""
    from hydra import compose

    setup()
    with _hydra(config_dir):
        return compose(config_name, overrides=overrides, return_hydra_config=True)


_DUMPER: Any = None


def save_yaml(cfg: Any, path: str | os.PathLike[str]) -> None:
    """``OmegaConf.save``, the same text, on libyaml's emitter when PyYAML has it (~3x
    faster; a sweep writes three such files per point). OmegaConf's own representer still
    quotes the strings that would read back as numbers or booleans."""
    global _DUMPER
    import yaml
    from omegaconf._utils import get_omega_conf_dumper

    if _DUMPER is None:
        _DUMPER = get_omega_conf_dumper()
        if hasattr(yaml, "CDumper"):
            _DUMPER = type("OmegaConfCDumper", (yaml.CDumper,), {})
            _DUMPER.add_representer(str, get_omega_conf_dumper().str_representer)
    data = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True) if OmegaConf.is_config(cfg) else cfg
    text = yaml.dump(data, default_flow_style=False, allow_unicode=True, sort_keys=False, Dumper=_DUMPER)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text, encoding="utf-8")


def write_hydra_files(cfg: DictConfig, run_dir: str | os.PathLike[str], overrides: list[str]) -> None:
    """The ``.hydra/`` files Hydra's app writes, so a run dir looks the same either way."""
    out = Path(run_dir) / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    hydra_node = cfg.hydra
    with open_dict(cfg):
        job = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"])
    save_yaml(job, out / "config.yaml")
    save_yaml(OmegaConf.create({"hydra": hydra_node}), out / "hydra.yaml")
    save_yaml(list(overrides), out / "overrides.yaml")


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
                  config_name: str = CONFIG_NAME, write: bool = False) -> list[Plan]:
    """Compose and plan every run that ``tfrun [-m] OVERRIDES`` would launch (``write``: and
    create their run dirs, as a launch does)."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from tfrun.config.points import PointComposer

    setup()
    points = sweep_points(overrides) if multirun else [overrides]
    plans, composed = [], []
    with _hydra(config_dir):
        if multirun:  # as `tfrun -m` composes its points: from the sweep's master config
            loader = GlobalHydra.instance().config_loader()
            master = loader.load_configuration(config_name, [], run_mode=RunMode.MULTIRUN)
            composer = PointComposer(loader)
        for num, point in enumerate(points):
            if multirun:
                cfg = composer(master, point)
            else:
                cfg = compose(config_name, overrides=point, return_hydra_config=True)
            with open_dict(cfg):
                cfg.hydra.job.num = num
                cfg.hydra.runtime.output_dir = (
                    os.path.join(cfg.hydra.sweep.dir, str(cfg.hydra.sweep.subdir)) if multirun else cfg.hydra.run.dir
                )
            HydraConfig.instance().set_config(cfg)
            plan = build_plan(to_run_config(cfg), cfg.hydra.runtime.output_dir)
            plans.append(in_sweep(plan, Path(cfg.hydra.sweep.dir).resolve()) if multirun else plan)
            composed.append((cfg, point))
    if write:  # only once every point composed: a bad point leaves no run dirs behind
        for plan, (cfg, point) in zip(plans, composed):
            write_hydra_files(cfg, plan.run_dir, point)
    if multirun and plans and all(p.target == "slurm" for p in plans):
        from tfrun.targets.pack import point_requests

        plans = point_requests(plans)
    return plans
