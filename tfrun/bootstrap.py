"""The in-task entry point: the only tfrun code that runs before the user's script.

``python -m tfrun.bootstrap RUN_DIR`` (local) or :func:`run_task` called by submitit
inside ``srun`` (Slurm). It reads the plan, works out which task it is, prepares the
environment the backend wants, pins GPUs, changes to the source dir and runs the
script as ``__main__`` with the planned ``sys.argv``.
"""

from __future__ import annotations

import faulthandler
import gc
import os
import runpy
import socket
import subprocess
import sys
import time
import traceback
from typing import Mapping

from tfrun import backends, rundir, variables
from tfrun.errors import BootstrapError
from tfrun.paths import RunPaths
from tfrun.rundir import Plan, Task
from tfrun.states import RunState
from tfrun.task import (
    agreement,
    ending,
    gpus,
    heartbeat,
    identity,
    keras_hooks,
    preempt,
    probe,
    rendezvous,
    requeue,
    stopping,
    watchdog,
)
from tfrun.tracking import metrics, mlflow_sync, provenance, redact

# The model floor's export, run as a child process (the task floor never imports it).
EXPORT_MODULE = "tfrun.model.export"
# Variables tfrun owns outright; any other one the user already set is kept.
_OWNED_PREFIXES = (variables.PREFIX, "CUDA_VISIBLE_DEVICES")


def say(message: str) -> None:
    """A line in the rank's log, marked as tfrun's."""
    print(f"tfrun: {message}", file=sys.stderr, flush=True)


def apply_env(env: Mapping[str, str]) -> None:
    """Set the task's environment; never silently replace what the user set. The log says
    what was set, secrets masked (:func:`tfrun.tracking.redact.shown`)."""
    shown = []
    for key, value in env.items():
        current = os.environ.get(key)
        if current is not None and current != value and not key.startswith(_OWNED_PREFIXES):
            say(
                f"kept {key}={redact.shown(key, current)!r} from your environment "
                f"(tfrun would set {redact.shown(key, value)!r})"
            )
            continue
        os.environ[key] = value
        if not key.startswith(_OWNED_PREFIXES):  # those are reported where they are chosen
            shown.append(f"{key}={redact.shown(key, value)}")
    if shown:
        say("set " + " ".join(shown))


def redirect_output(path: str | os.PathLike[str]) -> None:
    """Send this process's stdout/stderr (file descriptors, so C++ logs too) to path."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)  # the umask decides, as for any file
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def run_script(argv: list[str]) -> tuple[int, str | None]:
    """Run a script as ``__main__``: (exit code, what went wrong). Tracebacks go to stderr."""
    sys.argv = list(argv)
    sys.path.insert(0, os.path.dirname(argv[0]))
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0, f"exit code {exc.code}" if exc.code else None
        print(exc.code, file=sys.stderr)
        return 1, f"exit: {exc.code}"
    except preempt.Preempted:
        say("stopped on request; the last finished epoch is in the run's backup")
        return preempt.EXIT_PREEMPTED, "stopped on request (preemption, time limit or Ctrl-C)"
    except BaseException as exc:  # KeyboardInterrupt included: the script's own failure
        print_user_traceback(exc)
        return (130 if isinstance(exc, KeyboardInterrupt) else 1), f"{type(exc).__name__}: {exc}"
    return 0, None


def print_user_traceback(exc: BaseException) -> None:
    """The traceback from the user's script down, without tfrun's and runpy's frames."""
    tb = exc.__traceback__
    while tb is not None and (
        tb.tb_frame.f_code.co_filename in (__file__, "<frozen runpy>")
        or tb.tb_frame.f_code.co_filename.endswith("runpy.py")
    ):
        tb = tb.tb_next
    traceback.print_exception(type(exc), exc, tb or exc.__traceback__, file=sys.stderr)
    sys.stderr.flush()


