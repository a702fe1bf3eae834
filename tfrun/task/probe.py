"""Is a node of the job still there? Its slurmd is asked, at the address and port Slurm uses.

Every Slurm node runs a slurmd, and the nodes of a job reach each other's (Slurm forwards its
messages through them). So a node whose slurmd stops answering has lost its network or its
slurmd: its ranks are gone long before Slurm marks it down (``SlurmdTimeout``). The port is
the cluster's ``SlurmdPort`` and the address the node's ``NodeAddr``, both read from
``scontrol``; a node the probe cannot reach even while the job starts on it (its address does
not resolve, a firewall, a port of its own) is *unknown*, said once, never taken for lost.
"""

from __future__ import annotations

import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from typing import cast

from tfrun.task import preempt, preemption

ANSWER_S = 2.0  # a slurmd that is there answers a connection at once
LOST_S = 12.0  # a node that has not answered for this long is lost (its network or slurmd gone)


def slurmd_port() -> int | None:
    """The cluster's ``SlurmdPort`` (``scontrol show config``); None if it cannot be read."""
    value = preemption.slurm_config().get("SlurmdPort", "")
    return int(value) if value.isdigit() else None


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
    """Does a slurmd listen there (a connection opened, nothing sent)?"""
    try:
        with socket.create_connection(target, timeout=timeout_s):
            return True
    except OSError:
        return False


class NodeProbe:
    """The job's nodes, asked every time :meth:`lost` is called."""

    def __init__(self, nodes: list[str]) -> None:
        self.targets: dict[str, tuple[str, int]] = {}  # node -> (address, port) of its slurmd
        self.unknown: dict[str, str] = {}  # node -> why the probe cannot watch it
        self.silent: dict[str, float] = {}  # node -> since when it has not answered
        port = slurmd_port()
        if port is None:
            self.unknown = {n: "the cluster's SlurmdPort could not be read (scontrol show config)" for n in nodes}
            return
        named = node_addresses(nodes)
        for node in nodes:
            address = named.get(node, node)
            target = resolve(address, port)
            if target is None:
                self.unknown[node] = f"its address {address} does not resolve"
            else:
                self.targets[node] = target
        # The job has just started on every node: one that does not answer now is out of the
        # probe's sight (a firewall, a port of its own), not lost.
        for node, answered in self._ask(list(self.targets)).items():
            if not answered:
                address, port = self.targets.pop(node)
                self.unknown[node] = f"its slurmd at {address}:{port} did not answer when the job started"

    def describe(self) -> str:
        """What is probed, and what is not, in one line."""
        probed = ", ".join(f"{n} ({a}:{p})" for n, (a, p) in sorted(self.targets.items()))
        unknown = "; ".join(f"{n} unknown: {why}" for n, why in sorted(self.unknown.items()))
        return "; ".join(part for part in (f"asking the slurmd of {probed}" if probed else "", unknown) if part)

    def lost(self, now: float | None = None) -> list[str]:
        """The probed nodes whose slurmd has not answered for LOST_S while another's did. When
        none answers (this node's own included), Slurm's daemons are restarting or this node is
        cut off: no node's loss can be told from here."""
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
        until it answers or has been silent for LOST_S (slurmds restart, on a reconfiguration or
        an upgrade: a moment's silence is no loss)."""
        while True:
            lost = self.lost()
            if self._all_silent() or set(lost) == set(self.silent):
                return lost
            time.sleep(1.0)

    def _all_silent(self) -> bool:
        return bool(self.targets) and len(self.silent) == len(self.targets)

    def _ask(self, nodes: list[str]) -> dict[str, bool]:
        """Every node at once: a silent one costs its whole timeout."""
        if not nodes:
            return {}
        with ThreadPoolExecutor(max_workers=min(16, len(nodes))) as pool:
            return dict(zip(nodes, pool.map(lambda n: answers(self.targets[n]), nodes)))
