"""tfrun: train TensorFlow/Keras scripts locally or on Slurm from a composed config.

Importing tfrun is cheap: nothing here imports TensorFlow.
"""
from __future__ import annotations

from tfrun.context import Context, context
from tfrun.errors import ConfigError, LaunchError, RunFailed, TfrunError

__version__ = "0.1.0"
__all__ = ["Context", "context", "ConfigError", "LaunchError", "RunFailed", "TfrunError", "__version__"]
