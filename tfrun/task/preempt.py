"""Preemption, time limits and clean stops, inside a task.

A stop request reaches every task of a job:

- SIGUSR2 (or SIGUSR1): Slurm's warning ``compute.signal_delay_s`` before the time limit,
  ``scancel --signal=USR2``, a site's hook; the local launcher sends it on the first Ctrl-C.
- SIGTERM from Slurm preempting the job (a higher-priority job needs its nodes), followed
  by SIGKILL once the partition's or QOS's ``GraceTime`` has passed. Any other SIGTERM (a
  user's ``scancel``, the time limit itself, srun ending a step whose other rank failed)
  still ends the task at once, as before: Slurm's record of the job tells them apart
  (``PreemptTime`` is set while a running job is being preempted, and only then).

Every rank then sees :func:`should_checkpoint` turn true and its :func:`on_preempt`
callbacks run; Keras ``fit`` stops at the next batch end (the last complete epoch is in
the run's backup), and the run is requeued (Slurm) or left resumable (``tfrun resume``).
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Iterator

SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
EXIT_PREEMPTED = 75  # "temporary failure": stopped on request, resumable
# From this Slurm release on, a job preempted under PreemptMode=REQUEUE that ends within its
# grace time is requeued by Slurm as it ends; and one requeued by anyone else (scontrol
# requeue) before that is requeued once more when its next attempt ends, completed or not.
# Slurm 22.05 records the early end as COMPLETED and requeues nothing (both seen on 22.05.8
# and 24.11.5; the releases between are taken to behave as 22.05 does).
REQUEUES_PREEMPTED_AS_IT_ENDS = (24, 11)

_requested = threading.Event()
_request: dict[str, Any] = {}  # what asked for the stop: signal, and for a preemption, Slurm's account
_callbacks: list[Callable[[], None]] = []
_recorders: list[Callable[[dict[str, Any]], None]] = []  # tfrun's own, run before the script's callbacks
_ended = False  # the script has returned: nothing is left to stop
_listeners = 0  # Keras fits in progress that stop by themselves at the next batch end
_polled = False  # the script asked should_checkpoint() at least once


class Preempted(BaseException):
    """Raised out of training when a stop was requested (a BaseException, so that a
    script's ``except Exception`` does not swallow it)."""


def _on_signal(signum: int, frame: object) -> None:
    if _ended:  # raising Preempted now would break the task's own ending (backend.finish, export)
        return
    first = not _requested.is_set()
    _requested.set()
    if not first:
        return
    name = signal.Signals(signum).name
    _request.setdefault("signal", name)
    print(f"tfrun: received {name}: checkpointing and stopping", file=sys.stderr, flush=True)
    for recorder in list(_recorders):
        try:
            recorder(dict(_request))
        except Exception as exc:  # the record is a convenience; the stop must go on
            print(f"tfrun: could not record the stop request: {exc!r}", file=sys.stderr, flush=True)
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


def _die_of_sigterm() -> None:
    """End this process as SIGTERM's default action would (what its launcher and srun expect)."""
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the signal is delivered at once; this line is never passed
    os._exit(128 + signal.SIGTERM)


def _on_sigterm(signum: int, frame: object) -> None:
    """A preemption's SIGTERM is a stop request; any other SIGTERM ends the task, as it always did.

    Slurm is asked every time: it sends a preemption's SIGTERM more than once (seen twice
    within a millisecond), and a later SIGTERM (after the requeue, or when the grace time is
    over) finds the job no longer RUNNING."""
    job = job_id()
    found, why = preemption(job) if job else (None, "not a Slurm job")
    if found is None:
        print(f"tfrun: received SIGTERM ({why}): ending now", file=sys.stderr, flush=True)
        _die_of_sigterm()
    if _requested.is_set() or _ended:
        return  # the same preemption again, or the script is done: nothing is left to stop
    _request.update(found)
    grace = f"; {found['grace_s']} s of grace time" if found.get("grace_s") is not None else ""
    print(f"tfrun: job {job} is being preempted (partition {found.get('partition', '?')}, "
          f"PreemptMode={found.get('preempt_mode', '?')}{grace})", file=sys.stderr, flush=True)
    _on_signal(signum, frame)


def install(slurm: bool = False) -> None:
    """Catch the stop signals in this process (replaces submitit's rank-0-only handler); in a
    Slurm task also SIGTERM, which is a stop request only when Slurm is preempting the job."""
    for sig in SIGNALS:
        signal.signal(sig, _on_signal)
    if slurm:
        signal.signal(signal.SIGTERM, _on_sigterm)


def script_ended() -> None:
    """The script has returned: later stop requests have nothing to stop. SIGUSR1/SIGUSR2 are
    ignored from now on, at the C level: Python puts back the default action of the signals
    it handles as it exits, and a time-limit warning that came just then killed a task whose
    training had finished, and the job ended FAILED."""
    global _ended
    _ended = True
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


def exiting() -> None:
    """The task returns to its launcher and exits: SIGTERM is ignored too (a preemption's, in
    the last moments of a finished task, would otherwise fail the job; the task ends anyway)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def on_stop_request(recorder: Callable[[dict[str, Any]], None]) -> None:
    """tfrun's own: ``recorder(request)`` first when a stop is requested (what asked, see
    :func:`stop_request`); it does not count as the script listening."""
    _recorders.append(recorder)


def stop_request() -> dict[str, Any]:
    """What asked this task to stop: ``{"signal": ...}``, and for a preemption ``preempted``,
    ``preempt_time``, ``partition``, ``preempt_mode``, ``grace_s``. Empty if nothing did."""
    return dict(_request)


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
        out = slurm_command(["squeue", "-h", "-j", job_id, "-o", "%L"], 30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return seconds(out)


def slurm_command(command: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    """Run a Slurm command from a task, safe from the job's own signals.

    Slurm signals every process of the step, children included: a preemption's SIGTERM,
    sent again while scontrol runs, killed it (and the task, told nothing, took the signal
    for a cancel). The child starts with SIGTERM ignored (a disposition exec keeps)."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN) if in_main_thread else None
    try:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def requeue(job_id: str, timeout_s: float = 60.0) -> str | None:
    """``scontrol requeue``; None on success, else why not (Slurm's message, or that scontrol
    could not run or did not answer): the caller reports it, it never raises."""
    try:
        result = slurm_command(["scontrol", "requeue", job_id], timeout_s)
    except OSError as exc:
        return f"scontrol could not run: {exc}"
    except subprocess.TimeoutExpired:
        return f"scontrol requeue {job_id} did not answer within {timeout_s:.0f} s"
    return None if result.returncode == 0 else (result.stderr or result.stdout).strip() or f"exit {result.returncode}"


