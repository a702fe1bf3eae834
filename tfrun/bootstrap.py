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
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Mapping

from tfrun import backends, rundir
from tfrun.errors import BootstrapError
from tfrun.rundir import Plan, Task
from tfrun.task import gpus, heartbeat, identity, keras_hooks, preempt, rendezvous, watchdog
from tfrun.tracking import metrics, mlflow_sync, provenance

# The model floor's export, run as a child process (the task floor never imports it).
EXPORT_MODULE = "tfrun.model.export"
# Variables tfrun owns outright; any other one the user already set is kept.
_OWNED_PREFIXES = ("TFRUN_", "CUDA_VISIBLE_DEVICES")


def say(message: str) -> None:
    """A line in the rank's log, marked as tfrun's."""
    print(f"tfrun: {message}", file=sys.stderr, flush=True)


def apply_env(env: Mapping[str, str]) -> None:
    """Set the task's environment; never silently replace what the user set."""
    shown = []
    for key, value in env.items():
        current = os.environ.get(key)
        if current is not None and current != value and not key.startswith(_OWNED_PREFIXES):
            say(f"kept {key}={current!r} from your environment (tfrun would set {value!r})")
            continue
        os.environ[key] = value
        if not key.startswith(_OWNED_PREFIXES):  # those are reported where they are chosen
            shown.append(f"{key}={value}")
    if shown:
        say("set " + " ".join(shown))


def redirect_output(path: str | os.PathLike[str]) -> None:
    """Send this process's stdout/stderr (file descriptors, so C++ logs too) to path."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
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
    while tb is not None and (tb.tb_frame.f_code.co_filename in (__file__, "<frozen runpy>")
                              or tb.tb_frame.f_code.co_filename.endswith("runpy.py")):
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
    if hasattr(backend, "verify"):  # after apply_env: it may import TensorFlow
        backend.verify(plan.config["backend"], ident)
    os.makedirs(plan.output_dir, exist_ok=True)
    os.chdir(plan.source_dir)
    return task


def stop_decision(plan: Plan, job: str) -> tuple[str, bool, str | None]:
    """Rank 0, on Slurm, once its script stopped on request: (why this attempt stops, whether
    tfrun requeues the job, why not when it does not)."""
    if (Path(plan.run_dir) / rundir.PRUNE_FILE).exists():  # a tuning policy stopped it: for good
        return "pruned", False, "pruned by the tuning study's early-termination policy"
    request = preempt.stop_request()
    current = rendezvous.attempt_key()
    earlier = [a for a in rundir.attempts(plan.run_dir) if a.get("attempt") != current]
    limit = int(plan.compute.get("max_requeues", 3))
    if request.get("preempted"):
        if preempt.slurm_requeues(request):
            # Slurm would requeue it once the grace time is over; requeued now, the nodes go
            # to the job that preempted it as soon as the backup is written.
            return "preempted", True, None
        where = f"partition {request.get('partition')} ends preempted jobs (PreemptMode={request.get('preempt_mode')})"
        if not plan.compute.get("requeue_on_preempt", True):
            return "preempted", False, f"{where} and compute.requeue_on_preempt=false"
        done = sum(1 for a in earlier if a.get("reason") == "preempted" and a.get("requeued_by") == "tfrun"
                   and not preempt.slurm_requeues(a))
        if done >= limit:
            return "preempted", False, f"{where}; requeued after {done} such preemption(s) already (compute.max_requeues)"
        return "preempted", True, None
    reason = preempt.stop_reason(job, plan.compute.get("signal_delay_s", 120))
    done = sum(1 for a in earlier if a.get("reason") == "timeout")
    if not preempt.may_requeue(reason, done, limit):
        return reason, False, f"time limit reached after {done} requeue(s) for time-outs (compute.max_requeues)"
    return reason, True, None


def record_stop_request(plan: Plan, request: dict) -> None:
    """Rank 0, the moment a stop is requested: what asked (a preemption with its grace time is
    recorded even if the attempt is then killed before it can say more)."""
    fields = {k: v for k, v in request.items() if k != "preempted"}
    if request.get("preempted"):
        fields["reason"] = "preempted"
    rundir.update_attempt(plan.run_dir, rendezvous.attempt_key(), **fields)


_recording: list[threading.Thread] = []


def record_in_background(plan: Plan, request: dict) -> None:
    """:func:`record_stop_request` in a thread: the signal handler that calls this runs in the
    main thread, which may be holding the attempts file's lock."""
    thread = threading.Thread(target=record_stop_request, args=(plan, request), name="tfrun-stop-record")
    _recording.append(thread)
    thread.start()


