"""tfrun's callbacks in every Keras ``model.fit``, ``evaluate`` and ``predict`` of a task,
without changing the script.

The bootstrap installs an import hook: when ``keras`` (Keras 3) or ``tf_keras`` (legacy
Keras) is imported, ``Model.fit`` is wrapped so that it restores the run's backup (if a
previous attempt left one; a call a previous attempt finished is not run again) and adds
callbacks: the backup of finished epochs (written by the chief, read by every rank) with
the metrics record, and a stop at the next batch end when preemption is signalled. Every
batch of the three loops is a beat for the watchdog (:mod:`tfrun.task.heartbeat`); when the
outermost loop returns, the script's activity is its progress again until the next.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.util
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any, Callable

from tfrun import variables

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


# Where ``callbacks`` is among the positional arguments of each loop (after self): a call that
# gives it there is left alone.
CALLBACKS_AT = {"fit": 5, "evaluate": 6, "predict": 4}
_depth = [0]  # loops running now (a callback may run one inside another)
_beat_classes: dict[str, type] = {}


def beat_callback(module: ModuleType) -> Any:
    """A callback that beats at every batch end of the loop it is given to."""
    if module.__name__ not in _beat_classes:
        _beat_classes[module.__name__] = _beat_class(module)
    return _beat_classes[module.__name__]()


def _beat_class(module: ModuleType) -> type:
    import os

    from tfrun.task import heartbeat

    # Under ParameterServerStrategy a batch ends when its step is handed to the workers, not
    # when they have run it: then it is progress, but not the rank's measure (the workers'
    # results reach the chief's coordinator threads, whose CPU the watchdog sees).
    stepping = os.environ.get(variables.BACKEND) != "ps"

    class BeatSteps(module.callbacks.Callback):  # type: ignore[misc, name-defined]
        """A beat at every batch end (training, evaluation, prediction)."""

        async_safe = True  # reads no logs: Keras 3 may run it on a thread of its own

        def __init__(self) -> None:
            super().__init__()
            # After the base class's __init__, which sets it False: the only batch callbacks
            # ParameterServerStrategy accepts are those that take its logs as they come.
            self._supports_tf_logs = True
            self.steps = 0

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            self.steps += 1
            heartbeat.beat(step=self.steps, stepping=stepping)

        def on_test_batch_end(self, batch: int, logs: Any = None) -> None:
            heartbeat.beat(stepping=stepping)

        def on_predict_batch_end(self, batch: int, logs: Any = None) -> None:
            heartbeat.beat(stepping=stepping)

    return BeatSteps


def _loop(module: ModuleType, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    """``evaluate`` or ``predict``, with a beat at every batch."""

    @functools.wraps(original)
    def loop(self: Any, *args: Any, **kwargs: Any) -> Any:
        from tfrun.task import heartbeat

        callbacks = kwargs.get("callbacks")
        if (
            len(args) > CALLBACKS_AT[name]
            or not heartbeat.running()
            or isinstance(callbacks, module.callbacks.CallbackList)
        ):  # fit's own validation
            return original(self, *args, **kwargs)
        kwargs["callbacks"] = [*(callbacks or []), beat_callback(module)]
        with _stepping():
            return original(self, *args, **kwargs)

    loop._tfrun = True  # type: ignore[attr-defined]
    return loop


@contextlib.contextmanager
def _stepping() -> Iterator[None]:
    """A Keras loop runs: when the outermost one returns, steps stop being the rank's progress."""
    _depth[0] += 1
    try:
        yield
    finally:
        _depth[0] -= 1
        if _depth[0] == 0:
            from tfrun.task import heartbeat

            heartbeat.end_steps()


def patch_fit(module: ModuleType) -> None:
    """Wrap ``module.Model``'s ``fit``, ``evaluate`` and ``predict`` once."""
    model_cls = getattr(module, "Model", None)
    if model_cls is None or getattr(model_cls.fit, "_tfrun", False):
        return
    original = model_cls.fit

    @functools.wraps(original)
    def fit(self: Any, *args: Any, **kwargs: Any) -> Any:
        if len(args) > CALLBACKS_AT["fit"]:  # callbacks given positionally: leave this call alone
            return original(self, *args, **kwargs)
        from tfrun.task import checkpoint, heartbeat, preempt

        epochs = int(kwargs.get("epochs", args[3] if len(args) > 3 else 1))
        start = checkpoint.session(self, module, epochs, int(kwargs.get("initial_epoch") or 0))
        if start.history is not None:  # finished by an earlier attempt
            return start.history
        extra = list(start.callbacks)
        if heartbeat.running() and not any(getattr(cb, "stops_on_request", False) for cb in extra):
            extra.append(beat_callback(module))  # the stop's callback beats at every batch itself
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), *extra]
        if start.initial_epoch:
            kwargs["initial_epoch"] = start.initial_epoch
        with _stepping():
            if not any(getattr(cb, "stops_on_request", False) for cb in extra):
                return original(self, *args, **kwargs)
            try:
                with preempt.listening():
                    return original(self, *args, **kwargs)
            finally:
                heartbeat.release()  # fit's end was progress until now (checkpoint's on_train_end)

    fit._tfrun = True  # type: ignore[attr-defined]
    model_cls.fit = fit
    for name in ("evaluate", "predict"):
        setattr(model_cls, name, _loop(module, name, getattr(model_cls, name)))


def install() -> None:
    """Patch Keras now if it is imported, else as soon as it is."""
    sys.meta_path.insert(0, _PostImportFinder(patch_fit))
    for name in PATCHED_MODULES:
        if name in sys.modules:
            patch_fit(sys.modules[name])
