"""tfrun: train TensorFlow/Keras scripts locally or on Slurm from a composed config.

Importing tfrun is cheap: nothing here imports TensorFlow. The names here are the public
API: launching runs from Python (``launch``, ``sweep``, ``Run``) and what a training
script may call inside its task (``context``, ``log_metric``, ``should_checkpoint``, ...);
``tfrun.distributed`` and ``tfrun.estimator`` are the two public modules besides.
"""
from __future__ import annotations

from tfrun.api import Run, launch, sweep
from tfrun.errors import ConfigError, LaunchError, RunFailed, TfrunError, UsageError
from tfrun.task.context import Context, context
from tfrun.task.heartbeat import beat as heartbeat
from tfrun.task.preempt import Preempted, on_preempt, should_checkpoint
from tfrun.tracking.metrics import log_metric, log_params

__version__ = "0.1.0"
__all__ = [
    "Context", "context", "ConfigError", "LaunchError", "RunFailed", "TfrunError", "UsageError", "__version__",
    "log_metric", "log_params", "heartbeat", "on_preempt", "should_checkpoint", "Preempted", "Run", "launch",
    "sweep",
]
