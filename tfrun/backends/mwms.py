"""``backend=mwms``: tf.distribute.MultiWorkerMirroredStrategy.

Every task is a worker (worker 0 acts as chief) and runs the script; TF_CONFIG names
them all. Keras ``model.fit`` under this strategy needs legacy Keras (tf_keras) on
TF >= 2.16, so TF_USE_LEGACY_KERAS=1 is set.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping, Sequence

from tfrun.backends import tfconfig
from tfrun.task.identity import TaskIdentity

TOLERATES_WORKER_LOSS = False


def check(backend: Mapping[str, Any], world_size: int) -> None:
    """Any number of workers (one is a plain single-worker run)."""


def roles(backend: Mapping[str, Any], world_size: int) -> list[tuple[str, int, bool]]:
    """Every rank is a worker that runs the script."""
    return [("worker", rank, True) for rank in range(world_size)]


def tf_config(backend: Mapping[str, Any], roles: tfconfig.Roles, rank: int) -> dict[str, Any]:
    """TF_CONFIG with placeholders for hosts and ports."""
    return tfconfig.tf_config(roles, rank)


def setup(backend: Mapping[str, Any], ident: TaskIdentity, run_dir: str, task: Any, plan: Any) -> dict[str, str]:
    """The real TF_CONFIG, once every worker has published its address."""
    config = tfconfig.resolve(
        run_dir, ident, plan_roles(plan), float(backend["rendezvous_timeout_s"]), backend.get("iface")
    )
    return {"TF_CONFIG": json.dumps(config)}


def plan_roles(plan: Any) -> list[tuple[str, int, bool]]:
    """The roles recorded in a plan, in rank order."""
    return [(t.role, t.role_index, t.runs_script) for t in plan.tasks]


def stop_vote(model: Any) -> Callable[[Sequence[int]], list[int]] | None:
    """How this worker votes with the others on stopping (:mod:`tfrun.task.agreement`): a sum
    through the model's strategy. None for a model built outside a MultiWorkerMirroredStrategy
    (each worker then trains on its own, and stops on its own)."""
    import tensorflow as tf

    strategy = getattr(model, "distribute_strategy", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return None

    def vote(numbers: Sequence[int]) -> list[int]:
        # float64: whole numbers stay exact, and every collective implementation reduces it.
        values = strategy.experimental_distribute_values_from_function(
            lambda context: tf.constant(list(numbers), tf.float64)
        )
        summed = strategy.reduce(tf.distribute.ReduceOp.SUM, values, axis=None)
        return [int(round(v)) for v in summed.numpy()]

    return vote