def scontrol_fields(*what: str, timeout_s: float = 10.0) -> dict[str, str]:
    """``scontrol -o show WHAT...`` as a dict (empty if it cannot be read)."""
    try:
        out = slurm_command(["scontrol", "-o", "show", *what], timeout_s)
    except (OSError, subprocess.SubprocessError):
        return {}
    if out.returncode:
        return {}
    return dict(word.split("=", 1) for word in out.stdout.split() if "=" in word)


def slurm_config(timeout_s: float = 10.0) -> dict[str, str]:
    """``scontrol show config`` (one ``Key = value`` per line) as a dict; empty if unreadable."""
    try:
        out = slurm_command(["scontrol", "show", "config"], timeout_s).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    pairs = (line.split("=", 1) for line in out.splitlines() if " = " in line)
    return {key.strip(): value.strip() for key, value in pairs}


def seconds(text: str | None) -> int | None:
    """A duration as Slurm prints it ([D-][HH:]MM:SS, or plain seconds); None if it is not one
    (empty, INVALID, UNLIMITED, NOT_SET)."""
    if not text:
        return None
    days, _, clock = text.rpartition("-")
    try:
        parts = [int(p) for p in clock.split(":")]
    except ValueError:
        return None
    if len(parts) == 1 and not days:
        return parts[0]
    while len(parts) < 3:
        parts.insert(0, 0)
    return (int(days) if days else 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


def preemption(job: str) -> tuple[dict[str, Any] | None, str]:
    """Slurm's account of this job being preempted, or (None, why not): a cancel, the time
    limit, srun ending the step, or Slurm not answering.

    While a running job is being preempted, Slurm sets its ``PreemptTime``; a cancelled or
    timed-out job is no longer RUNNING (nor SIGNALING), and a requeue clears PreemptTime. How the preemption ends (``PreemptMode``: REQUEUE,
    CANCEL, ...) and the grace time are the job's QOS's under ``preempt/qos``, else its
    partition's (or the cluster's)."""
    record = scontrol_fields("job", job)
    if not record:
        return None, f"scontrol show job {job} did not answer"
    # SIGNALING: a running job while Slurm signals it (seen during a preemption's SIGTERM).
    if record.get("JobState") not in ("RUNNING", "SIGNALING") or record.get("PreemptTime", "None") in ("None", "Unknown", ""):
        return None, f"job {job} is {record.get('JobState')}, PreemptTime={record.get('PreemptTime')}"
    found: dict[str, Any] = {"preempted": True, "preempt_time": record["PreemptTime"],
                             "partition": record.get("Partition"), "qos": record.get("QOS")}
    config = slurm_config()
    if config.get("SLURM_VERSION"):
        found["slurm_version"] = config["SLURM_VERSION"]
    mode, grace = _qos_preemption(record.get("QOS")) if "qos" in config.get("PreemptType", "") else (None, None)
    if mode is None:
        partition = scontrol_fields("partition", record.get("Partition", "")) if record.get("Partition") else {}
        mode, grace = partition.get("PreemptMode") or config.get("PreemptMode"), partition.get("GraceTime")
    found.update(preempt_mode=(mode or "REQUEUE").upper(), grace_s=seconds(grace))
    return found, "preempted"


def _qos_preemption(qos: str | None) -> tuple[str | None, str | None]:
    """(PreemptMode, GraceTime) of a QOS from the accounting database, (None, None) if unknown."""
    if not qos:
        return None, None
    try:
        out = slurm_command(["sacctmgr", "-nP", "show", "qos", qos, "format=PreemptMode,GraceTime"], 10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None, None
    mode, _, grace = out.partition("|")
    return (mode or None) if mode != "cluster" else None, grace or None


def slurm_requeues(request: dict[str, Any]) -> bool:
    """Will Slurm requeue this preempted job itself (PreemptMode REQUEUE), or cancel it?"""
    return "REQUEUE" in str(request.get("preempt_mode", ""))


def release(version: str | None) -> tuple[int, int] | None:
    """(major, minor) of a Slurm version as ``scontrol show config`` gives it (``24.11.5``)."""
    parts = (version or "").strip().split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def requeued_as_it_ends(request: dict[str, Any]) -> bool:
    """Does Slurm requeue this preempted job when its tasks end, so that tfrun must not requeue
    it (see REQUEUES_PREEMPTED_AS_IT_ENDS)? Asked of the release the cluster reported."""
    found = release(request.get("slurm_version"))
    return slurm_requeues(request) and found is not None and found >= REQUEUES_PREEMPTED_AS_IT_ENDS


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