def after_stop_request(plan: Plan, ident: identity.TaskIdentity, code: int) -> int:
    """On Slurm, rank 0 requeues the job (bounded where it must be); every rank then waits to be
    ended. Where Slurm requeues a preempted job as it ends, the tasks end instead, rank 0 last."""
    job = preempt.job_id()
    if ident.launcher != "slurm" or not job:
        if ident.rank == 0:  # local: the launcher records a resumable stop
            rundir.update_attempt(plan.run_dir, rendezvous.attempt_key(), ended=time.time(), reason="stopped")
        return code
    requeued_as_it_ends = preempt.requeued_as_it_ends(preempt.stop_request())
    if ident.rank == 0:
        for thread in _recording:  # what asked is recorded first, then what was done
            thread.join(timeout=30)
        reason, requeue, why_not = stop_decision(plan, job)
        if not requeue:
            say(f"{why_not}: not requeued" if reason in ("timeout", "pruned") else
                f"{reason}: not requeued ({why_not}); continue it with: tfrun resume {plan.run_dir}")
            rundir.update_attempt(plan.run_dir, rendezvous.attempt_key(), ended=time.time(), reason=reason,
                                  requeued=False, why_not_requeued=why_not)
            return code
        if requeued_as_it_ends:
            # Requeued by tfrun as well, it would be requeued once more when its next attempt
            # ends; kept waiting, Slurm would kill it at the end of the grace time, and then
            # requeue that one too.
            say(f"{reason}: job {job} ends now and Slurm requeues it (PreemptMode=REQUEUE, Slurm "
                f"{preempt.stop_request().get('slurm_version')}); it resumes from the backup")
            rundir.update_attempt(plan.run_dir, rendezvous.attempt_key(), ended=time.time(), reason=reason,
                                  requeued=True, requeued_by="slurm")
            return code
        # Said and recorded first: Slurm ends this task the moment the requeue is done.
        say(f"{reason}: requeueing job {job}; it resumes from the backup")
        rundir.update_attempt(plan.run_dir, rendezvous.attempt_key(), ended=time.time(), reason=reason,
                              requeued=True, requeued_by="tfrun")
        failure = preempt.requeue(job)
        if failure and preempt.slurm_requeues(preempt.stop_request()):
            # The grace time ran out first: Slurm has requeued it (once, and not again by tfrun).
            say(f"{reason}: job {job} is requeued by Slurm ({failure})")
            rundir.update_attempt(plan.run_dir, rendezvous.attempt_key(), requeued_by="slurm")
        elif failure:
            say(f"could not requeue job {job}: {failure}")
            rundir.update_attempt(plan.run_dir, rendezvous.attempt_key(), requeued=False, requeued_by=None,
                                  error=failure)
            return code
    elif requeued_as_it_ends:
        # The step ends as soon as one task exits non-zero: rank 0 may still be writing the backup.
        await_attempt_end(plan.run_dir)
        return code
    preempt.wait_to_be_stopped()
    return code


def await_attempt_end(run_dir: str, limit_s: float = 120.0) -> None:
    """Until rank 0 has recorded the end of this attempt (or limit_s has passed)."""
    key = rendezvous.attempt_key()
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if any(a.get("attempt") == key and a.get("ended") for a in rundir.attempts(run_dir)):
            return
        time.sleep(0.2)


def completed_earlier(run_dir: str) -> dict[str, Any] | None:
    """The attempt of this same Slurm job that completed the run, if one did: Slurm starts a job
    it requeued during a preemption once more after its next attempt ends (see
    preempt.REQUEUES_PREEMPTED_AS_IT_ENDS), and that attempt has nothing left to do."""
    job, current = preempt.job_id(), rendezvous.attempt_key()
    done = [a for a in rundir.attempts(run_dir)
            if job and a.get("job_id") == job and a.get("attempt") != current and a.get("reason") == "completed"]
    return done[-1] if done else None


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
    record_path = Path(plan.run_dir) / rundir.EXPORT_FILE
    record_path.unlink(missing_ok=True)  # an earlier attempt's record must not pass for this one's
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    try:
        child = subprocess.run([plan.python, "-u", "-m", EXPORT_MODULE, plan.run_dir], env=env,
                               stdin=subprocess.DEVNULL)
        why = f"exit code {child.returncode}" if child.returncode >= 0 else f"killed by signal {-child.returncode}"
    except OSError as exc:
        why = str(exc)
    if not rundir.read_json(record_path):
        error = f"the export process ended without a record ({why})"
        rundir.write_json(record_path, {"format": "onnx", "passed": False, "onnx": None, "error": error})
        say(f"export onnx FAILED: {error}")


