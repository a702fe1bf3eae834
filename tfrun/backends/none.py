"""``backend=none``: every task runs the script on its own, with nothing shared."""

from __future__ import annotations

from typing import Any, Mapping

from tfrun.task.identity import TaskIdentity

TOLERATES_WORKER_LOSS = False


def check(backend: Mapping[str, Any], world_size: int) -> None:
    """Any number of tasks is fine without a backend."""


def roles(backend: Mapping[str, Any], world_size: int) -> list[tuple[str, int, bool]]:
    """(role, index within role, runs the user's script) for each rank."""
    return [("worker", rank, True) for rank in range(world_size)]


def tf_config(backend: Mapping[str, Any], roles: list[tuple[str, int, bool]], rank: int) -> dict[str, Any] | None:
    """No TF_CONFIG: the script sees a single-worker TensorFlow."""
    return None


def setup(backend: Mapping[str, Any], ident: TaskIdentity, run_dir: str, task: Any, plan: Any) -> dict[str, str]:
    """Nothing to prepare in the task."""
    return {}
