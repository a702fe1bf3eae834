"""A task's progress, where the watchdog sees it: ``heartbeats/<attempt>/<rank>.json``.

Two signals, written by a thread of the task every :data:`WRITE_S` seconds when they changed:

- steps: training code says it made progress with :func:`beat` (the Keras hooks do it for
  every batch of ``fit``, ``evaluate`` and ``predict`` and around backups; custom loops may
  call ``tfrun.heartbeat(step)``; the bootstrap marks its phases). While a script reports
  steps (``stepping``: inside a Keras loop after its first batch, or once it called
  ``tfrun.heartbeat(step)``), its steps are its progress.
- activity: when the script last used CPU (``active``; :mod:`tfrun.task.activity`), its
  progress while it reports no steps. None where it cannot be measured.

A beat only updates a few fields in memory. So a rank stuck in a collective, a read or a
deadlock stops beating and using CPU while the thread still writes (the file says *when* it
last progressed), and a process frozen as a whole stops writing too: either way the
watchdog (:mod:`tfrun.task.watchdog`) sees its progress grow old.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tfrun import rundir
from tfrun.paths import RunPaths

WRITE_S = 2.0
PROBE_PORT = "probe_port"  # the heartbeat's field: where the task answers the lost-node probe

_state: dict[str, Any] = {
    "step": None,
    "epoch": None,
    "phase": "started",
    "progressed": time.time(),
    "busy": None,
    "stepping": False,
    "active": time.time(),
}
_started = threading.Event()
_news = threading.Event()  # a new phase or the first step: written at once, not WRITE_S later
_busy_until: list[float | None] = [None]  # when a bounded hold stops counting as progress
_ignored: list[int] = []  # child processes that are tfrun's, not the script's


def beat(
    step: int | None = None, epoch: int | None = None, phase: str | None = None, stepping: bool | None = None
) -> None:
    """This task made progress (cheap: a few assignments). A step also says that from now on
    steps are this task's progress (``stepping``), unless ``stepping=False``: a step that is
    only handed to others (a parameter-server chief's)."""
    if step is not None:
        if _state["step"] is None:
            _news.set()
        _state["step"] = step
        stepping = True if stepping is None else stepping
    if stepping is not None and stepping != _state["stepping"]:
        _state["stepping"] = stepping
        _news.set()
    if epoch is not None:
        _state["epoch"] = epoch
    if phase is not None and phase != _state["phase"]:
        _state["phase"] = phase
        _news.set()
    _state["progressed"] = time.time()


@contextlib.contextmanager
def busy(what: str) -> Iterator[None]:
    """A stretch of work with no steps that is still progress (a backup written, an evaluation
    of one long batch): the writer thread beats for it while it lasts."""
    before, until = _state["busy"], _busy_until[0]
    hold(what)
    try:
        yield
    finally:
        _state["busy"], _busy_until[0] = before, until
        beat()


def hold(what: str, limit_s: float | None = None) -> None:
    """Count the time from now until :func:`release` as progress, for at most ``limit_s``
    seconds (None: no limit): work that makes no steps and whose end is seen elsewhere."""
    _state["busy"] = what
    _busy_until[0] = None if limit_s is None else time.time() + limit_s
    beat()


def release() -> None:
    """End a :func:`hold`."""
    _state["busy"], _busy_until[0] = None, None
    beat()


def end_steps() -> None:
    """A loop that reported steps ended (Keras ``fit``, ``evaluate``, ``predict`` returned):
    until the next one, the script's activity is its progress."""
    beat(stepping=False)


def ignore(pid: int) -> None:
    """A child process of this task that is tfrun's (the watchdog): its CPU is not the script's."""
    _ignored.append(pid)


def running() -> bool:
    """Is this task's heartbeat written (a task of a tfrun run)?"""
    return _started.is_set()


def path(run_dir: str | os.PathLike[str], attempt: str, rank: int) -> Path:
    """Where a rank's heartbeat is written for this attempt."""
    return RunPaths.of(run_dir).heartbeat(attempt, rank)


def start(run_dir: str, attempt: str, rank: int, probe_port: int | None = None) -> None:
    """Write this task's heartbeat from now on (a daemon thread; idempotent), with the port the
    task listens on for the watchdog's lost-node probe, if it does (:mod:`tfrun.task.probe`)."""
    if _started.is_set():
        return
    _started.set()
    target = path(run_dir, attempt, rank)
    info = {"rank": rank, "pid": os.getpid(), "host": rundir.hostname(), "hostname": socket.gethostname()}
    if probe_port is not None:
        info[PROBE_PORT] = probe_port
    # Imported here, on the task's own thread, never in the daemon thread below: a script that
    # ends while a daemon thread is still importing crashes the interpreter at exit (SIGSEGV
    # in CPython's import lock), and a task that did its work would be reported as killed.
    from tfrun.task.activity import Activity  # psutil: not for `import tfrun` alone

    activity = Activity()

    def write_forever() -> None:
        last: dict[str, Any] = {}
        while True:
            if _state["busy"] and (_busy_until[0] is None or time.time() < _busy_until[0]):
                beat()
            for pid in _ignored:
                activity.ignore(pid)
            try:
                spent = activity.sample()
            except Exception:  # an unreadable /proc must not stop the heartbeat: unmeasured, said as such
                spent = None
            if spent is None:
                _state["active"] = None
            elif spent:
                _state["active"] = time.time()
            now = dict(_state)
            if now != last:
                try:
                    rundir.write_json(target, {**info, **now, "written": time.time()})
                    last = now
                except OSError:  # a full or flaky filesystem must not end training
                    pass
            _news.wait(WRITE_S)
            _news.clear()

    threading.Thread(target=write_forever, daemon=True, name="tfrun-heartbeat").start()


def read_all(run_dir: str | os.PathLike[str], attempt: str) -> dict[int, dict[str, Any]]:
    """Every rank's last heartbeat of an attempt, by rank."""
    beats = {}
    for file in (RunPaths.of(run_dir).heartbeats / attempt).glob("*.json"):
        data = rundir.read_json(file)
        if data is not None:
            beats[int(data["rank"])] = data
    return beats
