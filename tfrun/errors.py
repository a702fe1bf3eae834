"""The few exception types tfrun raises, so callers can tell user mistakes from failures."""

from __future__ import annotations

import importlib.util
from typing import Iterable


class TfrunError(Exception):
    """Base class of every error tfrun raises on purpose."""

    exit_code = 1


class UsageError(TfrunError):
    """The command line asked for something that is not there or cannot be (a run id that
    matches no run, an unknown verb). Nothing was started or changed."""

    exit_code = 2


class ConfigError(UsageError):
    """The composed configuration cannot be run as given. Nothing was started."""

    @classmethod
    def invalid(cls, key: str, value: object, allowed: str | Iterable[str]) -> "ConfigError":
        """An error that names the key, the value given and what would have been accepted."""
        if not isinstance(allowed, str):
            allowed = "one of: " + ", ".join(str(a) for a in allowed)
        return cls(f"{key}={value!r} is not valid: {allowed}.")


class LaunchError(TfrunError):
    """Starting or following the run's tasks failed."""


class RunFailed(TfrunError):
    """The run started but ended in a state other than COMPLETED."""


class BootstrapError(TfrunError):
    """A task could not be prepared before the user's script ran."""


class ExportError(TfrunError):
    """Converting or checking the trained model failed (the run itself is not affected)."""


# How the optional extras are installed (pyproject.toml's [project.optional-dependencies]).
ONNX = "pip install 'tfrun[onnx]'"
TRACKING = "pip install 'tfrun[tracking]'"
TUNE = "pip install 'tfrun[tune]'"


def require(what: str, modules: Iterable[str], install: str) -> None:
    """Refuse ``what`` (a verb, an option) when a package it needs is not installed: a
    :class:`ConfigError` (exit 2, nothing started) naming the packages and how to install them."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise ConfigError(f"{what} needs {', '.join(missing)}, which {verb} not installed here: {install}")
