"""How far runs have got, as plain data: what ``tfrun watch`` and a followed sweep show.

A :class:`Snapshot` is built from what the run dirs hold (``status.json``, the epochs in
``metrics.jsonl``, the epochs asked for in ``plan.json``) and the statuses the caller
already has (:func:`tfrun.runner.control.snapshot` gets them with one scheduler query for
all the runs). Nothing here talks to a scheduler or to a terminal: the command line draws
snapshots (:mod:`tfrun.cli.watch`), or prints :func:`changes` as plain lines.

A launcher following a sweep (:mod:`tfrun.targets.slurm`, :mod:`tfrun.targets.pool`)
asks :func:`sweep_view` for a live view, and :func:`busy` wraps a long step; both are
what the command line registered in :data:`VIEWS`, on a terminal only, else plain lines.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Mapping, Protocol, Sequence

from tfrun import rundir
from tfrun.paths import RunPaths, SweepPaths, is_run_dir
from tfrun.states import ENDED, RunState
from tfrun.tracking import metrics as metrics_file

WAITING = RunState.PENDING  # a sweep point that has not started yet (no status of its own)
# The metrics shown first, when a run records them; the others follow by name.
LEADING_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")


@dataclass(frozen=True)
class RunProgress:
    """One run (or sweep point) at one moment."""

    name: str  # the point's number in a sweep, else the run id
    label: str  # a sweep point's overrides ("trainer.lr=0.01"); "" for a single run
    state: str
    epoch: int | None  # epochs finished (None: the run records no Keras epochs)
    epochs: int | None  # epochs asked for (trainer.epochs), if the config says
    metrics: tuple[tuple[str, float], ...]  # the latest epoch's values, LEADING_METRICS first
    elapsed_s: float | None  # since it started; its whole duration once ended
    left_s: float | None  # estimated from the mean epoch time; None when unknown or ended

    @property
    def ended(self) -> bool:
        """It will not change any more (by itself)."""
        return self.state in ENDED


@dataclass(frozen=True)
class Snapshot:
    """Every run of a run dir or sweep dir at one moment."""

    path: str
    sweep: bool
    runs: tuple[RunProgress, ...]
    taken: float = field(default_factory=time.time)

    @property
    def counts(self) -> dict[str, int]:
        """How many runs are in each state, by state name."""
        counts: dict[str, int] = {}
        for run in self.runs:
            counts[run.state] = counts.get(run.state, 0) + 1
        return dict(sorted(counts.items()))

    @property
    def finished(self) -> int:
        """How many runs have ended, whatever their end."""
        return sum(run.ended for run in self.runs)

    @property
    def ended(self) -> bool:
        """Every run has ended."""
        return self.finished == len(self.runs)

    @property
    def exit_code(self) -> int:
        """0 if every run completed (or was pruned by its tuning policy: no failure), else 1
        (the codes of ``tfrun`` itself)."""
        return 0 if all(run.state in (RunState.COMPLETED, RunState.PRUNED) for run in self.runs) else 1


def clock(seconds: float | None) -> str:
    """``1:02:03``, ``2:03`` or ``-``."""
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def metrics_text(metrics: Sequence[tuple[str, float]], most: int = 4) -> str:
    """``loss=0.1234 val_accuracy=0.97``: the first ``most`` values."""
    return " ".join(f"{k}={v:.4g}" for k, v in list(metrics)[:most])


def epoch_text(run: RunProgress) -> str:
    """``3/10``, ``3/?``, or ``-`` before the first epoch of a run that records none yet."""
    if run.epoch is None:
        return f"0/{run.epochs}" if run.epochs else "-"
    return f"{run.epoch}/{run.epochs or '?'}"


def ordered_metrics(record: Mapping[str, Any]) -> tuple[tuple[str, float], ...]:
    """The numbers of an epoch record, LEADING_METRICS first, then by name."""
    values = metrics_file.epoch_values(record)
    first = [k for k in LEADING_METRICS if k in values]
    return tuple((k, values[k]) for k in [*first, *sorted(set(values) - set(first))])


def time_left(
    epoch_times: Sequence[float], done: int, total: int | None, started: float | None, now: float
) -> float | None:
    """Seconds left at the mean epoch time so far, or None when it cannot be told.

    ``epoch_times`` are when each finished epoch was recorded. With one epoch the mean is
    its time since the start (which includes starting up, so it errs long).
    """
    if not total or not epoch_times or done >= total:
        return 0.0 if total and done >= total else None
    if len(epoch_times) > 1:
        steps = [b - a for a, b in zip(epoch_times, epoch_times[1:]) if b > a]
        mean = sum(steps) / len(steps) if steps else None
    else:
        mean = epoch_times[0] - started if started and epoch_times[0] > started else None
    if mean is None:
        return None
    return max(0.0, mean * (total - done) - max(0.0, now - epoch_times[-1]))


def run_progress(
    name: str, label: str, status: Mapping[str, Any], epochs: Sequence[Mapping[str, Any]], total: int | None, now: float
) -> RunProgress:
    """One run's progress from its status and its epoch records (pure)."""
    state = status.get("state") or WAITING
    started, ended = status.get("started"), status.get("ended")
    done = int(epochs[-1]["epoch"]) + 1 if epochs else None
    elapsed = ((ended or now) - started) if started else None
    final = state in ENDED
    left = (
        None
        if final
        else time_left([float(r["time"]) for r in epochs if r.get("time")], done or 0, total, started, now)
    )
    return RunProgress(
        name=name,
        label=label,
        state=state,
        epoch=done,
        epochs=total,
        metrics=ordered_metrics(epochs[-1]) if epochs else (),
        elapsed_s=elapsed,
        left_s=left,
    )