def run_task(run_dir: str, launcher: str = "local") -> int:
    """Prepare this task and run it; returns its exit code."""
    preempt.install(slurm=launcher == "slurm")  # first: an early stop request must not kill the task
    plan = Plan.load(run_dir)
    ident = identity.detect(launcher, plan.compute["nodes"], plan.compute["tasks_per_node"])
    if launcher == "slurm":
        redirect_output(rundir.rank_log(run_dir, ident.rank))
        done = completed_earlier(run_dir)
        if done:
            say(f"job {preempt.job_id()} started again after its attempt {done['attempt']} completed the run "
                f"(Slurm requeued it when that attempt ended): nothing left to do")
            return 0
    # The watchdog's ask for every thread's stack, answered even when the script is stuck.
    faulthandler.register(watchdog.STACKS, file=sys.stderr, all_threads=True, chain=False)
    heartbeat.start(run_dir, rendezvous.attempt_key(), ident.rank)
    rundir.update_rank(run_dir, ident.rank, host=rundir.hostname(), hostname=socket.gethostname(), pid=os.getpid(),
                       started=time.time(),
                       ended=None, exit_code=None, error=None,
                       job=os.environ.get("SLURM_JOB_ID"), step=os.environ.get("SLURM_STEP_ID"))
    say(f"rank {ident.rank}/{ident.world_size} on {rundir.hostname()} (node {ident.node_index}, "
        f"local rank {ident.local_rank}), run {plan.run_id}")
    if ident.rank == 0:
        rundir.update_attempt(run_dir, rendezvous.attempt_key(), started=time.time(), ended=None,
                              job_id=preempt.job_id(), host=rundir.hostname())
        # Off the script's path: a thread (git and the packages' metadata take ~0.1 s).
        provenance.record_in_background(run_dir, rendezvous.attempt_key(), os.path.dirname(plan.script),
                                        ident.hostnames if launcher == "slurm" else [rundir.hostname()],
                                        [t.node_index if launcher == "slurm" else 0 for t in plan.tasks],
                                        preempt.job_id())
        preempt.on_stop_request(lambda request: record_in_background(plan, request))
        # The nodes this attempt runs on, as Slurm gave them (a packed point's step: its own);
        # a hang an earlier attempt reported is that attempt's.
        nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
        rundir.update_status(run_dir, hang=None, **({"nodes": nodes} if nodes else {}))
        if plan.compute.get("hang_timeout_s"):
            watchdog.spawn(run_dir, rendezvous.attempt_key(), launcher, float(plan.compute["hang_timeout_s"]))
    # tracking=mlflow: the chief's metrics reach MLflow while it trains (a thread; never blocks).
    live = mlflow_sync.start_live(run_dir, plan.config, rendezvous.attempt_key()) if ident.rank == 0 else None
    code, error = 1, None
    backend = backends.get(plan.backend)
    task = plan.tasks[ident.rank]
    try:
        task = prepare(plan, ident)
        if task.runs_script:
            heartbeat.beat(phase="script running")
            code, error = run_script(task.argv)
        else:
            heartbeat.beat(phase="serving")  # a server makes no steps: the watchdog leaves it be
            code = backend.serve(plan, task)
            error = f"exit code {code}" if code else None
    except BaseException as exc:  # a failure of tfrun's own preparation
        if isinstance(exc, BootstrapError):
            say(f"error: {exc}")
        else:
            print_user_traceback(exc)
        error = f"{type(exc).__name__}: {exc}"
    preempt.script_ended()
    metrics.flush()  # values the script logged last: a requeue below may end this task at any moment
    stopped = code == preempt.EXIT_PREEMPTED
    if stopped and live is not None:
        live.end(None)  # now: a requeue ends this task the moment Slurm has done it
    if stopped:
        code = after_stop_request(plan, ident, code)
    elif ident.rank == 0:
        rundir.update_attempt(run_dir, rendezvous.attempt_key(), ended=time.time(),
                              reason="completed" if code == 0 else "failed")
    if hasattr(backend, "finish"):
        backend.finish(plan, task, code)
    heartbeat.beat(phase="ended")
    export_after_training(plan, ident, code)
    if live is not None and not stopped:  # a stopped run goes on in a later attempt, or tfrun ends it
        live.end("COMPLETED" if code == 0 else "FAILED")
    rundir.update_rank(run_dir, ident.rank, ended=time.time(), exit_code=code, error=error)
    sys.stdout.flush()
    sys.stderr.flush()
    preempt.exiting()
    # The interpreter's last collections at exit walk every object TensorFlow made: ~2.5 s of
    # CPU per task here, while the task's slot (a trial, a packed point, a node) is still
    # held. Frozen, they are left to the end of the process; atexit handlers and the
    # finalizers of objects freed by reference counting (open files, writers) still run.
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
    code = run_task(argv[0], os.environ.get("TFRUN_LAUNCHER", "local"))
    sys.exit(code)


if __name__ == "__main__":
    main()
