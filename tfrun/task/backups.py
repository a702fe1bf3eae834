"""The run's backups on disk: the weights of a finished epoch, and the state that commits them.

``checkpoints/backup/epoch-<n>.weights.h5`` holds the weights (and optimizer state) after
``n`` epochs of the run; ``state.json`` names it and commits it. A backup is written to a
temporary file, put on disk (the file, then its directory), renamed, and only then named
by ``state.json`` (written the same way): a crash at any moment leaves the last committed
backup whole. ``state.json`` also names the backup before it, whose weights are kept
until a newer one is committed: a backup that fails to load falls back to it.

The chief writes the backup every rank restores; under ``backend=none`` with several tasks
each rank trains a model of its own, and backs up and restores its own
(``checkpoints/backup/rank<k>/``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from tfrun import rundir, variables
from tfrun.paths import BackupPaths, RunPaths
from tfrun.task.context import context


@dataclass(frozen=True)
class Entry:
    """One committed backup: after ``epoch`` epochs of the script's ``fit`` call number ``fit``
    (0 for the first), whose epochs are the run's epochs ``shift`` on."""

    fit: int
    epoch: int
    shift: int
    weights: str
    logs: dict[str, Any] | None
    attempt: str | None

    @property
    def total(self) -> int:
        """Epochs of the run this backup covers."""
        return self.epoch + self.shift

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Entry":
        """From ``state.json`` (a state written before backups knew of several fits: the first)."""
        return cls(
            fit=int(data.get("fit", 0)),
            epoch=int(data["epoch"]),
            shift=int(data.get("shift", 0)),
            weights=str(data["weights"]),
            logs=data.get("logs"),
            attempt=data.get("attempt"),
        )


def say(message: str) -> None:
    print(f"tfrun: {message}", file=sys.stderr, flush=True)


def own_backups() -> bool:
    """Does every rank keep a backup of its own? (``backend=none`` with several tasks: every
    rank trains a model of its own.)"""
    return os.environ.get(variables.BACKEND, "none") == "none" and context().world_size > 1


def writes() -> bool:
    """Does this task write backups? The chief, or every rank that keeps its own."""
    return context().is_chief or own_backups()


def paths() -> BackupPaths:
    """This task's backups."""
    return RunPaths.of(context().run_dir or ".").backup(context().rank if own_backups() else 0)


def folder() -> Path:
    """Where this task's backups live."""
    return paths().folder


def read() -> list[Entry]:
    """The committed backups, newest first (the last one and the one before it)."""
    state = rundir.read_json(paths().state)
    if not state:
        return []
    entries = [Entry.from_dict(state)]
    if state.get("previous"):
        entries.append(Entry.from_dict(state["previous"]))
    return entries


def commit(save: Callable[[str], None], entry: Entry) -> None:
    """Write a backup: ``save(path)`` writes the weights; on disk, renamed, then committed by
    ``state.json``; the backup before it stays (a fallback); older weights go."""
    files = paths()
    where = files.folder
    where.mkdir(parents=True, exist_ok=True)
    tmp = files.temporary(entry.weights)
    save(str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, where / entry.weights)
    rundir.sync_dir(where)
    before = read()
    previous = before[0] if before and before[0].weights != entry.weights else (before[1] if len(before) > 1 else None)
    state = {**asdict(entry), "previous": asdict(previous) if previous else None}
    rundir.write_json(files.state, state, durable=True)
    keep = {entry.weights, previous.weights if previous else None}
    for old in files.weights():
        if old.name not in keep:
            old.unlink(missing_ok=True)


def weights_name(total: int) -> str:
    """The file of a backup after ``total`` epochs of the run."""
    return BackupPaths.weights_name(total)


def unreadable(entry: Entry) -> str | None:
    """Why a backup's weights cannot be read (missing, truncated, not HDF5), else None."""
    path = folder() / entry.weights
    if not path.is_file():
        return f"{path.name} is missing"
    try:
        import h5py

        with h5py.File(path, "r"):
            pass
    except Exception as exc:  # h5py's own errors (OSError, ValueError) say what is wrong
        return f"{path.name} cannot be read ({exc})"
    return None


def restore_points(attempt: str) -> list[Entry]:
    """The backups a restore may use, newest first: those of earlier attempts (a rank that
    starts fit late must not resume from the epoch its chief just finished in this attempt)
    whose weights can be read; an unreadable one is skipped with a warning."""
    try:
        entries = [e for e in read() if e.attempt != attempt]
    except (ValueError, KeyError) as exc:  # a state.json from another tool, or damaged
        say(f"warning: the backup's {paths().state.name} cannot be read ({exc}); training starts over")
        return []
    usable = []
    for index, entry in enumerate(entries):
        why = unreadable(entry)
        if why is None:
            usable.append(entry)
            continue
        then = "falling back to the one before it" if index + 1 < len(entries) else "training starts over"
        say(f"warning: the backup of epoch {entry.total} is unusable ({why}): {then}")
    return usable
