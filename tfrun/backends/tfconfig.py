"""TF_CONFIG for TensorFlow's native strategies (parameter servers, multi-worker mirrored).

At plan time the cluster holds placeholders (``{host_3}:{port_3}`` for rank 3); inside
the job each task publishes the node it runs on and a port it found free there, and
the real TF_CONFIG is built from what every task published.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from tfrun.task import rendezvous
from tfrun.task.identity import TaskIdentity

Roles = Sequence[tuple[str, int, bool]]


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


def resolve(run_dir: str, ident: TaskIdentity, roles: Roles, timeout_s: float) -> dict[str, Any]:
    """Publish this task's address, wait for every other task's, and build its TF_CONFIG."""
    port = rendezvous.claim_port(run_dir, ident.hostname)
    rendezvous.publish(run_dir, f"task-{ident.rank}", {"host": ident.hostname, "port": port})
    found = rendezvous.wait_for(run_dir, [f"task-{r}" for r in range(len(roles))], timeout_s, "the other tasks")
    address = {r: f"{found[f'task-{r}']['host']}:{found[f'task-{r}']['port']}" for r in range(len(roles))}
    return tf_config(roles, ident.rank, address)