class _Files:
    """What the run dirs hold, read incrementally: a refresh every 2 s of a large sweep reads
    each plan once and, of each metrics file (appended to), only what it gained."""

    def __init__(self) -> None:
        self.totals: dict[str, int | None] = {}
        # metrics file -> (inode, bytes read, its epoch records so far)
        self.epochs: dict[str, tuple[metrics_file.Tail, list[dict[str, Any]]]] = {}

    def total(self, run_dir: Path) -> int | None:
        key = str(run_dir)
        if key not in self.totals:
            plan = rundir.read_json(RunPaths.of(run_dir).plan)
            if plan is None:
                return None  # not written yet: ask again next time
            value = ((plan.get("config") or {}).get("trainer") or {}).get("epochs")
            self.totals[key] = int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        return self.totals[key]

    def epoch_records(self, run_dir: Path) -> list[dict[str, Any]]:
        path = RunPaths.of(run_dir).metrics
        tail, records = self.epochs.get(str(path)) or (metrics_file.Tail(path), [])
        new = [r for r in tail.new_records() if isinstance(r.get("epoch"), int)]
        records = new if tail.restarted else [*records, *new]  # rewritten (a restore reconciles epochs)
        self.epochs[str(path)] = (tail, records)
        return records


_FILES = _Files()


def labels(path: Path, run_dirs: Sequence[Path]) -> dict[str, str]:
    """Each sweep point's overrides, by run dir ("" for runs the sweep index does not list)."""
    index = rundir.read_json(SweepPaths.of(path).index) if not is_run_dir(path) else None
    points = (index or {}).get("points") or []
    # Overrides every point shares (entry.script=..., trainer.epochs=3) tell them apart from nothing.
    shared = set.intersection(*(set(p.get("overrides") or []) for p in points)) if len(points) > 1 else set()
    found = {
        str(Path(p["run_dir"])): " ".join(o.lstrip("+") for o in p.get("overrides") or [] if o not in shared)
        for p in points
    }
    return {str(d): found.get(str(d), "") for d in run_dirs}


def snapshot(
    path: Path, run_dirs: Sequence[Path], statuses: Sequence[Mapping[str, Any]], now: float | None = None
) -> Snapshot:
    """The progress of ``run_dirs`` (the runs ``path`` stands for) given their statuses."""
    now = time.time() if now is None else now
    sweep = not is_run_dir(path)
    names = labels(path, run_dirs)
    runs = tuple(
        run_progress(
            run_dir.name if sweep else str(status.get("run_id") or run_dir.name),
            names[str(run_dir)],
            status,
            _FILES.epoch_records(run_dir),
            _FILES.total(run_dir),
            now,
        )
        for run_dir, status in zip(run_dirs, statuses)
    )
    return Snapshot(path=str(path), sweep=sweep, runs=runs, taken=now)


def describe(run: RunProgress) -> str:
    """One plain line about a run: name, overrides, state, epoch, latest metrics, times."""
    words = [run.name + (f" ({run.label})" if run.label else ""), run.state]
    if run.epoch is not None or run.epochs:
        words.append(f"epoch {epoch_text(run)}")
    if run.metrics:
        words.append(metrics_text(run.metrics))
    if run.elapsed_s is not None:
        words.append(f"elapsed {clock(run.elapsed_s)}" + (f" left ~{clock(run.left_s)}" if run.left_s else ""))
    return "  ".join(words)


def summary(snap: Snapshot) -> str:
    """``sweep of 4: 2/4 finished (1 COMPLETED, 1 FAILED, 2 RUNNING)`` or a run's line."""
    if not snap.sweep and len(snap.runs) == 1:
        return f"run {describe(snap.runs[0])}"
    counts = ", ".join(f"{n} {state}" for state, n in snap.counts.items())
    return f"sweep of {len(snap.runs)}: {snap.finished}/{len(snap.runs)} finished ({counts})"


def changes(before: Snapshot | None, now: Snapshot) -> list[str]:
    """Plain lines for what changed: one per run whose state or epoch changed, then (for a
    sweep whose counts changed) its summary."""
    old = {run.name: run for run in (before.runs if before else ())}
    lines = []
    for run in now.runs:
        was = old.get(run.name)
        if was is None or (was.state, was.epoch) != (run.state, run.epoch):
            lines.append(describe(run))
    if now.sweep and lines and (before is None or before.counts != now.counts):
        lines.append(summary(now))
    return lines


class SweepView(Protocol):
    """A live view of a sweep while a launcher follows it (the command line's, on a terminal)."""

    def show(self, snap: Snapshot) -> None:
        """Draw this snapshot in place of the previous one."""

    def close(self) -> None:
        """Leave the last drawing on the screen and give the terminal back."""


@dataclass
class Views:
    """How a followed sweep and long steps are shown on a terminal; the command line sets these
    (:func:`tfrun.cli.watch.install`). Unset (the Python API, a pipe): plain lines."""

    sweep: Callable[[], SweepView] | None = None
    busy: Callable[[str], ContextManager[None]] | None = None


VIEWS = Views()


def sweep_view() -> SweepView | None:
    """A live view for a sweep being followed, if stderr is a terminal and one is registered."""
    return VIEWS.sweep() if VIEWS.sweep is not None and sys.stderr.isatty() else None


@contextlib.contextmanager
def busy(message: str) -> Iterator[None]:
    """A long step: a spinner on a terminal (when registered), else one plain line first."""
    if VIEWS.busy is not None and sys.stderr.isatty():
        with VIEWS.busy(message):
            yield
        return
    print(f"tfrun: {message}", file=sys.stderr, flush=True)
    yield
