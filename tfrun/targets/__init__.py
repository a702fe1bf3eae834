"""Compute targets: where planned runs are started and followed. A name maps to the module
that runs a Plan there: ``run(plan)``, and for sweeps ``run_many(plans, sweep_dir)``.

What each target is asked to do was rendered at plan time (:mod:`tfrun.plan`); here is the
acting half: :mod:`~tfrun.targets.local` (processes on this machine),
:mod:`~tfrun.targets.slurm` (submitit), :mod:`~tfrun.targets.pool` (warm pools for packed
sweeps, local sweeps and tuning studies), :mod:`~tfrun.targets.sweeps` (every point of a sweep,
for the Hydra launcher plugin and ``tfrun.sweep``), :mod:`~tfrun.targets.control` (state
and cancel, for the verbs and the API), :mod:`~tfrun.targets.report` (what is printed when
a run ends).
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
