"""Compute targets: a name maps to the module that renders and runs a Plan there.

Each module offers ``request(plan) -> dict`` (pure: what would be submitted, shown by
``--dry-run``) and ``run(plan, ...)`` / ``run_many(plans, ...)`` (act).
"""
from __future__ import annotations

import importlib
from types import ModuleType

from tfrun.errors import ConfigError

TARGETS: dict[str, str] = {
    "local": "tfrun.targets.local",
    "slurm": "tfrun.targets.slurm",
}


def get(target: str) -> ModuleType:
    """The launcher module for a compute target; an unknown one lists the known ones."""
    if target not in TARGETS:
        raise ConfigError.invalid("compute.target", target, sorted(TARGETS))
    return importlib.import_module(TARGETS[target])
