"""Backup and restore of Keras training across preemptions, in the run dir.

The chief writes ``checkpoints/backup/epoch-<n>.weights.h5`` after finished epochs
(temp file + rename), then ``state.json`` naming it (the commit point); every rank
restores from the chief's backup, so all resume from the same epoch; only a backup of an
earlier attempt is restored (a rank that starts fit late must not resume from the epoch
its chief just finished in this attempt). Epochs much
shorter than a save are backed up less often (see BACKUP_BUDGET), the last one always
before a requested stop and at the end of fit.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from tfrun import rundir
from tfrun.task import heartbeat, preempt, rendezvous
from tfrun.task.context import context
from tfrun.tracking import metrics

BACKUP_DIR = "checkpoints/backup"


def backup_dir() -> Path:
    """Where this run's backups live."""
    return Path(context().run_dir or ".") / BACKUP_DIR


def restore(model: Any) -> tuple[int, dict[str, Any] | None]:
    """Load the last backup into ``model``; (finished epochs, that epoch's logs)."""
    state = rundir.read_json(backup_dir() / "state.json")
    if not state or state.get("attempt") == rendezvous.attempt_key():
        return 0, None
    if not model.built:
        print("tfrun: cannot restore the backup into an unbuilt model (build it before fit); "
              "training starts over", file=sys.stderr, flush=True)
        return 0, None
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and hasattr(optimizer, "built") and not optimizer.built:
        optimizer.build(model.trainable_variables)  # so that its saved state has somewhere to go
    model.load_weights(str(backup_dir() / state["weights"]))
    print(f"tfrun: resumed from the backup of epoch {state['epoch']}", file=sys.stderr, flush=True)
    return int(state["epoch"]), state.get("logs")


# Every finished epoch is backed up unless saving would cost more than 1/BACKUP_BUDGET of
# the training time: on epochs much shorter than a save (small models, a few batches), a
# save per epoch was ~5 % of a run. Skipped epochs are kept in memory instead (weights and
# optimizer state, a copy that costs far less than a file) and written when a stop is
# requested (preemption, time limit, Ctrl-C) or when fit ends, so a requeued job still
# resumes from its last finished epoch; only a hard crash loses the unsaved epochs (at most
# ~BACKUP_BUDGET times the cost of a save).
BACKUP_BUDGET = 50
# How long the end of fit, after its last callback, counts as progress for the watchdog.
FIT_END_GRACE_S = 120.0
FIRST_BATCH_GRACE_S = 120.0  # an evaluation's first batch: its function is built (traced) first


def _optimizer_variables(model: Any) -> list[Any]:
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return []
    found = optimizer.variables
    return list(found() if callable(found) else found)  # a method on legacy optimizers


def _snapshot(model: Any) -> tuple[list[Any], list[Any]]:
    """The model's weights and its optimizer's state, as host arrays."""
    return model.get_weights(), [v.numpy() for v in _optimizer_variables(model)]


def _put_back(model: Any, snapshot: tuple[list[Any], list[Any]]) -> None:
    weights, optimizer_state = snapshot
    model.set_weights(weights)
    for variable, value in zip(_optimizer_variables(model), optimizer_state):
        variable.assign(value)


