"""``backend=ps``: TensorFlow parameter-server training.

Tasks: one chief (the coordinator, rank 0, runs the script), ``worker_count``
workers and ``parameter_server_count`` parameter servers (which serve), and optionally
an evaluator (runs the script with the role evaluator). Workers and parameter servers
run ``tf.distribute.Server`` until the chief is done: the chief publishes ``chief-done``
when its script ends and a heartbeat while it runs, so they also stop if it dies.
A lost worker does not end the run: TF's coordinator carries on with the others.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any, Mapping

from tfrun.backends import tfconfig
from tfrun.backends.mwms import plan_roles
from tfrun.errors import ConfigError
from tfrun.rundir import read_json
from tfrun.task import preempt, rendezvous
from tfrun.task.identity import TaskIdentity

TOLERATES_WORKER_LOSS = True
HEARTBEAT_S = 5.0
STOP_FILE = "stop-requested"  # a server was asked to stop: the chief acts on it


def needed_tasks(backend: Mapping[str, Any]) -> int:
    """chief + workers + parameter servers (+ evaluator)."""
    return 1 + backend["worker_count"] + backend["parameter_server_count"] + (1 if backend["evaluator"] else 0)


def check(backend: Mapping[str, Any], world_size: int) -> None:
    """The task count must be exactly what the roles need."""
    for key in ("worker_count", "parameter_server_count"):
        if not isinstance(backend[key], int) or backend[key] < 1:
            raise ConfigError.invalid(f"backend.{key}", backend[key], "an integer >= 1")
    if backend["chief_timeout_s"] <= 2 * HEARTBEAT_S:
        # Servers would give up on a chief that is alive and beating every HEARTBEAT_S.
        raise ConfigError.invalid(
            "backend.chief_timeout_s",
            backend["chief_timeout_s"],
            f"more than {2 * HEARTBEAT_S:.0f} s (the chief's heartbeat comes every {HEARTBEAT_S:.0f} s)",
        )
    need = needed_tasks(backend)
    if need != world_size:
        evaluator = " + 1 evaluator" if backend["evaluator"] else ""
        raise ConfigError(
            f"backend=ps with worker_count={backend['worker_count']} and parameter_server_count="
            f"{backend['parameter_server_count']} needs {need} tasks (1 chief + {backend['worker_count']} "
            f"worker(s) + {backend['parameter_server_count']} ps{evaluator}), but compute gives "
            f"nodes x tasks_per_node = {world_size}. Set compute.nodes/compute.tasks_per_node so that "
            f"their product is {need}."
        )


def roles(backend: Mapping[str, Any], world_size: int) -> list[tuple[str, int, bool]]:
    """Rank 0 chief, then workers, then parameter servers, then the evaluator."""
    result = [("chief", 0, True)]
    result += [("worker", i, False) for i in range(backend["worker_count"])]
    result += [("ps", i, False) for i in range(backend["parameter_server_count"])]
    if backend["evaluator"]:
        result.append(("evaluator", 0, True))
    return result


def tf_config(backend: Mapping[str, Any], roles: tfconfig.Roles, rank: int) -> dict[str, Any]:
    """TF_CONFIG with placeholders for hosts and ports."""
    return tfconfig.tf_config(roles, rank)


def _heartbeat(run_dir: str) -> None:
    while True:
        rendezvous.publish(run_dir, "chief-heartbeat", {"time": time.time()})
        if rendezvous.exists(run_dir, STOP_FILE) and not preempt.requested():
            # A server was asked to stop, the chief was not (a signal sent to one task): the
            # chief stops the run, which ends the servers.
            os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(HEARTBEAT_S)


def setup(backend: Mapping[str, Any], ident: TaskIdentity, run_dir: str, task: Any, plan: Any) -> dict[str, str]:
    """The real TF_CONFIG; the chief starts its heartbeat."""
    config = tfconfig.resolve(
        run_dir, ident, plan_roles(plan), float(backend["rendezvous_timeout_s"]), backend.get("iface")
    )
    if task.role == "chief":
        threading.Thread(target=_heartbeat, args=(run_dir,), daemon=True, name="tfrun-heartbeat").start()
    # The coordinator should see a lost worker as an error it can recover from, not a hang.
    return {"TF_CONFIG": json.dumps(config), "GRPC_FAIL_FAST": "use_caller"}


def finish(plan: Any, task: Any, code: int) -> None:
    """The chief tells the servers to stop."""
    if task.role == "chief":
        rendezvous.publish(plan.run_dir, "chief-done", {"exit_code": code, "time": time.time()})


def _chief_gone(run_dir: str, limit_s: float, since: float) -> str | None:
    """Why this server should stop, or None. ``since``: when it started serving."""
    if rendezvous.exists(run_dir, "chief-done"):
        return "the chief finished"
    beat = read_json(rendezvous.directory(run_dir) / "chief-heartbeat.json")
    # A server serves only once every task published its address, the chief included, and
    # the chief's first heartbeat follows at once: none at all after limit_s means it died.
    last = beat["time"] if beat else since
    if time.time() - last > limit_s:
        return f"no heartbeat from the chief for {limit_s:.0f} s"
    return None


def serve(plan: Any, task: Any) -> int:
    """Run this worker's or parameter server's tf.distribute.Server until the chief is done.

    A stop request does not end a server: the chief may still need it (to finish a batch,
    or write the backup, whose variables live on the parameter servers). The chief acts on
    the request (passed on to it if it reached only a server) and the servers end with it:
    stopped, as it did, not failed."""
    import tensorflow as tf

    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    server = tf.distribute.Server(
        resolver.cluster_spec(),
        job_name=resolver.task_type,
        task_index=resolver.task_id,
        protocol=resolver.rpc_layer or "grpc",
        start=True,
    )
    print(f"tfrun: {task.role} {task.role_index} serving at {server.target}", flush=True)
    limit, since, told = float(plan.config["backend"]["chief_timeout_s"]), time.time(), False
    while (why := _chief_gone(plan.run_dir, limit, since)) is None:
        if preempt.requested() and not told:
            rendezvous.publish(plan.run_dir, STOP_FILE, {"task": f"{task.role} {task.role_index}", "time": time.time()})
            told = True
        time.sleep(1.0)
    print(f"tfrun: {task.role} {task.role_index} stopping: {why}", flush=True)
    done = read_json(rendezvous.directory(plan.run_dir) / "chief-done.json") or {}
    stopped = done.get("exit_code") == preempt.EXIT_PREEMPTED or (not done and preempt.requested())
    return preempt.EXIT_PREEMPTED if stopped else 0
