"""tfrun's structured configs (schemas): which exist, and building one when Hydra asks.

Schemas live in the ``schema/<group>`` groups so that they never show up as options of
the user-facing groups; each YAML option under ``conf/<group>/`` names its schema in
its defaults list. Hydra reads them through the ``tfrun-schema://`` config source
(``launchers/hydra_plugins/tfrun_launcher/tfrun_schemas.py``), which builds a schema only
when a composition loads it.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from tfrun.config import schema

# group -> option schema name -> dataclass. The YAML files pick from these.
GROUP_SCHEMAS: dict[str, dict[str, type]] = {
    "compute": {"local": schema.LocalComputeConfig, "slurm": schema.SlurmComputeConfig},
    "backend": {
        "none": schema.BackendConfig,
        "horovod": schema.HorovodBackendConfig,
        "ps": schema.PsBackendConfig,
        "mwms": schema.MwmsBackendConfig,
    },
    "deps": {
        "none": schema.DepsConfig,
        "pip": schema.PipDepsConfig,
        "conda": schema.CondaDepsConfig,
        "modules": schema.ModulesDepsConfig,
        "container": schema.ContainerDepsConfig,
    },
    "export": {"none": schema.ExportConfig, "onnx": schema.OnnxExportConfig},
    "tracking": {"none": schema.TrackingConfig, "mlflow": schema.MlflowTrackingConfig},
}
ROOT_SCHEMA = "tfrun_schema"  # the root config's schema (conf/config.yaml names it first)
# config path -> dataclass, as Hydra names them.
SCHEMAS: dict[str, type] = {
    ROOT_SCHEMA: schema.RootConfig,
    **{f"schema/{group}/{name}": node for group, options in GROUP_SCHEMAS.items() for name, node in options.items()},
}


@functools.lru_cache(maxsize=None)
def _built(path: str) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.structured(SCHEMAS[path])


def schema_node(path: str) -> Any:
    """The schema at ``path`` as a config (built once per process; each caller gets its own
    copy, as Hydra's ConfigStore hands them out, since composition merges into what it loads)."""
    return copy.deepcopy(_built(path))


@functools.lru_cache(maxsize=None)
def schema_groups() -> frozenset[str]:
    """Every group that holds schemas or other groups of them (``schema``, ``schema/compute``, ...)."""
    found = {""}
    for path in SCHEMAS:
        parts = path.split("/")[:-1]
        found.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    return frozenset(found)


def schema_children(group: str) -> list[str]:
    """What a group holds, as Hydra lists it: sub-groups by name, schemas by name."""
    prefix = f"{group}/" if group else ""
    names = {path[len(prefix) :].split("/")[0] for path in SCHEMAS if path.startswith(prefix)}
    return sorted(names)