def _callback_classes(module: ModuleType) -> tuple[type, type]:
    base = module.callbacks.Callback

    class Backup(base):  # type: ignore[misc, valid-type]
        """Finished epochs: weights (atomically), then the state that commits them.

        ``spaced``: back up within the time budget and keep the other epochs in memory
        (only where a stop request writes them: not under MultiWorkerMirroredStrategy,
        whose saves every worker must join at the same epoch, nor parameter servers).
        """

        def __init__(self, spaced: bool = False):
            super().__init__()
            self.spaced, self.cost, self.since, self.held = spaced, None, time.monotonic(), None
            self.cut = False  # a stop request ended the epoch before its last batch

        def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
            self.since = time.monotonic()

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            if self.cut:  # not a finished epoch: the last finished one is what a stop keeps
                return
            done = epoch + 1
            heartbeat.beat(epoch=done)
            logs = {k: float(v) for k, v in (logs or {}).items()}
            if not context().is_chief:
                # Under MultiWorkerMirroredStrategy every worker must take part in a save;
                # the others' copies are thrown away.
                if os.environ.get("TFRUN_BACKEND") == "mwms":
                    folder = backup_dir() / f".rank{context().rank}"
                    folder.mkdir(parents=True, exist_ok=True)
                    self.model.save_weights(str(folder / f"tmp-epoch-{done}.weights.h5"))
                    (folder / f"tmp-epoch-{done}.weights.h5").unlink(missing_ok=True)
                return
            if self.spaced and self.cost is not None and time.monotonic() - self.since < BACKUP_BUDGET * self.cost:
                try:
                    self.held = (done, logs, _snapshot(self.model))
                except Exception:  # a model or optimizer this cannot copy: save every epoch
                    self.spaced = False
            if self.held is None or self.held[0] != done:
                self.write(done, logs)
            metrics.log_epoch(epoch, logs)

        def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
            self.write_held()

        def write_held(self) -> None:
            """Write the last finished epoch if only memory has it (fit ends, or a stop)."""
            if self.held is None:
                return
            done, logs, snapshot = self.held
            current = _snapshot(self.model)
            _put_back(self.model, snapshot)
            try:
                self.write(done, logs)
            finally:
                _put_back(self.model, current)

        def write(self, done: int, logs: dict[str, Any]) -> None:
            with heartbeat.busy("writing a backup"):
                self._write(done, logs)

        def _write(self, done: int, logs: dict[str, Any]) -> None:
            began = time.monotonic()
            folder = backup_dir()
            folder.mkdir(parents=True, exist_ok=True)
            name = f"epoch-{done}.weights.h5"
            tmp = folder / f"tmp-{name}"
            self.model.save_weights(str(tmp))
            os.replace(tmp, folder / name)
            rundir.write_json(folder / "state.json", {"epoch": done, "weights": name, "logs": logs,
                                                         "attempt": rendezvous.attempt_key()})
            for old in folder.glob("epoch-*.weights.h5"):
                if old.name != name:
                    old.unlink(missing_ok=True)
            self.held, self.since = None, time.monotonic()
            self.cost = self.since - began

    class StopOnRequest(base):  # type: ignore[misc, valid-type]
        """Leave fit at the next batch end once a stop was requested, the last finished
        epoch backed up; and beat for the watchdog at every batch, of training and of
        evaluation (a long validation is progress, not a hang)."""

        stops_on_request = True
        # Its batch hooks read no logs and need not run on the training loop's thread: Keras 3
        # then runs them on a thread of its own and legacy Keras hands them its tensors as they
        # are. A batch hook that must convert the logs makes every step wait for the previous
        # one's results.
        async_safe = True
        _supports_tf_logs = True

        def __init__(self, backup: Any):
            super().__init__()
            self.backup, self.steps, self.first_batch = backup, 0, False
            self.loop_thread: int | None = None

        def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
            self.loop_thread = threading.get_ident()

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            self._stop_if_requested()

        def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
            self._stop_if_requested()  # not a validation of an epoch cut short
            # An evaluation's first batch builds its function first (seconds; far more on a
            # loaded machine), with no batch end to beat at: progress until that batch ends.
            heartbeat.hold("evaluating: the first batch", limit_s=FIRST_BATCH_GRACE_S)
            self.first_batch = True

        def on_test_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            self._evaluated()

        def on_predict_begin(self, logs: dict[str, Any] | None = None) -> None:
            self.on_test_begin(logs)

        def on_predict_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            self._evaluated()

        def on_test_end(self, logs: dict[str, Any] | None = None) -> None:
            if self.first_batch:  # an evaluation of no batch: nothing left to wait for
                self._evaluated()

        def on_predict_end(self, logs: dict[str, Any] | None = None) -> None:
            self.on_test_end(logs)

        def _evaluated(self) -> None:
            if self.first_batch:
                self.first_batch = False
                heartbeat.release()  # beats too
            else:
                heartbeat.beat()

        def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
            # What fit does after its last callback (freeing its data pipeline and, under
            # Horovod, waiting on the other ranks' ends) has been seen to take 15-20 s; it is
            # no hang unless it lasts far longer. The fit hook releases this when fit returns.
            heartbeat.hold("ending fit", limit_s=FIT_END_GRACE_S)

        def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            self.steps += 1
            heartbeat.beat(step=self.steps)
            if not preempt.should_checkpoint():
                return
            if threading.get_ident() == self.loop_thread:
                self._stop()
            # On Keras's callback thread, where raising would reach fit only at the epoch's
            # end: the loop leaves the epoch after its current step, and the next hook on its
            # own thread (the evaluation's start, the epoch's end) stops.
            self.backup.cut = True
            self.model.stop_training = True

        def _stop_if_requested(self) -> None:
            if self.loop_thread is not None and preempt.should_checkpoint():
                self._stop()

        def _stop(self) -> None:
            if context().is_chief:
                self.backup.write_held()
            raise preempt.Preempted()

    return Backup, StopOnRequest


def session(model: Any, module: ModuleType) -> tuple[int, list[Any]]:
    """For one ``fit`` call: the epoch to start from and the callbacks to add."""
    if not context().under_tfrun:
        return 0, []
    done, logs = restore(model)
    if context().is_chief:
        metrics.reconcile_epochs(done, logs)
    backup_class, stop_class = _callback_classes(module)
    backend = os.environ.get("TFRUN_BACKEND")
    if backend == "ps":
        # tf_keras refuses batch-level callbacks under ParameterServerStrategy (ValueError
        # in fit), so there a stop request is not acted on mid-epoch; the backup still is.
        return done, [backup_class()]
    backup = backup_class(spaced=backend != "mwms")
    return done, [backup, stop_class(backup)]
