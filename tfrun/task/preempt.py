"""Preemption, time limits and clean stops, inside a task.

Slurm sends SIGUSR2 (``compute.signal_delay_s`` before the time limit, or with
``scancel --signal=USR2``) to every task of the job; the local launcher sends it on the
first Ctrl-C. Every rank then sees :func:`should_checkpoint` turn true and its
:func:`on_preempt` callbacks run; Keras ``fit`` stops at the next batch end (the last
complete epoch is in the run's backup), and the run is requeued (Slurm) or left
resumable (``tfrun resume``).
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Iterator

SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
EXIT_PREEMPTED = 75  # "temporary failure": stopped on request, resumable

_requested = threading.Event()
_callbacks: list[Callable[[], None]] = []
_listeners = 0  # Keras fits in progress that stop by themselves at the next batch end
_polled = False  # the script asked should_checkpoint() at least once


class Preempted(BaseException):
    """Raised out of training when a stop was requested (a BaseException, so that a
    script's ``except Exception`` does not swallow it)."""


def _on_signal(signum: int, frame: object) -> None:
    first = not _requested.is_set()
    _requested.set()
    if not first:
        return
    print(f"tfrun: received {signal.Signals(signum).name}: checkpointing and stopping", file=sys.stderr, flush=True)
    for callback in list(_callbacks):
        try:
            callback()
        except Exception as exc:  # a user's callback must not stop the others
            print(f"tfrun: on_preempt callback {callback!r} failed: {exc!r}", file=sys.stderr, flush=True)
    if not (_listeners or _callbacks or _polled):
        # Nothing in the script will act on the request: stop it here, at once.
        raise Preempted()


@contextlib.contextmanager
def listening() -> Iterator[None]:
    """Marks a stretch of code that stops by itself when a stop is requested."""
    global _listeners
    _listeners += 1
    try:
        yield
    finally:
        _listeners -= 1


def install() -> None:
    """Catch the stop signals in this process (replaces submitit's rank-0-only handler)."""
    for sig in SIGNALS:
        signal.signal(sig, _on_signal)


def on_preempt(callback: Callable[[], None]) -> None:
    """Call ``callback()`` (in the main thread, from the signal handler) when a stop is requested."""
    _callbacks.append(callback)


def should_checkpoint() -> bool:
    """True once a stop was requested: save what you need and return (or raise Preempted).

    A script that asks is trusted to stop by itself; one that never asks (and registered
    no :func:`on_preempt` callback) is stopped where it is when the request comes.
    """
    global _polled
    _polled = True
    return _requested.is_set()


def time_left_s(job_id: str) -> float | None:
    """Seconds left before the Slurm job's time limit (None if unknown)."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%L"], capture_output=True, text=True,
                             timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out or out in ("INVALID", "UNLIMITED", "NOT_SET"):
        return None
    days, _, clock = out.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    return (int(days) if days else 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


def requeue(job_id: str, timeout_s: float = 60.0) -> str | None:
    """``scontrol requeue``; None on success, else why not (Slurm's message, or that scontrol
    could not run or did not answer): the caller reports it, it never raises."""
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=timeout_s)
    except OSError as exc:
        return f"scontrol could not run: {exc}"
    except subprocess.TimeoutExpired:
        return f"scontrol requeue {job_id} did not answer within {timeout_s:.0f} s"
    return None if result.returncode == 0 else (result.stderr or result.stdout).strip() or f"exit {result.returncode}"


def stop_reason(job_id: str, signal_delay_s: float) -> str:
    """Why a Slurm job is asked to stop: "timeout" when its time limit is near (the warning
    comes ``signal_delay_s`` before it), else "preempted"."""
    left = time_left_s(job_id)
    return "timeout" if left is not None and left <= signal_delay_s + 60 else "preempted"


def may_requeue(reason: str, earlier_timeouts: int, max_requeues: int) -> bool:
    """Preemptions are always requeued; time-outs at most ``max_requeues`` times."""
    return reason != "timeout" or earlier_timeouts < max_requeues


def wait_to_be_stopped(limit_s: float = 120.0) -> None:
    """After a requeue Slurm ends every task itself; exiting first would fail the step."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        time.sleep(1.0)


def job_id() -> str | None:
    """The Slurm job id of this task (the unique id, also for array elements)."""
    return os.environ.get("SLURM_JOB_ID")
