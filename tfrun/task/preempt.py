"""Preemption, time limits and clean stops, inside a task.

A stop request reaches every task of a job:

- SIGUSR2 (or SIGUSR1): Slurm's warning ``compute.signal_delay_s`` before the time limit,
  ``scancel --signal=USR2``, a site's hook; the local launcher sends it on the first Ctrl-C.
- SIGTERM on Slurm: a preemption (followed by SIGKILL once the partition's or QOS's
  ``GraceTime`` has passed), but also a user's ``scancel``, the time limit itself, or srun
  ending a step whose other rank failed. The signal does not say which, and asking Slurm
  takes time a preemption's grace time may not have: so every SIGTERM is first a stop
  request (the work is saved), and rank 0 alone asks Slurm once, in a thread, what it was
  (:func:`tfrun.task.preemption.account`). A SIGTERM that comes later than
  :data:`SIGTERM_REPEAT_S` after the first is Slurm ending the task (the grace time is
  over): the task ends at once.

Every rank then sees :func:`should_checkpoint` turn true and its :func:`on_preempt`
callbacks run; Keras ``fit`` stops at the next batch end (the last complete epoch is in
the run's backup; ranks of a synchronous job agree on that batch, see
:mod:`tfrun.task.agreement`), and the run is requeued (Slurm) or left resumable
(``tfrun resume``). A request that comes before the script runs (the bootstrap's
preparation, a rendezvous, ``hvd.init``) or while a task serves is noted and acted on when
that is done (:func:`listening`): it is a stop too, never a failure.
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

from tfrun import variables

SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
STOP_SIGNALS = (*SIGNALS, signal.SIGTERM)
KINDS = tuple(s.name for s in STOP_SIGNALS)  # what can ask a task to stop
EXIT_PREEMPTED = 75  # "temporary failure": stopped on request, resumable
# Slurm sends a preemption's SIGTERM more than once (seen twice within a millisecond); a
# SIGTERM later than this after the first is the end: the grace time is over, or the job is killed.
SIGTERM_REPEAT_S = 2.0

_requested = threading.Event()
_request: dict[str, Any] = {}  # what asked for the stop: signal, and for a preemption, Slurm's account
_callbacks: list[Callable[[], None]] = []
_recorders: list[Callable[[dict[str, Any]], None]] = []  # tfrun's own, run before the script's callbacks
_ended = False  # the script has returned: nothing is left to stop
_listeners = 0  # stretches of code that stop by themselves (a Keras fit, the bootstrap's preparation)
_polled = False  # the script asked should_checkpoint() at least once
_sigterm_at: list[float] = []  # when the first SIGTERM came (monotonic)
_ending: list[str] = []  # "deciding": rank 0 decides the stop; "decided": the task waits to be ended
_term_while_deciding = False


class Preempted(BaseException):
    """Raised out of training when a stop was requested (a BaseException, so that a
    script's ``except Exception`` does not swallow it)."""


def request_stop(kind: str, via: str | None = None) -> bool:
    """Note a stop request (``kind``: a signal's name; ``via``: who passed it on); the first
    one runs tfrun's recorders, then the script's callbacks. True if it was the first."""
    first = not _requested.is_set()
    _requested.set()
    if kind == "SIGTERM":
        _request["sigterm"] = True
    if not first:
        if not via:
            print(f"tfrun: received {kind}: already stopping", file=sys.stderr, flush=True)
        if kind == "SIGTERM" and _request.get("signal") != "SIGTERM":
            _record()  # a SIGTERM during another stop: rank 0 asks Slurm whether it is a preemption
        return False
    _request.setdefault("signal", kind)
    if via:
        _request["via"] = via
    source = f"{via} received {kind}" if via else f"received {kind}"
    print(f"tfrun: {source}: checkpointing and stopping", file=sys.stderr, flush=True)
    _record()
    for callback in list(_callbacks):
        try:
            callback()
        except Exception as exc:  # a user's callback must not stop the others
            print(f"tfrun: on_preempt callback {callback!r} failed: {exc!r}", file=sys.stderr, flush=True)
    return True


def _record() -> None:
    for recorder in list(_recorders):
        try:
            recorder(dict(_request))
        except Exception as exc:  # the record is a convenience; the stop must go on
            print(f"tfrun: could not record the stop request: {exc!r}", file=sys.stderr, flush=True)


def _on_signal(signum: int, frame: object) -> None:
    if _ended:  # raising Preempted now would break the task's own ending (backend.finish, export)
        return
    if request_stop(signal.Signals(signum).name) and not (_listeners or _callbacks or _polled):
        # Nothing in the script will act on the request: stop it here, at once.
        raise Preempted()


@contextlib.contextmanager
def listening() -> Iterator[None]:
    """Marks a stretch of code that acts on a stop request by itself (a request that comes
    meanwhile is only noted: see :func:`requested`)."""
    global _listeners
    _listeners += 1
    try:
        yield
    finally:
        _listeners -= 1


def requested() -> bool:
    """Was a stop requested? (Unlike :func:`should_checkpoint`, asking does not count as the
    script listening.)"""
    return _requested.is_set()


def adopt(kinds: list[str]) -> None:
    """Other ranks of a synchronous job were asked to stop (``kinds``: by what): this one
    stops with them, at the same batch, as if it had been asked itself."""
    if kinds and not _requested.is_set():
        request_stop(kinds[-1], via="another rank")  # SIGTERM, the last kind, when it is among them
    elif "SIGTERM" in kinds and not _request.get("sigterm"):
        request_stop("SIGTERM", via="another rank")


def kinds_requested() -> list[int]:
    """This task's stop request as one flag per :data:`KINDS` (what a vote exchanges)."""
    asked = {_request.get("signal")} | ({"SIGTERM"} if _request.get("sigterm") else set())
    return [int(_requested.is_set() and kind in asked) for kind in KINDS]


def learn(found: dict[str, Any]) -> None:
    """Add what rank 0 learnt about the stop (Slurm's account of it) to :func:`stop_request`."""
    _request.update(found)


def _die_of_sigterm() -> None:
    """End this process as SIGTERM's default action would (what its launcher and srun expect)."""
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the signal is delivered at once; this line is never passed
    os._exit(128 + signal.SIGTERM)


def _on_sigterm(signum: int, frame: object) -> None:
    """A SIGTERM on Slurm: the first is a stop request (no Slurm command here: a signal
    handler on every rank at once must not wait for the controller); a later one ends the
    task, and so does one that finds it waiting to be ended (after a requeue)."""
    global _term_while_deciding
    now = time.monotonic()
    if _ending == ["decided"]:
        print("tfrun: received SIGTERM: Slurm is ending the attempt; ending now", file=sys.stderr, flush=True)
        _die_of_sigterm()
    if _ending == ["deciding"]:  # rank 0's requeue, or Slurm's own end: known once rank 0 has decided
        _term_while_deciding = True
        print("tfrun: received SIGTERM: ending once rank 0 has decided", file=sys.stderr, flush=True)
        return
    if _sigterm_at and now - _sigterm_at[0] > SIGTERM_REPEAT_S:
        print("tfrun: received SIGTERM again: Slurm is ending the task; ending now", file=sys.stderr, flush=True)
        _die_of_sigterm()
    if _sigterm_at:
        return  # the same SIGTERM, sent again at once
    _sigterm_at.append(now)
    if _ended:
        print("tfrun: received SIGTERM: the script has ended, nothing is left to stop", file=sys.stderr, flush=True)
    _on_signal(signum, frame)


def end_as_terminated() -> None:
    """Slurm said the SIGTERM was no preemption (a cancel, the time limit, srun ending the
    step): now that the work is saved, end as SIGTERM ends a task."""
    print(
        f"tfrun: Slurm is ending job {job_id()} ({_request.get('job_state', '?')}), not preempting it: ending now",
        file=sys.stderr,
        flush=True,
    )
    _die_of_sigterm()


def block() -> None:
    """Hold the stop signals until :func:`install` (a task started this way cannot be killed
    by one in its first moments; a held signal is delivered when the handlers are in place).
    The mask is inherited by the processes this one starts, as they start."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def resend_pending() -> None:
    """Once the stop signals are held: a stop that killed this step's tasks as their interpreters
    started (the job's batch shell runs them again with it in ``STOP_PENDING``), sent to this
    process again, to be taken with the others when the handlers are in place."""
    pending = os.environ.pop(variables.STOP_PENDING, "")
    if pending in ("USR1", "USR2"):
        os.kill(os.getpid(), getattr(signal, f"SIG{pending}"))


@contextlib.contextmanager
def blocked() -> Iterator[None]:
    """The stop signals held in this thread meanwhile: a task started here starts with them held."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def install(slurm: bool = False) -> None:
    """Catch the stop signals in this process (replaces submitit's rank-0-only handler), in a
    Slurm task SIGTERM too; then take the ones held since the task started (:func:`block`)."""
    for sig in SIGNALS:
        signal.signal(sig, _on_signal)
    if slurm:
        signal.signal(signal.SIGTERM, _on_sigterm)
    _start_relay()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


# A signal sent to a process goes to any of its threads that does not hold it, and Python runs
# the handler in the main thread once that thread runs Python code again. A main thread in a
# long blocking call (time.sleep, a read, a wait) did not see a stop request that the kernel
# gave to another thread (the heartbeat's, a library's) until the call returned: Slurm killed
# the task KillWait later, its work unsaved. The relay wakes the main thread: Python writes the
# number of every signal it handles to the wakeup fd, and the relay then sends _WAKE to the
# main thread alone, which interrupts its call; the pending handlers run.
# Ignored by default: harmless wherever its no-op handler is not in place. (Not SIGURG: that is
# the watchdog's, for a faulthandler stack dump.)
_WAKE = signal.SIGWINCH
_relay_pid: list[int] = []  # the process whose relay runs (a forked child has none)


def _start_relay() -> None:
    if _relay_pid == [os.getpid()] or threading.current_thread() is not threading.main_thread():
        return
    read, write = os.pipe()
    os.set_blocking(write, False)  # a full pipe loses a byte, never blocks a handler
    signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    signal.signal(_WAKE, lambda signum, frame: None)
    main = threading.main_thread().ident
    assert main is not None

    def relay() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {*STOP_SIGNALS, _WAKE})  # the main thread's to take
        while data := os.read(read, 64):
            if any(number != _WAKE for number in data):
                signal.pthread_kill(main, _WAKE)

    threading.Thread(target=relay, daemon=True, name="tfrun-signal-relay").start()
    _relay_pid[:] = [os.getpid()]


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
    :func:`stop_request`), at once if one was already; it does not count as the script listening."""
    _recorders.append(recorder)
    if _requested.is_set():
        recorder(dict(_request))


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


def slurm_command(command: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    """Run a Slurm command from a task (any thread), safe from the job's own signals.

    Slurm signals every process of the step, children included: a preemption's SIGTERM,
    sent again while scontrol runs, killed it (and the task, told nothing, took the signal
    for a cancel). The child starts with SIGTERM held (a signal mask exec keeps); this
    process still takes it, in a thread that does not hold it."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
    try:
        # A session of its own: a command that does not answer is killed with whatever it
        # started (a wrapper's children would hold its output open, and the wait with them).
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
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


def deciding() -> None:
    """Rank 0 is deciding this attempt's stop: a SIGTERM meanwhile is noted, and ends the task
    once the job is requeued (:func:`await_end`)."""
    _ending[:] = ["deciding"]


def await_end() -> None:
    """The job is requeued (or about to be): a SIGTERM is Slurm ending the attempt, which a
    requeue does, and ends the task at once (and one that came while rank 0 decided, now)."""
    _ending[:] = ["decided"]
    if _term_while_deciding:
        print("tfrun: Slurm is ending the attempt; ending now", file=sys.stderr, flush=True)
        _die_of_sigterm()


def wait_to_be_stopped(limit_s: float = 120.0) -> None:
    """After a requeue Slurm ends every task itself; exiting first would fail the step."""
    await_end()
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        time.sleep(1.0)


def job_id() -> str | None:
    """The Slurm job id of this task (the unique id, also for array elements)."""
    return os.environ.get("SLURM_JOB_ID")
