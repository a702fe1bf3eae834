"""Run a Plan as processes on this machine.

Every rank's output is written to its log in the run dir and streamed to the terminal
(prefixed with the rank when there are several). If a rank fails, the others are
stopped within ``compute.stop_grace_s``; Ctrl-C stops every task. Each task runs in its
own process group so that whatever it started is stopped with it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from tfrun import deps, rundir
from tfrun.errors import ConfigError
from tfrun.paths import RunPaths
from tfrun.plan import Plan, build
from tfrun.states import FINAL, RunState
from tfrun.targets.settle import Ending, critical_ranks, describe_exit, settle
from tfrun.task import preempt

POLL_S = 0.1
# While tasks run: a task's end is noticed within this. At 0.1 s the wait added ~0.05 s
# to every run; a poll of each task's pid 50 times a second costs nothing measurable.
WAIT_POLL_S = 0.02
CHECKPOINT_WAIT_S = 120.0  # after a stop request, how long tasks get to reach a batch end


class _Pump(threading.Thread):
    """Copies one task's output to its log file and to the terminal, line by line."""

    def __init__(self, stream: IO[bytes], log_path: str, prefix: bytes, out: IO[bytes], lock: threading.Lock):
        super().__init__(daemon=True)
        self.stream, self.log_path, self.prefix, self.out, self.lock = stream, log_path, prefix, out, lock

    def run(self) -> None:
        with open(self.log_path, "ab") as log:
            for line in iter(self.stream.readline, b""):
                log.write(line)
                log.flush()
                with self.lock:
                    self.out.write(self.prefix + line)
                    self.out.flush()


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # the group is gone already: nothing left to signal
        pass


def stop_all(procs: list[subprocess.Popen[bytes]], grace_s: float) -> None:
    """SIGTERM every task's group, then SIGKILL what is left after grace_s."""
    for proc in procs:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(POLL_S)
    for proc in procs:
        # Kill the group even if the leader is gone: it may have left children behind.
        _signal_group(proc, signal.SIGKILL)
        proc.wait()


# A task interpreter started before the run was composed (see prestart), and the
# environment it was started with.
_prestarted: subprocess.Popen[bytes] | None = None
_prestarted_env: dict[str, str] = {}


def _bootstrap_command(run_dir: str) -> list[str]:
    return [sys.executable, "-u", "-m", "tfrun.bootstrap", run_dir]


def prestart() -> None:
    """Start the interpreter of a local run's first task now, before the run is composed.

    Its start-up and the bootstrap's imports (~0.1 s) then overlap tfrun's own composition
    on another core. It waits for the plan on stdin (``tfrun.bootstrap --await``) and is
    used by :func:`start` if the plan runs that same command here, else dismissed: end of
    input, and it exits.
    """
    global _prestarted, _prestarted_env
    if _prestarted is None:
        _prestarted_env = dict(os.environ)
        with preempt.blocked():  # taken by the bootstrap's handlers (see start)
            _prestarted = subprocess.Popen(
                _bootstrap_command("--await"),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )


def dismiss_prestarted() -> None:
    """The run did not need the prestarted interpreter: let it exit."""
    global _prestarted
    proc, _prestarted = _prestarted, None
    if proc is not None and proc.stdin is not None:
        try:
            proc.stdin.close()
        except OSError:  # it exited already: which is what closing asks of it
            pass


def _take_prestarted(plan: Plan, env: dict[str, str]) -> subprocess.Popen[bytes] | None:
    global _prestarted
    proc, _prestarted = _prestarted, None
    if proc is None:
        return None
    # Not the same command (deps=pip/conda/container), or this process's environment
    # changed since (deps=modules loads modules here): start the task the usual way.
    if (
        plan.command != _bootstrap_command(plan.run_dir)
        or dict(os.environ) != _prestarted_env
        or proc.poll() is not None
        or proc.stdin is None
    ):
        _prestarted = proc
        dismiss_prestarted()
        return None
    try:
        proc.stdin.write(json.dumps({"run_dir": plan.run_dir, "env": env}).encode() + b"\n")
        proc.stdin.close()
    except OSError:  # it died meanwhile: start the task the usual way
        return None
    return proc


