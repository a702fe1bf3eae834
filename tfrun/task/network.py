"""Where a task's node is on the network, for the other nodes of its job.

On a cluster every node is a host of its own: a task must publish an address the other
nodes can reach (never loopback), and learn before training starts whether it reaches
theirs, with an error that names both nodes, the address and the port. A node's own name
is not enough: Debian and many images map the machine's own name to ``127.0.1.1``, which
is the node itself only from the inside.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time

from tfrun.errors import BootstrapError

LOOPBACK = "127.0.0.1"


def is_loopback(address: str) -> bool:
    """127.0.0.0/8 (and ::1): an address that means "this host" wherever it is used."""
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def interfaces() -> dict[str, list[str]]:
    """This host's IPv4 addresses by interface (lo included)."""
    import psutil

    return {
        name: [a.address for a in addrs if a.family == socket.AF_INET] for name, addrs in psutil.net_if_addrs().items()
    }


def _resolve(name: str) -> tuple[str | None, str]:
    try:
        return socket.gethostbyname(name), ""
    except OSError as exc:
        return None, str(exc)


def own_address(node: str, iface: str | None = None) -> tuple[str, str]:
    """(address, why) this node gives the others: ``iface``'s address when one is named;
    else the address ``node`` (the node's own name) resolves to, if it is one of this
    host's own and not loopback; else this host's only non-loopback address.

    Raises :class:`BootstrapError` naming the node, what its name resolves to and its
    addresses when none of these gives one address to publish.
    """
    found = interfaces()
    if iface:
        addresses = [a for a in found.get(iface, []) if not is_loopback(a)]
        if not addresses:
            raise BootstrapError(
                f"backend.iface={iface!r}: {node} has no IPv4 address on {iface!r} (its interfaces: {_listing(found)})"
            )
        return addresses[0], f"the address of backend.iface={iface}"
    resolved, error = _resolve(node)
    mine = {a: name for name, addrs in found.items() for a in addrs if not is_loopback(a)}
    if resolved in mine:
        return resolved, f"{node} resolves to it ({mine[resolved]})"
    said = f"{node} resolves to {resolved}" if resolved else f"{node} does not resolve here ({error})"
    if len(mine) == 1:
        ((address, name),) = mine.items()
        return address, f"{said}; {address} ({name}) is this node's only other address"
    raise BootstrapError(
        f"cannot tell which address of {node} the other nodes reach: {said}, and {node} has "
        f"{'no address but loopback' if not mine else 'several'} ({_listing(found)}). Make {node} "
        f"resolve to its cluster address on {node} itself (/etc/hosts or DNS), or name the interface "
        f"with backend.iface=NAME"
    )


def _listing(found: dict[str, list[str]]) -> str:
    return ", ".join(f"{name} {' '.join(addrs) or '-'}" for name, addrs in sorted(found.items())) or "none"


def reach(address: str, port: int, deadline: float) -> None:
    """Connect once to ``address:port``, retrying until ``deadline`` (monotonic): the peer may
    not listen yet. Raises the last OSError."""
    while True:
        try:
            with socket.create_connection((address, port), timeout=2.0):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


class Hold:
    """Listens on a task's port from the moment it is published until the peers have
    checked that they reach it; then hands the port back (to TensorFlow's server). A peer's
    check is a connection that it closes first, so nothing of it lingers on this port."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("", port))
        self.sock.listen(128)
        self.thread = threading.Thread(target=self._serve, daemon=True, name="tfrun-port-hold")
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            with conn:
                conn.settimeout(5.0)
                try:
                    conn.recv(1)  # until the peer closes
                except OSError:
                    pass

    def close(self) -> None:
        """Stop listening: the port is free for the server the task starts next."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(timeout=5.0)
