"""Backup and restore of Keras training across preemptions, in the run dir.

The chief writes ``checkpoints/backup/epoch-<n>.weights.h5`` after every finished
epoch (temp file + rename), then ``state.json`` naming it (the commit point); every
rank restores from the chief's backup, so all resume from the same epoch.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from tfrun import preempt, runs, tracking
from tfrun.context import context

BACKUP_DIR = "checkpoints/backup"


def backup_dir() -> Path:
    """Where this run's backups live."""
    return Path(context().run_dir or ".") / BACKUP_DIR


def restore(model: Any) -> tuple[int, dict[str, Any] | None]:
    """Load the last backup into ``model``; (finished epochs, that epoch's logs)."""
    state = runs.read_json(backup_dir() / "state.json")
    if not state:
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


def _callback_classes(module: ModuleType) -> tuple[type, type]:
    base = module.callbacks.Callback

    class Backup(base):  # type: ignore[misc, valid-type]
        """Every finished epoch: weights (atomically), then the state that commits them."""

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            done = epoch + 1
            logs = {k: float(v) for k, v in (logs or {}).items()}
            chief = context().is_chief
            folder = backup_dir() if chief else backup_dir() / f".rank{context().rank}"
            folder.mkdir(parents=True, exist_ok=True)
            name = f"epoch-{done}.weights.h5"
            tmp = folder / f"tmp-{name}"
            if not chief:
                # Under MultiWorkerMirroredStrategy every worker must take part in a save;
                # the others' copies are thrown away.
                if os.environ.get("TFRUN_BACKEND") == "mwms":
                    self.model.save_weights(str(tmp))
                    tmp.unlink(missing_ok=True)
                return
            self.model.save_weights(str(tmp))
            os.replace(tmp, folder / name)
            runs.write_json(folder / "state.json", {"epoch": done, "weights": name, "logs": logs})
            for old in folder.glob("epoch-*.weights.h5"):
                if old.name != name:
                    old.unlink(missing_ok=True)
            tracking.log_epoch(epoch, logs)

    class StopOnRequest(base):  # type: ignore[misc, valid-type]
        """Leave fit at the next batch end once a stop was requested."""

        stops_on_request = True

        def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            if preempt.should_checkpoint():
                raise preempt.Preempted()

    return Backup, StopOnRequest


def session(model: Any, module: ModuleType) -> tuple[int, list[Any]]:
    """For one ``fit`` call: the epoch to start from and the callbacks to add."""
    if not context().under_tfrun:
        return 0, []
    done, logs = restore(model)
    if context().is_chief:
        tracking.reconcile_epochs(done, logs)
    backup, stop = _callback_classes(module)
    if os.environ.get("TFRUN_BACKEND") == "ps":
        # tf_keras refuses batch-level callbacks under ParameterServerStrategy (ValueError
        # in fit), so there a stop request is not acted on mid-epoch; the backup still is.
        return done, [backup()]
    return done, [backup(), stop()]
