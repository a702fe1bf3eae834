"""The ``.hydra/`` files of a run dir (``config.yaml``, ``hydra.yaml``, ``overrides.yaml``),
the same text Hydra's app writes, so a run dir looks the same whichever entry made it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tfrun import rundir
from tfrun.config import hydra_compat

_DUMPER: Any = None


def save_yaml(cfg: Any, path: str | os.PathLike[str]) -> None:
    """``OmegaConf.save``, the same text (:func:`dump`)."""
    rundir.write_atomic(path, dump(cfg).encode("utf-8"))


def dump(cfg: Any) -> str:
    """``OmegaConf.save``'s text, on libyaml's emitter when PyYAML has it (~3x faster; a
    sweep writes three such files per point). OmegaConf's own representer still quotes the
    strings that would read back as numbers or booleans."""
    global _DUMPER
    import yaml

    if _DUMPER is None:
        _DUMPER = hydra_compat.omegaconf_dumper()
        if hasattr(yaml, "CDumper"):
            _DUMPER = type("OmegaConfCDumper", (yaml.CDumper,), {})
            _DUMPER.add_representer(str, hydra_compat.omegaconf_dumper().str_representer)
    data = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True) if OmegaConf.is_config(cfg) else cfg
    return str(yaml.dump(data, default_flow_style=False, allow_unicode=True, sort_keys=False, Dumper=_DUMPER))


def entry(path: tuple[str, ...], value: Any) -> str:
    """The text of one entry of a nested mapping (``path``: the keys down to it), as
    :func:`dump` of the whole writes it: a block mapping's text is its entries' texts one
    after another, so files whose entries mostly repeat (a sweep's points) are assembled
    from entries dumped once."""
    nested: Any = {path[-1]: value}
    for key in reversed(path[:-1]):
        nested = {key: nested}
    return dump(nested).split("\n", len(path) - 1)[-1]


def mapping_text(
    data: dict[str, Any],
    own: dict[tuple[str, ...], Any],
    shared: dict[tuple[str, ...], str],
    path: tuple[str, ...] = (),
) -> str:
    """:func:`dump` of ``data`` with the entries at the paths of ``own`` replaced by its values,
    the text of every other entry taken from ``shared`` (filled on first use). The mappings on
    the way to an own entry have plain keys."""
    parts = []
    for key, value in data.items():
        here = (*path, key)
        if here in own:
            parts.append(entry(here, own[here]))
        elif any(p[: len(here)] == here for p in own):
            parts.append("  " * len(path) + f"{key}:\n" + mapping_text(value, own, shared, here))
        else:
            if here not in shared:
                shared[here] = entry(here, value)
            parts.append(shared[here])
    return "".join(parts)


def write(task_config: DictConfig, hydra_config: DictConfig, run_dir: str | os.PathLike[str]) -> None:
    """A run's ``.hydra`` files: its config without the ``hydra`` node, the ``hydra`` node
    (``hydra_config`` holds only that node), and the overrides that made it. As in Hydra,
    none with ``hydra.output_subdir=null``."""
    if hydra_config.hydra.output_subdir is None:
        return
    out = Path(run_dir) / str(hydra_config.hydra.output_subdir)
    save_yaml(task_config, out / "config.yaml")
    save_yaml(hydra_config, out / "hydra.yaml")
    save_yaml(hydra_config.hydra.overrides.task, out / "overrides.yaml")


def write_texts(
    run_dir: str | os.PathLike[str], output_subdir: str | None, config: str, hydra: str, overrides: str
) -> None:
    """:func:`write`, from the files' texts (a sweep point's, :meth:`tfrun.config.points.PointComposer.files`)."""
    if output_subdir is None:
        return
    out = Path(run_dir) / output_subdir
    for name, text in (("config.yaml", config), ("hydra.yaml", hydra), ("overrides.yaml", overrides)):
        rundir.write_atomic(out / name, text.encode("utf-8"))
