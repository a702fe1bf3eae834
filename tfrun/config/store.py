"""Registers tfrun's structured configs in Hydra's ConfigStore.

Schemas live in the ``schema/<group>`` groups so that they never show up as options of
the user-facing groups; each YAML option under ``conf/<group>/`` names its schema in
its defaults list.
"""
from __future__ import annotations

from hydra.core.config_store import ConfigStore

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

_registered = False


def register() -> None:
    """Put every schema in the ConfigStore once per process."""
    global _registered
    if _registered:
        return
    cs = ConfigStore.instance()
    cs.store(name="tfrun_schema", node=schema.RunConfig)
    for group, options in GROUP_SCHEMAS.items():
        for name, node in options.items():
            cs.store(group=f"schema/{group}", name=name, node=node)
    _registered = True