def prepare(plan: Plan, ident: identity.TaskIdentity) -> Task:
    """Everything before the script: env, GPUs, backend, working dir."""
    if ident.world_size != len(plan.tasks):
        raise BootstrapError(f"the launcher started {ident.world_size} tasks but the plan has {len(plan.tasks)}")
    task = plan.tasks[ident.rank]
    env = dict(task.env)
    per_task = plan.compute.get("gpus_per_task") or plan.compute["gpus_per_node"] // plan.compute["tasks_per_node"]
    devices, why = gpus.pin(os.environ.get("CUDA_VISIBLE_DEVICES"), ident.local_rank, per_task)
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
        say(f"CUDA_VISIBLE_DEVICES={devices} ({why})")
    backend = backends.get(plan.backend)
    env.update(backend.setup(plan.config["backend"], ident, plan.run_dir, task, plan))
    apply_env(env)
    keras_hooks.install()
    if hasattr(backend, "stop_vote") and ident.world_size > 1:  # ranks that train in step stop in step
        agreement.use(backend.stop_vote)
    if hasattr(backend, "verify"):  # after apply_env: it may import TensorFlow
        backend.verify(plan.config["backend"], ident)
    os.makedirs(plan.output_dir, exist_ok=True)
    os.chdir(plan.source_dir)
    return task


def export_after_training(plan: Plan, ident: identity.TaskIdentity, code: int) -> None:
    """Rank 0, once its script succeeded: the export asked for (``export=onnx``), in a child
    process (``python -m tfrun.model.export RUN_DIR``); never raises.

    Here rather than in the launcher so that on Slurm it runs inside the job, beside the
    model, and the CLI never imports TensorFlow; after ``backend.finish`` so that parameter
    servers are not kept waiting. A child process without GPUs, since the script's
    TensorFlow may still hold them. It cannot change the rank's exit code: the run completed.
    """
    if code != 0 or ident.rank != 0 or (plan.config.get("export") or {}).get("format", "none") == "none":
        return
    say("export onnx: converting the model the script saved")
    record_path = RunPaths.of(plan.run_dir).export
    record_path.unlink(missing_ok=True)  # an earlier attempt's record must not pass for this one's
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    try:
        child = subprocess.run(
            [plan.python, "-u", "-m", EXPORT_MODULE, plan.run_dir], env=env, stdin=subprocess.DEVNULL
        )
        why = f"exit code {child.returncode}" if child.returncode >= 0 else f"killed by signal {-child.returncode}"
    except OSError as exc:
        why = str(exc)
    if not rundir.read_json(record_path):
        error = f"the export process ended without a record ({why})"
        rundir.write_json(record_path, {"format": "onnx", "passed": False, "onnx": None, "error": error})
        say(f"export onnx FAILED: {error}")


def begin(run_dir: str, launcher: str) -> tuple[Plan, identity.TaskIdentity, mlflow_sync.Live | None] | None:
    """This task's records, logs, heartbeat, and on rank 0 the attempt's (and its watchdog);
    None when this attempt has nothing to do (the run was completed by an earlier attempt of
    the same Slurm job, which Slurm started once more)."""
    plan = Plan.load(run_dir)
    ident = identity.detect(launcher, plan.compute["nodes"], plan.compute["tasks_per_node"])
    if launcher == "slurm":
        redirect_output(RunPaths.of(run_dir).rank_log(ident.rank))
        done = stopping.completed_earlier(run_dir)
        if done:
            say(
                f"job {preempt.job_id()} started again after its attempt {done['attempt']} completed the run "
                f"(Slurm requeued it when that attempt ended): nothing left to do"
            )
            return None
    # The watchdog's ask for every thread's stack, answered even when the script is stuck.
    faulthandler.register(watchdog.STACKS, file=sys.stderr, all_threads=True, chain=False)
    # Across nodes, each task answers the watchdog's lost-node probe on a port of its own.
    listening = probe.listen() if len(probe.job_nodes(launcher)) > 1 else None
    heartbeat.start(run_dir, rendezvous.attempt_key(), ident.rank, probe_port=listening)
    rundir.update_rank(
        run_dir,
        ident.rank,
        host=rundir.hostname(),
        hostname=socket.gethostname(),
        pid=os.getpid(),
        started=time.time(),
        ended=None,
        exit_code=None,
        error=None,
        job=os.environ.get("SLURM_JOB_ID"),
        step=os.environ.get("SLURM_STEP_ID"),
        attempt=rendezvous.attempt_key(),
    )
    say(
        f"rank {ident.rank}/{ident.world_size} on {rundir.hostname()} (node {ident.node_index}, "
        f"local rank {ident.local_rank}), run {plan.run_id}"
    )
    if ident.rank == 0:
        begin_attempt(plan, ident, launcher)
    # tracking=mlflow: the chief's metrics reach MLflow while it trains (a thread; never blocks).
    live = mlflow_sync.start_live(run_dir, plan.config, rendezvous.attempt_key()) if ident.rank == 0 else None
    return plan, ident, live


