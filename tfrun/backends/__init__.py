"""Backend registry: a name maps to a module, imported only when that backend is used.

Each backend module has two halves. The plan-time half (``check``, ``roles``,
``tf_config``) is pure and imports nothing heavy; the in-task half (``setup``, and
optionally ``serve`` for tasks that do not run the script and ``finish`` after the
script) runs inside the task and may import TensorFlow or Horovod, inside the
function only. ``TOLERATES_WORKER_LOSS``: a task that does not run the script may die
without ending the run.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from tfrun.errors import ConfigError

BACKENDS: dict[str, str] = {
    "none": "tfrun.backends.none",
    "horovod": "tfrun.backends.horovod",
    "ps": "tfrun.backends.ps",
    "mwms": "tfrun.backends.mwms",
}


def get(name: str) -> ModuleType:
    """The backend module for ``name``; an unknown name lists the known ones."""
    if name not in BACKENDS:
        raise ConfigError.invalid("backend.name", name, sorted(BACKENDS))
    return importlib.import_module(BACKENDS[name])
