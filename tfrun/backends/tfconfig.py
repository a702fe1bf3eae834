"""TF_CONFIG for TensorFlow's native strategies (parameter servers, multi-worker mirrored).

At plan time the cluster holds placeholders (``{host_3}:{port_3}`` for rank 3); inside
the job each task publishes its node, the node's address (:mod:`tfrun.task.network`) and
a port it claimed there, and the real TF_CONFIG is built from what every task published:
addresses, so that no node depends on resolving the others' names. In a job across
nodes, every task checks that it reaches the tasks on other nodes before TensorFlow
starts, and fails naming them otherwise.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

from tfrun import rundir
from tfrun.errors import BootstrapError
from tfrun.task import network, rendezvous
from tfrun.task.identity import TaskIdentity

Roles = Sequence[tuple[str, int, bool]]
REPORT_S = 20.0  # after the reachability checks' deadline: time for a failing task to report first


def cluster(roles: Roles, address: Mapping[int, str] | None = None) -> dict[str, list[str]]:
    """``{"chief": [...], "worker": [...], "ps": [...]}`` in rank order within each role."""
    spec: dict[str, list[str]] = {}
    for rank, (role, _, _) in enumerate(roles):
        if role == "evaluator":  # the evaluator is not part of the training cluster
            continue
        spec.setdefault(role, []).append(address[rank] if address else f"{{host_{rank}}}:{{port_{rank}}}")
    return spec


def tf_config(roles: Roles, rank: int, address: Mapping[int, str] | None = None) -> dict[str, Any]:
    """TF_CONFIG of one task (placeholders when ``address`` is None)."""
    role, index, _ = roles[rank]
    return {"cluster": cluster(roles, address), "task": {"type": role, "index": index}, "environment": "cloud"}


def resolve(
    run_dir: str, ident: TaskIdentity, roles: Roles, timeout_s: float, iface: str | None = None
) -> dict[str, Any]:
    """Publish this task's address, wait for every other task's, check that the ones on
    other nodes are reachable from here, and build this task's TF_CONFIG."""
    deadline = time.monotonic() + timeout_s
    across_nodes = ident.launcher != "local" and ident.num_nodes > 1
    address, why = network.own_address(ident.hostname, iface) if across_nodes else (network.LOOPBACK, "one host")
    port, hold = _claim(run_dir, ident.hostname, across_nodes)
    try:
        rendezvous.publish(run_dir, f"task-{ident.rank}", {"host": ident.hostname, "addr": address, "port": port})
        rundir.update_rank(run_dir, ident.rank, address=address, address_why=why)
        found = rendezvous.wait_for(run_dir, [f"task-{r}" for r in range(len(roles))], timeout_s, "the other tasks")
        tasks = {r: found[f"task-{r}"] for r in range(len(roles))}
        if hold is not None:
            _check_reachable(run_dir, ident, roles, tasks, deadline)
    finally:
        if hold is not None:
            hold.close()
    return tf_config(roles, ident.rank, {r: f"{t['addr']}:{t['port']}" for r, t in tasks.items()})


def _claim(run_dir: str, host: str, hold: bool) -> tuple[int, network.Hold | None]:
    """A port claimed for this task, held open when other nodes will check it."""
    for _ in range(10):
        port = rendezvous.claim_port(run_dir, host)
        if not hold:
            return port, None
        try:
            return port, network.Hold(port)
        except OSError:  # taken since it was found free: claim another
            continue
    raise BootstrapError(f"could not hold a free port on {host} (each one was taken as soon as it was found)")


def _check_reachable(
    run_dir: str, ident: TaskIdentity, roles: Roles, tasks: dict[int, dict[str, Any]], deadline: float
) -> None:
    """Before TensorFlow starts: connect to every task on another node (each one holds its
    port open meanwhile), then wait until every task has done the same."""
    me = f"{roles[ident.rank][0]} {roles[ident.rank][1]} (task {ident.rank}) on {ident.hostname}"
    for rank, task in tasks.items():
        if task["host"] == ident.hostname:
            continue
        try:
            network.reach(task["addr"], int(task["port"]), deadline)
        except OSError as exc:
            raise BootstrapError(
                f"{me} cannot reach {roles[rank][0]} {roles[rank][1]} (task {rank}) on {task['host']} at "
                f"{task['addr']}:{task['port']}: {exc}. TensorFlow's tasks connect to each other on these "
                f"ports: a firewall between the nodes must let them through, and the address must be one the "
                f"other nodes route to (backend.iface picks the interface)"
            ) from exc
    rendezvous.publish(run_dir, f"reached-{ident.rank}", {"time": time.time()})
    # Longer than the others' own checks: a task that cannot reach its peers fails with the
    # error that names them, and that is the one the run reports, not this wait.
    rendezvous.wait_for(
        run_dir,
        [f"reached-{r}" for r in tasks],
        max(1.0, deadline - time.monotonic()) + REPORT_S,
        "the other tasks to check that they reach theirs",
        "said it reached its peers",
    )
