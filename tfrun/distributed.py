"""Helpers for training scripts: ``import tfrun.distributed as dist``.

One script runs under every backend with these (see :mod:`tfrun.task.distributed`, where
they live with the rest of the code that runs inside a task): ``strategy()``,
``optimizer()``, ``callbacks()``, ``dataset()``, ``num_replicas()``, ``is_chief()``,
``backend()``.
"""

from __future__ import annotations

from tfrun.task.distributed import (
    backend,
    callbacks,
    dataset,
    is_chief,
    num_replicas,
    optimizer,
    strategy,
)

__all__ = ["backend", "callbacks", "dataset", "is_chief", "num_replicas", "optimizer", "strategy"]