def begin_attempt(plan: Plan, ident: identity.TaskIdentity, launcher: str) -> None:
    """Rank 0: the attempt's record, its provenance, what asks it to stop, its watchdog."""
    run_dir = plan.run_dir
    rundir.update_attempt(
        run_dir,
        rendezvous.attempt_key(),
        started=time.time(),
        ended=None,
        job_id=preempt.job_id(),
        host=rundir.hostname(),
    )
    # Off the script's path: a thread (git and the packages' metadata take ~0.1 s).
    provenance.record_in_background(
        run_dir,
        rendezvous.attempt_key(),
        os.path.dirname(plan.script),
        ident.hostnames if launcher == "slurm" else [rundir.hostname()],
        [t.node_index if launcher == "slurm" else 0 for t in plan.tasks],
        preempt.job_id(),
    )
    preempt.on_stop_request(lambda request: stopping.record_in_background(plan, request))
    # The nodes this attempt runs on, as Slurm gave them (a packed point's step: its own);
    # a hang an earlier attempt reported is that attempt's.
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
    rundir.update_status(run_dir, hang=None, watchdog=None, **({"nodes": nodes} if nodes else {}))
    if plan.compute.get("hang_timeout_s"):
        # its polling is tfrun's, not the script's activity
        heartbeat.ignore(
            watchdog.spawn(run_dir, rendezvous.attempt_key(), launcher, float(plan.compute["hang_timeout_s"]))
        )


def failure(exc: BaseException) -> str:
    """Report a failure of tfrun's own preparation (or the serving) in the log; what went wrong."""
    if isinstance(exc, BootstrapError):
        say(f"error: {exc}")
    else:
        print_user_traceback(exc)
    return f"{type(exc).__name__}: {exc}"


STOPPED_EARLY = "stopped on request before the script ran"


def work(plan: Plan, task: Task) -> tuple[int, str | None]:
    """Run the script, or serve; (exit code, what went wrong). A stop requested before (during
    the preparation) stops the task here, as it would have stopped the script."""
    try:
        if RunPaths.of(plan.run_dir).prune.exists():  # pruned while it waited to start (or to restart)
            say("pruned by the tuning study before this attempt started: the script is not run")
            return preempt.EXIT_PREEMPTED, "pruned before it started"
        if preempt.requested():
            say(f"{STOPPED_EARLY}: it will run in full when the run continues")
            return preempt.EXIT_PREEMPTED, STOPPED_EARLY
        if task.runs_script:
            heartbeat.beat(phase="script running")
            return run_script(task.argv)
        heartbeat.beat(phase="serving")  # a server makes no steps: the watchdog leaves it be
        with preempt.listening():  # a stop request is the chief's to act on (see the backend's serve)
            code = backends.get(plan.backend).serve(plan, task)
        return code, {0: None, preempt.EXIT_PREEMPTED: "stopped on request"}.get(code, f"exit code {code}")
    except preempt.Preempted:  # requested just before the script started
        return preempt.EXIT_PREEMPTED, STOPPED_EARLY
    except BaseException as exc:
        return 1, failure(exc)


