"""Backup and restore of Keras training across preemptions (the files: :mod:`tfrun.task.backups`).

The chief writes a backup after finished epochs; every rank restores from it, so all resume
from the same epoch. Epochs much shorter than a save are backed up less often (see
BACKUP_BUDGET), the last one always before a requested stop and at the end of fit.

A script may call ``fit`` more than once (a head, then fine-tuning; ``fit(epochs=1)`` in a
loop; ``initial_epoch``). The calls are numbered in the order a task makes them, and the
run's epochs go on across them: a later call's epochs are recorded after the earlier ones'
(see :func:`session`). A requeued job runs the script again from the top; it restores at
the call the backup was made in: the calls before it were finished by an earlier attempt
and are skipped (they return the History they had; the model gets the backup's weights
where they fit it), the ones after it start as they would.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from tfrun import variables
from tfrun.paths import RunPaths
from tfrun.task import agreement, backups, heartbeat, preempt, rendezvous
from tfrun.task.backups import Entry, say
from tfrun.task.context import context
from tfrun.tracking import metrics

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


@dataclass
class _Attempt:
    """This task's fits in this attempt."""

    fits: int = 0  # fit calls so far
    points: list[Entry] = field(default_factory=list)  # backups of earlier attempts, newest first
    offset: int = 0  # the run's epochs finished so far
    primed: set[int] = field(default_factory=set)  # models given the backup's weights while skipping


_attempt = _Attempt()


@dataclass(frozen=True)
class Start:
    """How one ``fit`` call goes: from which epoch, with which callbacks, or not at all (``history``)."""

    initial_epoch: int
    callbacks: list[Any]
    history: Any = None  # the call was finished by an earlier attempt: what fit returns instead


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


def _load(model: Any, entry: Entry) -> str | None:
    """Load a backup into ``model``; why it could not (the model is then as it was)."""
    if not model.built:
        return "the model is not built (build it before fit)"
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and hasattr(optimizer, "built") and not optimizer.built:
        optimizer.build(model.trainable_variables)  # so that its saved state has somewhere to go
    before = _snapshot(model)
    try:
        model.load_weights(str(backups.folder() / entry.weights))
    except Exception as exc:  # a damaged file, or a model the backup does not fit: the caller falls back
        _put_back(model, before)
        return f"{type(exc).__name__}: {exc}"
    return None


def _restore(model: Any, fit: int) -> Entry | None:
    """Load the newest backup of this fit call that loads, falling back to the one before it."""
    for entry in [e for e in _attempt.points if e.fit == fit]:
        why = _load(model, entry)
        if why is None:
            say(f"resumed from the backup of epoch {entry.total}")
            return entry
        say(f"warning: the backup of epoch {entry.total} does not load ({why.splitlines()[0]})")
    say("no backup loads into this model: this fit starts over")
    return None


def _begin_attempt() -> None:
    """At this attempt's first fit: the backups it may restore; the metrics made to match the newest."""
    _attempt.points = backups.restore_points(rendezvous.attempt_key())
    point = _attempt.points[0] if _attempt.points else None
    if context().is_chief:
        metrics.reconcile_epochs(point.total if point else 0, point.logs if point else None, point.fit if point else 0)


def _history(module: ModuleType, model: Any, fit: int, initial_epoch: int) -> Any:
    """What a fit call finished by an earlier attempt returns: its epochs, from the run's metrics."""
    history = module.callbacks.History()
    history.set_model(model)
    records = [
        r
        for r in metrics.read_metrics(RunPaths.of(context().run_dir or ".").metrics)
        if r.get("epoch") is not None and int(r.get("fit") or 0) == fit
    ]
    history.epoch = list(range(initial_epoch, initial_epoch + len(records)))
    history.history = {}
    for record in records:
        for key, value in metrics.epoch_values(record).items():
            history.history.setdefault(key, []).append(value)
    return history


def _finished_earlier(model: Any, module: ModuleType, fit: int, initial_epoch: int) -> Start:
    """A fit call an earlier attempt finished: not run again; the model gets the newest
    backup's weights if they fit it (what the script does between its fits then sees them)."""
    say(f"fit call {fit + 1} was finished by an earlier attempt: skipped")
    if id(model) not in _attempt.primed and _attempt.points:
        _attempt.primed.add(id(model))
        why = _load(model, _attempt.points[0])
        if why is not None:
            say(
                f"its model keeps its own weights: the backup (of fit call {_attempt.points[0].fit + 1}) "
                f"does not fit it ({why.splitlines()[0]})"
            )
    return Start(0, [], _history(module, model, fit, initial_epoch))


def session(model: Any, module: ModuleType, epochs: int, initial_epoch: int = 0) -> Start:
    """For one ``fit(epochs=..., initial_epoch=...)`` call: how it goes (see the module's doc)."""
    if not context().under_tfrun:
        return Start(initial_epoch, [])
    fit = _attempt.fits
    _attempt.fits += 1
    if fit == 0:
        _begin_attempt()
    point = _attempt.points[0] if _attempt.points else None
    if point is not None and fit < point.fit:
        return _finished_earlier(model, module, fit, initial_epoch)
    # The run's epoch of this call's Keras epoch e is e + shift: after the epochs recorded so
    # far, unless the call numbers its epochs on from them itself (initial_epoch).
    shift, initial = max(0, _attempt.offset - initial_epoch), initial_epoch
    if point is not None and fit == point.fit:
        restored = _restore(model, fit)
        shift = restored.shift if restored else point.shift
        initial = max(initial_epoch, restored.epoch) if restored else initial_epoch
        _attempt.offset = shift + initial
        if context().is_chief and (restored is None or restored != point):
            # Not the backup the metrics were matched to: the epochs after this one are trained again.
            metrics.reconcile_epochs(_attempt.offset, restored.logs if restored else None, fit)
        if restored is not None and initial >= epochs:
            return Start(initial, [], _history(module, model, fit, initial_epoch))
    return Start(initial, _callbacks(module, model, fit, shift))


