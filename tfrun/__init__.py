"""tfrun: train TensorFlow/Keras scripts locally or on Slurm from a composed config.

Importing tfrun is cheap: nothing here imports TensorFlow, and each name below is imported
when it is first used (the command line needs none of them). The names here are the
public API: launching runs from Python (``launch``, ``sweep``, ``Run``) and what a
training script may call inside its task (``context``, ``log_metric``,
``should_checkpoint``, ...); ``tfrun.distributed`` and ``tfrun.estimator`` are the two
public modules besides.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> (module, attribute): the public API, each imported on first use.
_PUBLIC = {
    "Run": ("tfrun.api", "Run"),
    "launch": ("tfrun.api", "launch"),
    "sweep": ("tfrun.api", "sweep"),
    "ConfigError": ("tfrun.errors", "ConfigError"),
    "LaunchError": ("tfrun.errors", "LaunchError"),
    "RunFailed": ("tfrun.errors", "RunFailed"),
    "TfrunError": ("tfrun.errors", "TfrunError"),
    "UsageError": ("tfrun.errors", "UsageError"),
    "Context": ("tfrun.task.context", "Context"),
    "context": ("tfrun.task.context", "context"),
    "heartbeat": ("tfrun.task.heartbeat", "beat"),
    "Preempted": ("tfrun.task.preempt", "Preempted"),
    "on_preempt": ("tfrun.task.preempt", "on_preempt"),
    "should_checkpoint": ("tfrun.task.preempt", "should_checkpoint"),
    "log_metric": ("tfrun.tracking.metrics", "log_metric"),
    "log_params": ("tfrun.tracking.metrics", "log_params"),
}
__all__ = ["__version__", *_PUBLIC]

if TYPE_CHECKING:
    from tfrun.api import Run, launch, sweep
    from tfrun.errors import ConfigError, LaunchError, RunFailed, TfrunError, UsageError
    from tfrun.task.context import Context, context
    from tfrun.task.heartbeat import beat as heartbeat
    from tfrun.task.preempt import Preempted, on_preempt, should_checkpoint
    from tfrun.tracking.metrics import log_metric, log_params


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'tfrun' has no attribute {name!r}")
    module, attribute = _PUBLIC[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # once: later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
