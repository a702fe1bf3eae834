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
    """``OmegaConf.save``, the same text, on libyaml's emitter when PyYAML has it (~3x
    faster; a sweep writes three such files per point). OmegaConf's own representer still
    quotes the strings that would read back as numbers or booleans."""
    global _DUMPER
    import yaml

    if _DUMPER is None:
        _DUMPER = hydra_compat.omegaconf_dumper()
        if hasattr(yaml, "CDumper"):
            _DUMPER = type("OmegaConfCDumper", (yaml.CDumper,), {})
            _DUMPER.add_representer(str, hydra_compat.omegaconf_dumper().str_representer)
    data = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True) if OmegaConf.is_config(cfg) else cfg
    text = yaml.dump(data, default_flow_style=False, allow_unicode=True, sort_keys=False, Dumper=_DUMPER)
    rundir.write_atomic(path, text.encode("utf-8"))


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