def _callbacks(module: ModuleType, model: Any, fit: int, shift: int) -> list[Any]:
    backup_class, stop_class = _callback_classes(module)
    backend = os.environ.get(variables.BACKEND)
    backup = backup_class(fit, shift, spaced=backend not in ("mwms", "ps"))
    if backend == "ps":
        # tf_keras refuses batch-level callbacks under ParameterServerStrategy (ValueError
        # in fit), so there a stop request is not acted on mid-epoch; the backup still is.
        return [backup]
    return [backup, stop_class(backup, agreement.vote_for(model))]


def _callback_classes(module: ModuleType) -> tuple[type, type]:
    base = module.callbacks.Callback

    class Backup(base):  # type: ignore[misc, valid-type]
        """Finished epochs: weights, then the state that commits them (:func:`backups.commit`).

        ``spaced``: back up within the time budget and keep the other epochs in memory
        (only where a stop request writes them: not under MultiWorkerMirroredStrategy,
        whose saves every worker must join at the same epoch, nor parameter servers).
        """

        def __init__(self, fit: int, shift: int, spaced: bool = False):
            super().__init__()
            self.fit, self.shift = fit, shift
            self.spaced, self.since = spaced, time.monotonic()
            self.cost: float | None = None  # seconds the last backup took
            self.held: tuple[int, dict[str, Any], tuple[list[Any], list[Any]]] | None = None  # (epoch, logs, snapshot)
            self.cut = False  # a stop request ended the epoch before its last batch

        def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
            self.since = time.monotonic()

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            if self.cut:  # not a finished epoch: the last finished one is what a stop keeps
                return
            done = epoch + 1
            _attempt.offset = done + self.shift
            heartbeat.beat(epoch=_attempt.offset)
            logs = {k: float(v) for k, v in (logs or {}).items()}
            if not backups.writes():
                # Under MultiWorkerMirroredStrategy every worker must take part in a save;
                # the others' copies are thrown away.
                if os.environ.get(variables.BACKEND) == "mwms":
                    scratch = backups.paths().scratch(context().rank)
                    scratch.mkdir(parents=True, exist_ok=True)
                    thrown = scratch / backups.weights_name(done)
                    self.model.save_weights(str(thrown))
                    thrown.unlink(missing_ok=True)
                return
            if self.spaced and self.cost is not None and time.monotonic() - self.since < BACKUP_BUDGET * self.cost:
                try:
                    self.held = (done, logs, _snapshot(self.model))
                except Exception:  # a model or optimizer this cannot copy: save every epoch
                    self.spaced = False
            if self.held is None or self.held[0] != done:
                self.write(done, logs)
            if context().is_chief:
                metrics.log_epoch(epoch + self.shift, logs, self.fit)

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
            began = time.monotonic()
            entry = Entry(
                self.fit, done, self.shift, backups.weights_name(done + self.shift), logs, rendezvous.attempt_key()
            )
            with heartbeat.busy("writing a backup"):
                backups.commit(self.model.save_weights, entry)
            self.held, self.since = None, time.monotonic()
            self.cost = self.since - began

    class StopOnRequest(base):  # type: ignore[misc, valid-type]
        """Leave fit at the next batch end once a stop was requested, the last finished
        epoch backed up; and beat for the watchdog at every batch, of training and of
        evaluation (a long validation is progress, not a hang). With a ``vote`` (ranks that
        train together), only at a batch end all ranks agreed on (:mod:`tfrun.task.agreement`)."""

        stops_on_request = True
        # Its batch hooks read no logs and need not run on the training loop's thread: Keras 3
        # then runs them on a thread of its own and legacy Keras hands them its tensors as they
        # are. A batch hook that must convert the logs makes every step wait for the previous
        # one's results.
        async_safe = True
        _supports_tf_logs = True

        def __init__(self, backup: Any, vote: agreement.Vote | None = None):
            super().__init__()
            self.backup, self.steps, self.first_batch, self.epoch = backup, 0, False, 0
            self.loop_thread: int | None = None
            self.agreement = agreement.Agreement(vote) if vote is not None else None
            if self.agreement is not None:
                self.async_safe = False  # a vote is a collective: on the loop's thread, in step order

        def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
            self.loop_thread = threading.get_ident()

        def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            self.epoch = epoch

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
            if self.agreement is not None:
                if self.agreement.stop_at(self.steps):
                    self._stop(f"epoch {self.epoch + 1}, batch {batch + 1}: every rank stops here")
                return
            if not preempt.should_checkpoint():
                return
            if threading.get_ident() == self.loop_thread:
                self._stop(f"epoch {self.epoch + 1}, batch {batch + 1}")
            # On Keras's callback thread, where raising would reach fit only at the epoch's
            # end: the loop leaves the epoch after its current step, and the next hook on its
            # own thread (the evaluation's start, the epoch's end) stops.
            self.backup.cut = True
            self.model.stop_training = True

        def _stop_if_requested(self) -> None:
            # Ranks that vote stop only where they agreed: a rank that left here alone would
            # leave the others waiting in the next collective.
            if self.agreement is None and self.loop_thread is not None and preempt.should_checkpoint():
                self._stop(f"epoch {self.epoch + 1}")

        def _stop(self, where: str) -> None:
            say(f"stopping after {where}")
            if backups.writes():
                self.backup.write_held()
            raise preempt.Preempted()

    return Backup, StopOnRequest
