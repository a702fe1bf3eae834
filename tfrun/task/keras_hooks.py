"""tfrun's callbacks in every Keras ``model.fit`` of a task, without changing the script.

The bootstrap installs an import hook: when ``keras`` (Keras 3) or ``tf_keras`` (legacy
Keras) is imported, ``Model.fit`` is wrapped so that it restores the run's backup (if a
previous attempt left one; a call a previous attempt finished is not run again) and adds
callbacks: the backup of finished epochs (written by the chief, read by every rank) with
the metrics record, and a stop at the next batch end when preemption is signalled.
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Any, Callable

PATCHED_MODULES = ("keras", "tf_keras")


class _HookedLoader(importlib.abc.Loader):
    """Runs the real loader, then a hook on the fully imported module."""

    def __init__(self, loader: Any, hook: Callable[[ModuleType], None]):
        self.loader, self.hook = loader, hook

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        self.hook(module)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it wraps the loader of the modules it watches."""

    def __init__(self, hook: Callable[[ModuleType], None]):
        self.hook, self.busy = hook, False

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name not in PATCHED_MODULES or self.busy:
            return None
        self.busy = True  # find_spec below walks sys.meta_path again
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self.busy = False
        if spec is None or spec.loader is None:
            return None
        spec.loader = _HookedLoader(spec.loader, self.hook)
        return spec


def patch_fit(module: ModuleType) -> None:
    """Wrap ``module.Model.fit`` once."""
    model_cls = getattr(module, "Model", None)
    if model_cls is None or getattr(model_cls.fit, "_tfrun", False):
        return
    original = model_cls.fit

    @functools.wraps(original)
    def fit(self: Any, *args: Any, **kwargs: Any) -> Any:
        if len(args) > 5:  # callbacks given positionally: leave this call alone
            return original(self, *args, **kwargs)
        from tfrun.task import checkpoint, heartbeat, preempt

        epochs = int(kwargs.get("epochs", args[3] if len(args) > 3 else 1))
        start = checkpoint.session(self, module, epochs, int(kwargs.get("initial_epoch") or 0))
        if start.history is not None:  # finished by an earlier attempt
            return start.history
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), *start.callbacks]
        if start.initial_epoch:
            kwargs["initial_epoch"] = start.initial_epoch
        if not any(getattr(cb, "stops_on_request", False) for cb in start.callbacks):
            return original(self, *args, **kwargs)
        try:
            with preempt.listening():
                return original(self, *args, **kwargs)
        finally:
            heartbeat.release()  # fit's end was progress until now (checkpoint's on_train_end)

    fit._tfrun = True  # type: ignore[attr-defined]
    model_cls.fit = fit


def install() -> None:
    """Patch Keras now if it is imported, else as soon as it is."""
    sys.meta_path.insert(0, _PostImportFinder(patch_fit))
    for name in PATCHED_MODULES:
        if name in sys.modules:
            patch_fit(sys.modules[name])
