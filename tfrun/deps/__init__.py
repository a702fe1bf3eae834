"""The packages a run needs (``deps=pip|conda|modules|container``): built once, reused everywhere.

Two halves, like the backends. :func:`plan_for` is pure (:mod:`tfrun.deps.plan`): the
composed ``deps`` section becomes a :class:`DepsPlan` that ``--dry-run`` shows.
:func:`prepare`, called by the launchers before any task starts, acts
(:mod:`tfrun.deps.build`, imported when first used: planning needs none of it): it builds
a missing environment, loads modules for local tasks (:mod:`tfrun.deps.modules`), checks a
container runtime is there (:mod:`tfrun.deps.container`). Environments are kept in
:mod:`tfrun.deps.cache`, built under a file lock in a temporary dir renamed into place on
success: concurrent runs build one once, and no run sees a half-built one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tfrun.deps.plan import DepsPlan, describe, plan_for, python_words, setup_lines

if TYPE_CHECKING:
    from tfrun.deps.build import ensure, prepare

__all__ = ["DepsPlan", "describe", "ensure", "plan_for", "prepare", "python_words", "setup_lines"]


def __getattr__(name: str) -> Any:
    if name in ("ensure", "prepare"):
        from tfrun.deps import build

        return getattr(build, name)
    raise AttributeError(f"module 'tfrun.deps' has no attribute {name!r}")