def run_task(run_dir: str, launcher: str = "local") -> int:
    """Prepare this task and run it; returns its exit code."""
    # Until the script runs, a stop request is noted, not acted on: the preparation (a
    # rendezvous, hvd.init) completes on every rank, and then no rank runs the script.
    with preempt.listening():
        preempt.install(slurm=launcher == "slurm")  # first: an early stop request must not kill the task
        begun = begin(run_dir, launcher)
        if begun is None:
            return 0
        plan, ident, live = begun
        code, error, task = 1, None, plan.tasks[ident.rank]
        try:
            task = prepare(plan, ident)
        except BaseException as exc:  # a failure of tfrun's own preparation
            error = failure(exc)
    if error is None:
        code, error = work(plan, task)
    return end(plan, ident, task, live, code, error)


def end(
    plan: Plan, ident: identity.TaskIdentity, task: Task, live: mlflow_sync.Live | None, code: int, error: str | None
) -> int:
    """After the script (or the serving): the stop's decision, the backend's end, the export,
    the records; returns the task's exit code."""
    preempt.script_ended()
    metrics.flush()  # values the script logged last: a requeue below may end this task at any moment
    stopped = code == preempt.EXIT_PREEMPTED
    if stopped and live is not None:
        live.end(None)  # now: a requeue ends this task the moment Slurm has done it
    if stopped:
        code = stopping.after_stop_request(plan, ident, code)
    elif ident.rank == 0 and stopping.this_attempt(plan.run_dir).get("reason") != requeue.Cause.HANG.value:
        # (The watchdog's account of an attempt it ended stays: the failure it caused is no other.)
        rundir.update_attempt(
            plan.run_dir, rendezvous.attempt_key(), ended=time.time(), reason="completed" if code == 0 else "failed"
        )
    backend = backends.get(plan.backend)
    if hasattr(backend, "finish"):
        backend.finish(plan, task, code)
    heartbeat.beat(phase="ended")
    export_after_training(plan, ident, code)
    if live is not None and not stopped:  # a stopped run goes on in a later attempt, or tfrun ends it
        live.end(RunState.COMPLETED if code == 0 else RunState.FAILED)
    rundir.update_rank(plan.run_dir, ident.rank, ended=time.time(), exit_code=code, error=error)
    sys.stdout.flush()
    sys.stderr.flush()
    preempt.exiting()
    # A full collection from here on (in the exit handlers, in submitit's result on Slurm)
    # would walk every object TensorFlow made: ~2.5 s of CPU per task here, while the task's
    # slot (a trial, a packed point, a node) is still held. Frozen, they are not walked; the
    # finalizers of objects freed by reference counting still run. The process then ends
    # past the interpreter's teardown (tfrun.task.ending).
    gc.freeze()
    return code


AWAIT_FLAG = "--await"


def await_task() -> list[str] | None:
    """``python -m tfrun.bootstrap --await``: started while tfrun was still composing the run
    (:func:`tfrun.targets.local.prestart`), so that this interpreter and these imports are
    ready when the plan is. One JSON line on stdin names the run dir and the variables the
    task would have been started with; end of input means it is not needed."""
    import json

    line = sys.stdin.buffer.readline()
    if not line.strip():
        return None
    order = json.loads(line)
    os.environ.update(order["env"])
    devnull = os.open(os.devnull, os.O_RDONLY)  # as a task started directly: no input
    os.dup2(devnull, 0)
    os.close(devnull)
    return [order["run_dir"]]


def main(argv: list[str] | None = None) -> None:
    """``python -m tfrun.bootstrap RUN_DIR`` (or ``--await``, then the run dir on stdin)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv == [AWAIT_FLAG]:
        argv = await_task()
        if argv is None:
            sys.exit(0)
    if len(argv) != 1:
        print("usage: python -m tfrun.bootstrap RUN_DIR", file=sys.stderr)
        sys.exit(2)
    code = run_task(argv[0], os.environ.get(variables.LAUNCHER, "local"))
    ending.exit_past_teardown(code)  # as on Slurm (tfrun.task.held) and in a pool


if __name__ == "__main__":
    main()
