"""Compute targets: where planned runs are started and followed. Each is a
:class:`~tfrun.targets.target.Target` (run, run_many, poll, cancel, signal); :func:`get` maps a
plan's ``compute.target`` to one and :func:`of` a run's status to the one that runs it: the only
places that look at a target's name.

What each target is asked to do was rendered at plan time (:mod:`tfrun.plan`); here is the
acting half: :mod:`~tfrun.targets.local` (processes on this machine),
:mod:`~tfrun.targets.slurm` (submitit), :mod:`~tfrun.targets.pool` (warm pools for packed
sweeps, local sweeps and tuning studies), :mod:`~tfrun.targets.settle` (how a run ended, by one
set of rules for every target), :mod:`~tfrun.targets.report` (what is printed when a run ends).
A run's life across them is the runner's (:mod:`tfrun.runner`).
"""

from __future__ import annotations

from typing import Any, Mapping

from tfrun.errors import ConfigError
from tfrun.targets.target import LocalTarget, PoolTarget, SlurmTarget, Target

TARGETS: dict[str, Target] = {"local": LocalTarget(), "slurm": SlurmTarget()}
POOL = PoolTarget()


def get(target: str) -> Target:
    """The target a plan's ``compute.target`` names; an unknown one lists the known ones."""
    if target not in TARGETS:
        raise ConfigError.invalid("compute.target", target, sorted(TARGETS))
    return TARGETS[target]


def of(status: Mapping[str, Any]) -> Target:
    """The target that runs a run with this status: its pool's, if it is a pool's item."""
    return POOL if status.get("pool") else get(str(status.get("target", "local")))


def followed_here(target: object) -> bool:
    """Is a run on this target followed by the process that started it (its tasks are that
    process's children), rather than handed to a scheduler? False for a name that is none."""
    known = TARGETS.get(str(target))
    return known is not None and known.follows_here


__all__ = ["POOL", "TARGETS", "Target", "followed_here", "get", "of"]
