"""OmegaConf resolvers used by tfrun's configs."""

from __future__ import annotations

import importlib.util
import secrets
import time
from pathlib import Path

from omegaconf import OmegaConf

_RUN_ID: str | None = None


def run_id() -> str:
    """A run id made once per process: ``YYYYmmdd-HHMMSS-xxxx`` (sortable, unique enough)."""
    global _RUN_ID
    if _RUN_ID is None:
        _RUN_ID = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)
    return _RUN_ID


def reset_run_id() -> None:
    """Forget the process's run id so that the next composition makes a new one (API use)."""
    global _RUN_ID
    _RUN_ID = None


def examples_dir() -> Path:
    """Where the bundled examples are, for an installed or an editable tfrun."""
    spec = importlib.util.find_spec("tfrun.examples")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("tfrun's bundled examples are not installed")
    return Path(list(spec.submodule_search_locations)[0])


def example(relpath: str) -> str:
    """Absolute path of a bundled example file, e.g. ``${tfrun_example:digits/train.py}``."""
    return str(examples_dir() / relpath)


def register() -> None:
    """Register the resolvers once per process."""
    if not OmegaConf.has_resolver("tfrun_run_id"):
        OmegaConf.register_new_resolver("tfrun_run_id", run_id)
    if not OmegaConf.has_resolver("tfrun_example"):
        OmegaConf.register_new_resolver("tfrun_example", example)
