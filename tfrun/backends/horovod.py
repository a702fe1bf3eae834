"""``backend=horovod``: Horovod over Gloo, without horovodrun.

Rank 0 serves Horovod's rendezvous (an HTTP server on a port it finds free) and
publishes its node's address in the run dir (across nodes: an address the others reach,
never loopback; see :mod:`tfrun.task.network`); every rank then gets the HOROVOD_* variables
that horovodrun would have set, so a script's own ``hvd.init()`` joins the group. With
``check_size`` the bootstrap initialises Horovod first and fails, naming the ranks,
unless the group has every task: a script never silently trains alone.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import time
from typing import Any, Callable, Mapping, Sequence

from tfrun import rundir
from tfrun.backends import horovod_compat
from tfrun.errors import BootstrapError, ConfigError
from tfrun.task import network, rendezvous
from tfrun.task.identity import TaskIdentity

TOLERATES_WORKER_LOSS = False
CONTROLLERS = ("gloo", "mpi")
_SERVER: Any = None  # rank 0's rendezvous server, alive for the life of the task


def check(backend: Mapping[str, Any], world_size: int) -> None:
    """Horovod must be installed (scripts/build-horovod) and the controller usable."""
    if backend["controller"] not in CONTROLLERS:
        raise ConfigError.invalid("backend.controller", backend["controller"], CONTROLLERS)
    if importlib.util.find_spec("horovod") is None:
        raise ConfigError(
            "backend=horovod needs Horovod, which is not installed in this environment: "
            "run scripts/build-horovod (builds Horovod 0.28.1 for the installed TensorFlow)."
        )
    if backend["controller"] == "mpi" and shutil.which("mpirun") is None:
        raise ConfigError.invalid(
            "backend.controller",
            "mpi",
            "gloo here: no MPI is installed (mpirun is not on PATH); install one and "
            "rebuild with scripts/build-horovod --force, or use backend.controller=gloo",
        )


def roles(backend: Mapping[str, Any], world_size: int) -> list[tuple[str, int, bool]]:
    """Every rank runs the script."""
    return [("worker", rank, True) for rank in range(world_size)]


def tf_config(backend: Mapping[str, Any], roles: Any, rank: int) -> None:
    """Horovod does not use TF_CONFIG."""
    return None


def host_slots(ident: TaskIdentity) -> list[tuple[str, int]]:
    """(host, tasks) in rank order. Local simulated nodes are one host: they share its name."""
    if ident.launcher == "local":
        return [("localhost", ident.world_size)]
    return [(host, ident.local_world_size) for host in ident.hostnames]


def route_to(address: str) -> tuple[str, str]:
    """(interface, source address) this node uses to reach ``address``: Gloo binds to that
    interface. A UDP socket's connect sends nothing; the kernel only picks the route."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((address, 9))
        local_ip = s.getsockname()[0]
    for name, addresses in network.interfaces().items():
        if local_ip in addresses:
            return name, local_ip
    return ("lo" if network.is_loopback(local_ip) else ""), local_ip


def interface_for(address: str) -> str:
    """The local network interface that reaches ``address`` (Gloo binds to it)."""
    return route_to(address)[0]


def rendezvous_address(
    ident: TaskIdentity, slots: list[tuple[str, int]], backend: Mapping[str, Any]
) -> tuple[str, str]:
    """(address, why) rank 0's rendezvous server listens on, and publishes: loopback when
    every rank is on this host (a local run, a job on one node), so nothing off the node can
    reach the server; across nodes the node's own address the others reach (and no other)."""
    if ident.launcher != "local" and ident.num_nodes > 1:  # the others are other hosts
        return network.own_address(slots[0][0], backend.get("iface"))
    return network.LOOPBACK, "one host"


def _serve_rendezvous(addr: str, slots: list[tuple[str, int]], world_size: int) -> int:
    """Start Horovod's rendezvous server on ``addr`` (only) for these slots; its port."""
    global _SERVER
    from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts

    try:
        _SERVER, port = horovod_compat.start_rendezvous(addr)
    except OSError as exc:
        raise BootstrapError(f"rank 0 on {slots[0][0]} cannot serve Horovod's rendezvous on {addr}: {exc}") from exc
    _SERVER.init(get_host_assignments(parse_hosts(",".join(f"{h}:{n}" for h, n in slots)), world_size))
    return port


