"""tfrun: train TensorFlow/Keras scripts locally or on Slurm from a composed config.

Importing tfrun is cheap: nothing here imports TensorFlow.
"""
from __future__ import annotations

from tfrun.api import Run, launch, sweep
from tfrun.context import Context, context
from tfrun.errors import ConfigError, LaunchError, RunFailed, TfrunError
from tfrun.preempt import on_preempt, should_checkpoint
from tfrun.tracking import log_metric, log_params

__version__ = "0.1.0"
__all__ = [
    "Context", "context", "ConfigError", "LaunchError", "RunFailed", "TfrunError", "__version__",
    "log_metric", "log_params", "on_preempt", "should_checkpoint", "Run", "launch", "sweep",
]
