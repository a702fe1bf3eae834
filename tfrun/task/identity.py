"""Who a task is: one place that reads the launcher's environment.

Locally the launcher passes the rank (:data:`tfrun.variables.RANK`); on Slurm, srun sets ``SLURM_PROCID`` and
friends. Every backend uses the resulting :class:`TaskIdentity` and nothing else.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping

from tfrun import variables


@dataclass(frozen=True)
class TaskIdentity:
    """A task's place in the run."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_index: int
    num_nodes: int
    hostnames: tuple[str, ...]  # one per node, in node order
    launcher: str  # "local" or "slurm"

    @property
    def hostname(self) -> str:
        """The name other tasks use to reach this task's node."""
        return self.hostnames[self.node_index]


def local_identity(rank: int, nodes: int, tasks_per_node: int) -> TaskIdentity:
    """Identity of a local task; simulated nodes are all this machine."""
    return TaskIdentity(
        rank=rank,
        local_rank=rank % tasks_per_node,
        world_size=nodes * tasks_per_node,
        local_world_size=tasks_per_node,
        node_index=rank // tasks_per_node,
        num_nodes=nodes,
        hostnames=tuple("localhost" for _ in range(nodes)),
        launcher="local",
    )


def _split_hostlist(nodelist: str) -> list[str]:
    """Split on the commas that are not inside brackets."""
    parts, depth, current = [], 0, ""
    for char in nodelist:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [p for p in [*parts, current] if p]


def _expand_host(pattern: str) -> list[str]:
    """``rack[1-2]n[01-02]`` -> every combination, in Slurm's order (leftmost range slowest)."""
    match = re.fullmatch(r"(.*?)\[([^\]]*)\](.*)", pattern)
    if not match:
        return [pattern]
    prefix, ranges, suffix = match.groups()
    tails = _expand_host(suffix)
    hosts = []
    for item in ranges.split(","):
        lo, _, hi = item.partition("-")
        numbers = [lo] if not hi else [f"{n:0{len(lo)}d}" for n in range(int(lo), int(hi) + 1)]
        hosts += [f"{prefix}{number}{tail}" for number in numbers for tail in tails]
    return hosts


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand Slurm's compact host list (``node[1-3,7],gpu01``) without calling scontrol."""
    return [host for part in _split_hostlist(nodelist) for host in _expand_host(part)]


def slurm_identity(env: Mapping[str, str]) -> TaskIdentity:
    """Identity of a task started by srun."""
    nodes = expand_nodelist(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"])
    world = int(env["SLURM_NTASKS"])
    return TaskIdentity(
        rank=int(env["SLURM_PROCID"]),
        local_rank=int(env["SLURM_LOCALID"]),
        world_size=world,
        local_world_size=world // max(1, len(nodes)),
        node_index=int(env["SLURM_NODEID"]),
        num_nodes=len(nodes),
        hostnames=tuple(nodes),
        launcher="slurm",
    )


def detect(launcher: str, nodes: int, tasks_per_node: int, env: Mapping[str, str] | None = None) -> TaskIdentity:
    """This task's identity from the environment its launcher gave it."""
    env = os.environ if env is None else env
    if launcher == "slurm":
        return slurm_identity(env)
    if variables.RANK in env:
        return local_identity(int(env[variables.RANK]), nodes, tasks_per_node)
    # Started by hand: a single task.
    return TaskIdentity(0, 0, 1, 1, 0, 1, (socket.gethostname(),), "local")