def reach(found: Mapping[str, Any], ident: TaskIdentity, deadline: float) -> None:
    """Connect once to rank 0's rendezvous server, retrying until ``deadline`` (monotonic).

    Horovod itself aborts the process (C++ terminate, SIGABRT) with "HTTP request failed"
    when the server is unreachable; failing here names both nodes, the address and the port.
    """
    addr, port = found["addr"], int(found["port"])
    try:
        network.reach(addr, port, deadline)
    except OSError as exc:
        raise BootstrapError(
            f"rank {ident.rank} on {ident.hostname} cannot reach Horovod's rendezvous server (rank 0, on "
            f"{found.get('host', '?')}) at {addr}:{port}: {exc}. Rank 0 may have died after publishing it, or "
            f"this node cannot route to that address or a firewall drops the port (backend.iface picks the "
            f"interface)"
        ) from exc


def setup(backend: Mapping[str, Any], ident: TaskIdentity, run_dir: str, task: Any, plan: Any) -> dict[str, str]:
    """HOROVOD_* for this rank, after rank 0 has started the rendezvous server."""
    slots = host_slots(ident)
    if ident.rank == 0:
        addr, why = rendezvous_address(ident, slots, backend)
        port = _serve_rendezvous(addr, slots, ident.world_size)
        rendezvous.publish(run_dir, "horovod", {"addr": addr, "port": port, "host": slots[0][0]})
        rundir.update_rank(run_dir, ident.rank, address=addr, address_why=why)
    timeout = float(backend["rendezvous_timeout_s"])
    deadline = time.monotonic() + timeout
    found = rendezvous.wait_for(run_dir, ["horovod"], timeout, "Horovod's rendezvous server (rank 0)")["horovod"]
    iface, mine = route_to(found["addr"])
    if ident.rank != 0:
        reach(found, ident, deadline)
        rundir.update_rank(run_dir, ident.rank, address=mine, address_why=f"the route to rank 0 ({iface})")
    host_index = 0 if ident.launcher == "local" else ident.node_index
    local_rank = ident.rank if ident.launcher == "local" else ident.local_rank
    return {
        "HOROVOD_CONTROLLER": backend["controller"],
        "HOROVOD_CPU_OPERATIONS": backend["controller"],
        "HOROVOD_GLOO_RENDEZVOUS_ADDR": found["addr"],
        "HOROVOD_GLOO_RENDEZVOUS_PORT": str(found["port"]),
        "HOROVOD_GLOO_IFACE": backend.get("iface") or iface,
        "HOROVOD_GLOO_TIMEOUT_SECONDS": str(int(backend["rendezvous_timeout_s"])),
        "HOROVOD_HOSTNAME": slots[host_index][0],
        "HOROVOD_RANK": str(ident.rank),
        "HOROVOD_SIZE": str(ident.world_size),
        "HOROVOD_LOCAL_RANK": str(local_rank),
        "HOROVOD_LOCAL_SIZE": str(slots[host_index][1]),
        "HOROVOD_CROSS_RANK": str(host_index),
        "HOROVOD_CROSS_SIZE": str(len(slots)),
    }


def verify(backend: Mapping[str, Any], ident: TaskIdentity) -> None:
    """Initialise Horovod now and insist that the group is the whole run."""
    if not backend["check_size"]:
        return
    import horovod.tensorflow as hvd

    hvd.init()
    if hvd.size() != ident.world_size:
        raise BootstrapError(
            f"Horovod initialised with size {hvd.size()} but the run has {ident.world_size} "
            f"tasks; rank {ident.rank} would train alone. Check HOROVOD_GLOO_* in this log."
        )
    print(f"tfrun: horovod ready: rank {hvd.rank()} of {hvd.size()}", flush=True)


def stop_vote(model: Any) -> Callable[[Sequence[int]], list[int]] | None:
    """How this rank votes with the others on stopping (:mod:`tfrun.task.agreement`): a sum
    over Horovod's ranks. None where Horovod is not initialised or is alone (nothing to agree on)."""
    import horovod.tensorflow as hvd

    if not hvd.is_initialized() or hvd.size() < 2:
        return None
    import tensorflow as tf

    def vote(numbers: Sequence[int]) -> list[int]:
        summed = hvd.allreduce(tf.constant(list(numbers), tf.int64), op=hvd.Sum, name="tfrun.stop_vote")
        return [int(v) for v in summed.numpy()]

    return vote
