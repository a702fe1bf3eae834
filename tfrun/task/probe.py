"""Is a node of the job still there? The ranks on it are asked, on the network.

Every task of a job across nodes listens on a port of its own (:func:`listen`: any free port,
every address of its node), and says which in its heartbeat. The watchdog connects to it every
few seconds, at the node's ``NodeAddr`` (read from ``scontrol``), and closes the connection at
once; nothing is sent. A node answers when the connection is accepted, or refused (its network
is there; the rank's end is seen elsewhere). A node none of whose ranks answers has lost its
network: its ranks are gone long before Slurm marks it down (``SlurmdTimeout``).

Not slurmd: a connection that sends no Slurm message is an error to slurmd, which logs two
lines for each, every few seconds for as long as the job runs.

A node the probe cannot reach when its first rank has started (its address does not resolve, a
firewall) is *unknown*, said once, never taken for lost.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from tfrun.task import heartbeat, identity, preempt

ANSWER_S = 2.0  # a node that is there answers a connection at once
LOST_S = 12.0  # a node that has not answered for this long is lost (its network gone)


def job_nodes(launcher: str) -> list[str]:
    """The nodes of this task's job step (of its allocation, outside a step) on Slurm."""
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST") or ""
    return identity.expand_nodelist(nodelist) if launcher == "slurm" and nodelist else []


def listen() -> int:
    """Listen on a free port, every address of this node, and accept and close every connection
    (a thread): what the watchdog's probe connects to. The port."""
    if socket.has_dualstack_ipv6():
        server = socket.create_server(("", 0), family=socket.AF_INET6, dualstack_ipv6=True, backlog=64)
    else:
        server = socket.create_server(("", 0), backlog=64)

    def accept_forever() -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:  # closed: nothing left to answer
                return
            connection.close()

    threading.Thread(target=accept_forever, daemon=True, name="tfrun-probe").start()
    return int(server.getsockname()[1])


def node_addresses(nodes: list[str], timeout_s: float = 10.0) -> dict[str, str]:
    """Each node's ``NodeAddr`` as Slurm has it (``scontrol show node``); a node it does not
    name is left out."""
    try:
        out = preempt.slurm_command(["scontrol", "-o", "show", "node", ",".join(nodes)], timeout_s)
    except (OSError, subprocess.SubprocessError):
        return {}
    found = {}
    for line in out.stdout.splitlines():
        fields = dict(word.split("=", 1) for word in line.split() if "=" in word)
        if fields.get("NodeName") and fields.get("NodeAddr"):
            found[fields["NodeName"]] = fields["NodeAddr"]
    return found


def resolve(address: str, port: int) -> tuple[str, int] | None:
    """The socket address of ``address:port``; None if the name does not resolve."""
    try:
        infos = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return None
    # An AF_INET or AF_INET6 address (host, port, ...): typeshed also allows the address forms
    # of other families, which a host name and a port never resolve to.
    return cast(tuple[str, int], infos[0][4][:2]) if infos else None


def answers(target: tuple[str, int], timeout_s: float = ANSWER_S) -> bool:
    """Does the node answer there: the connection accepted (a rank listens) or refused (no
    rank listens any more, but the node's network is there)?"""
    try:
        with socket.create_connection(target, timeout=timeout_s):
            return True
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


class NodeProbe:
    """The job's nodes, each asked through its ranks' ports, every time :meth:`lost` is called."""

    def __init__(self, nodes: list[str]) -> None:
        self.nodes = nodes
        self.addresses = node_addresses(nodes) if nodes else {}
        self.targets: dict[str, list[tuple[str, int]]] = {}  # node -> its ranks' (address, port)
        self.unknown: dict[str, str] = {}  # node -> why the probe cannot watch it
        self.silent: dict[str, float] = {}  # node -> since when it has not answered
        self.seen: set[tuple[str, int]] = set()  # (node, port) of the ranks taken already

    def see(self, beats: dict[int, dict[str, Any]]) -> list[str]:
        """Take the ports of ranks that started since the last call (their heartbeats): what the
        probe now watches, a line for each node it had not watched. A node that does not answer
        when its first rank is seen is out of the probe's sight (a firewall), not lost."""
        found = []
        for beat in beats.values():
            node, port = beat.get("host"), beat.get(heartbeat.PROBE_PORT)
            if node not in self.nodes or node in self.unknown or not isinstance(port, int) or (node, port) in self.seen:
                continue
            self.seen.add((node, port))
            address = self.addresses.get(node, node)
            target = resolve(address, port)
            if target is None:
                self.unknown[node] = f"its address {address} does not resolve"
            elif node not in self.targets:
                if answers(target):
                    self.targets[node] = [target]
                    found.append(f"node {node} at {address}, rank {beat.get('rank')} on port {port}")
                else:
                    self.unknown[node] = f"rank {beat.get('rank')} at {address}:{port} did not answer when it started"
            else:  # another rank of a watched node (each port is taken once: self.seen)
                self.targets[node].append(target)
        return found

    def lost(self, now: float | None = None) -> list[str]:
        """The watched nodes that have not answered for LOST_S while another did. When none
        answers (this node's own included), this node is the one cut off, or the network
        as a whole is down for a moment: no node's loss can be told from here."""
        now = time.time() if now is None else now
        for node, answered in self._ask(list(self.targets)).items():
            if answered:
                self.silent.pop(node, None)
            else:
                self.silent.setdefault(node, now)
        if self._all_silent():
            return []
        return sorted(n for n, since in self.silent.items() if now - since >= LOST_S)

    def confirm(self) -> list[str]:
        """The lost nodes, once a hang is found: a node that does not answer now is asked again
        until it answers or has been silent for LOST_S (a moment's silence is no loss)."""
        while True:
            lost = self.lost()
            if self._all_silent() or set(lost) == set(self.silent):
                return lost
            time.sleep(1.0)

    def _all_silent(self) -> bool:
        return bool(self.targets) and len(self.silent) == len(self.targets)

    def _ask(self, nodes: list[str]) -> dict[str, bool]:
        """Every rank of every node at once (a silent one costs its whole timeout): a node
        answers when one of its ranks does."""
        asks = [(node, target) for node in nodes for target in self.targets[node]]
        if not asks:
            return {}
        with ThreadPoolExecutor(max_workers=min(16, len(asks))) as pool:
            answered = list(pool.map(lambda ask: answers(ask[1]), asks))
        return {node: any(a for (n, _), a in zip(asks, answered) if n == node) for node in nodes}