def start(plan: Plan, extra_env: dict[str, str] | None = None) -> list[subprocess.Popen[bytes]]:
    """Start one process per task (the first may be the prestarted interpreter), with this
    process's environment and ``extra_env`` (loaded modules: PATH and friends, which only a
    new interpreter honours, so never the prestarted one)."""
    procs: list[subprocess.Popen[bytes]] = []
    attempt = f"local-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    try:
        for task in plan.tasks:
            launch_env = build.task_launch_env(task.rank, attempt)
            proc = _take_prestarted(plan, launch_env) if task.rank == 0 and not extra_env else None
            env = {**os.environ, **(extra_env or {}), **launch_env}
            if proc is None:
                # The task starts with the stop signals held: a Ctrl-C in its first moments (before
                # the bootstrap catches them) would otherwise kill it; held, it is a stop request.
                with preempt.blocked():
                    proc = subprocess.Popen(
                        plan.command,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
            procs.append(proc)
    except BaseException:
        stop_all(procs, 0)  # a task that cannot start: the ones started already must not run on alone
        raise
    return procs


def _wait(
    procs: list[subprocess.Popen[bytes]],
    critical: set[int],
    timeout_s: float,
    out: IO[bytes],
    cancelled: threading.Event | None = None,
    cancel_request: Path | None = None,
) -> tuple[str, int | None]:
    """Block until all tasks end, a critical one fails, or the time limit; (state, failed rank).
    A cancel is asked for by the event (this process) or by the request file (`tfrun cancel`
    from anywhere: a signal to this process would reach whatever else runs in it)."""
    deadline = time.monotonic() + timeout_s
    lost: set[int] = set()
    stopping = False
    while True:
        if (cancelled is not None and cancelled.is_set()) or (cancel_request is not None and cancel_request.exists()):
            raise _Cancelled()
        codes = [p.poll() for p in procs]
        for rank, code in enumerate(codes):
            if code in (None, 0) or rank in lost:
                continue
            if code == preempt.EXIT_PREEMPTED:
                # A task stopped on a stop request sent to it (a site's preemption hook, or
                # `kill -USR2`): the run stops, resumable, so the other tasks are asked too.
                if not stopping:
                    stopping = True
                    for proc in procs:
                        if proc.poll() is None:
                            proc.send_signal(preempt.SIGNALS[1])
                continue
            if rank in critical:
                return RunState.FAILED, rank
            lost.add(rank)
            out.write(f"tfrun: rank {rank} ended ({describe_exit(code)}); the run goes on without it\n".encode())
            out.flush()
        if all(c is not None for c in codes):
            return (RunState.STOPPED if stopping else RunState.COMPLETED), None
        if time.monotonic() > deadline:
            return RunState.TIMEOUT, None
        time.sleep(WAIT_POLL_S)


class _Cancelled(Exception):
    """A cancel request (``tfrun cancel``) or SIGTERM to the launcher: stop every task now."""


def _raise_cancelled(signum: int, frame: object) -> None:
    raise _Cancelled()


# Runs launched by a thread of this process (tfrun.launch(wait=False)), by run dir: their
# cancel flags, set without a look at the file system.
_IN_PROCESS: dict[str, threading.Event] = {}
# Runs a thread of this process is about to launch, by run dir: set once their tasks have been
# started and a cancel reaches them in-process. The caller waits for it: a task that cannot
# start then raises to the caller, not to a thread nobody reads (the status says RUNNING
# before the tasks are started, so it cannot tell).
_STARTING: dict[str, threading.Event] = {}


def starting(run_dir: str | os.PathLike[str]) -> threading.Event:
    """An event set once this process has started the run's tasks (ask before launching it;
    :func:`run` forgets it as it returns or raises)."""
    return _STARTING.setdefault(os.path.realpath(run_dir), threading.Event())


def cancel_in_process(run_dir: str | os.PathLike[str]) -> bool:
    """Cancel a run that this very process is running; False if it is not one of them."""
    event = _IN_PROCESS.get(os.path.realpath(run_dir))
    if event is None:
        return False
    event.set()
    return True


def _cancel_on_sigterm() -> Any:
    """SIGTERM cancels the run cleanly (only the main thread can take signals)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_cancelled)


def stop_gracefully(procs: list[subprocess.Popen[bytes]], out: IO[bytes]) -> tuple[str, int | None]:
    """First Ctrl-C: every task checkpoints and stops (STOPPED, resumable). A second: CANCELLED."""
    try:
        out.write(b"\ntfrun: stopping: every task checkpoints and stops (Ctrl-C again to kill them)\n")
        out.flush()
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(preempt.SIGNALS[1])  # to the bootstrap only, not its children
        deadline = time.monotonic() + CHECKPOINT_WAIT_S
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        return RunState.CANCELLED, None
    codes = [p.poll() for p in procs]
    if any(c is None for c in codes):
        return RunState.CANCELLED, None
    if any(c == preempt.EXIT_PREEMPTED for c in codes) and all(c in (0, preempt.EXIT_PREEMPTED) for c in codes):
        return RunState.STOPPED, None
    return (RunState.COMPLETED, None) if all(c == 0 for c in codes) else (RunState.CANCELLED, None)


def run(plan: Plan, out: IO[bytes] | None = None) -> str:
    """Run every task of the plan here; returns the final state (also in status.json).

    A launch that fails before it follows its tasks (the run dir cannot be written, a task
    cannot be started) raises, and the run is recorded FAILED with why (CANCELLED on
    Ctrl-C): never left RUNNING with nobody to end it."""
    try:
        return _run(plan, out or sys.stdout.buffer)
    except ConfigError:
        raise  # the environment could not be made ready: recorded FAILED already (deps.prepare)
    except BaseException as exc:
        _record_launch_failure(plan, exc)
        raise
    finally:
        _STARTING.pop(os.path.realpath(plan.run_dir), None)


def _record_launch_failure(plan: Plan, exc: BaseException) -> None:
    interrupted = isinstance(exc, KeyboardInterrupt)
    reason = (
        "interrupted (Ctrl-C) while launching" if interrupted else f"the launch failed: {type(exc).__name__}: {exc}"
    )
    try:
        if rundir.read_status(plan.run_dir).get("state") not in FINAL:
            state = RunState.CANCELLED if interrupted else RunState.FAILED
            rundir.update_status(
                plan.run_dir,
                run_id=plan.run_id,
                state=state,
                target="local",
                backend=plan.backend,
                ended=time.time(),
                reason=reason,
            )
    except OSError:  # the run dir itself cannot be written: the exception raised says why
        pass


def _run(plan: Plan, out: IO[bytes]) -> str:
    run_dir = plan.run_dir
    paths = RunPaths.of(run_dir)
    paths.logs.mkdir(parents=True, exist_ok=True)
    paths.cancel_request.unlink(missing_ok=True)  # a cancel of an earlier attempt is not this one's
    plan.save()
    extra_env = deps.prepare(plan)  # build or reuse the environment; a ConfigError here starts nothing
    rundir.update_status(
        run_dir,
        run_id=plan.run_id,
        state=RunState.RUNNING,
        target="local",
        backend=plan.backend,
        started=time.time(),
        ended=None,
        world_size=len(plan.tasks),
        job_ids=[],
        launcher_pid=os.getpid(),
        launcher_started=rundir.process_started(os.getpid()),
        launcher_host=rundir.hostname(),
        failed_rank=None,
        reason=None,
        pool=None,
        pool_item=None,
    )  # (an item of a pool resumed as a run of its own)
    procs = start(plan, extra_env)
    lock = threading.Lock()
    pumps = []
    for task, proc in zip(plan.tasks, procs):
        prefix = f"[rank{task.rank}] ".encode() if len(procs) > 1 else b""
        assert proc.stdout is not None
        pump = _Pump(proc.stdout, str(RunPaths.of(run_dir).rank_log(task.rank)), prefix, out, lock)
        pump.start()
        pumps.append(pump)
    grace = float(plan.compute.get("stop_grace_s", 5.0))
    critical = critical_ranks(plan)
    previous = _cancel_on_sigterm()
    cancelled = _IN_PROCESS.setdefault(os.path.realpath(run_dir), threading.Event())
    if (waiting := _STARTING.get(os.path.realpath(run_dir))) is not None:
        waiting.set()
    try:
        try:
            state, failed = _wait(
                procs, critical, plan.compute["timeout_min"] * 60, out, cancelled, paths.cancel_request
            )
        except KeyboardInterrupt:
            state, failed = stop_gracefully(procs, out)
    except _Cancelled:  # also while stopping gracefully: the tasks are stopped below all the same
        state, failed = RunState.CANCELLED, None
    finally:
        _IN_PROCESS.pop(os.path.realpath(run_dir), None)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    stop_all(procs, grace)
    for pump in pumps:
        pump.join(timeout=5)
    codes = {t.rank: p.returncode for t, p in zip(plan.tasks, procs)}
    first = None
    if failed is not None:  # the critical rank seen ending first
        first = {"failed_rank": failed, "host": rundir.hostname(), "reason": describe_exit(procs[failed].returncode)}
    fields = settle(
        run_dir,
        Ending(
            state=state,
            exit_codes=codes,
            first_failure=first,
            cancelled=state == RunState.CANCELLED,
            host=rundir.hostname(),
        ),
    )
    rundir.update_status(run_dir, **fields)
    return fields["state"]
