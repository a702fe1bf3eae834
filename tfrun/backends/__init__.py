"""Backend registry: a name maps to a module, imported only when that backend is used.

Each backend module has two halves. The plan-time half (``check``, ``roles``,
``task_env``, ``tf_config``) is pure and imports nothing heavy; the in-task half
(``setup``) runs inside the task and may import TensorFlow or Horovod, inside the
function only.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from tfrun.errors import ConfigError

BACKENDS: dict[str, str] = {
    "none": "tfrun.backends.none",
}


def get(name: str) -> ModuleType:
    """The backend module for ``name``; an unknown name lists the known ones."""
    if name not in BACKENDS:
        raise ConfigError.invalid("backend.name", name, sorted(BACKENDS))
    return importlib.import_module(BACKENDS[name])
