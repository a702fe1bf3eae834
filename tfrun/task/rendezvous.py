"""How tasks of one run find each other: through files in the run dir.

Every task picks its own free port on its own node and publishes ``{host, port}``;
the others wait for what they need. Nothing uses a fixed base port, so two jobs that
share a node cannot collide. Files live under ``rendezvous/<attempt>/`` so that a
requeued job never reads the addresses of its previous attempt.
"""

from __future__ import annotations

import os
import random
import socket
import time
from pathlib import Path
from typing import Any

from tfrun import rundir, variables
from tfrun.errors import BootstrapError
from tfrun.paths import RunPaths


def attempt_key(env: dict[str, str] | os._Environ[str] | None = None) -> str:
    """Names this launch of the run: the Slurm job and restart count, or the local launch."""
    env = os.environ if env is None else env
    if env.get(variables.ATTEMPT):
        return env[variables.ATTEMPT]
    if env.get("SLURM_JOB_ID"):
        return f"slurm-{env['SLURM_JOB_ID']}-{env.get('SLURM_RESTART_COUNT', '0')}"
    return "manual"


def directory(run_dir: str | os.PathLike[str], attempt: str | None = None) -> Path:
    """This attempt's rendezvous dir."""
    return RunPaths.of(run_dir).rendezvous(attempt or attempt_key())


def ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for the local side of outgoing connections (and for bind to 0)."""
    try:
        low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port free on this node right now, outside the kernel's ephemeral range.

    The task binds it only seconds later (TensorFlow's gRPC server starts after TensorFlow
    is imported). A port from bind(("", 0)) is in the ephemeral range, where any outgoing
    connection on the node may take it meanwhile ("Could not start gRPC server" was seen
    on a busy node); a port outside that range is taken only by a process that binds it on
    purpose. The port is random, not a fixed base, so tasks and jobs rarely collide.
    """
    low, high = ephemeral_ports()
    spans = [(a, b) for a, b in ((10000, low - 1), (high + 1, 65535)) if b >= a]
    rng = random.SystemRandom()
    for _ in range(200):
        a, b = rng.choices(spans, weights=[b - a + 1 for a, b in spans])[0] if spans else (1024, 65535)
        port = rng.randint(a, b)
        if _bindable(port):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # a crowded node: the kernel's choice
        s.bind(("", 0))
        return int(s.getsockname()[1])


def claim_port(run_dir: str | os.PathLike[str], host: str) -> int:
    """A free port on this node (:func:`free_port`) that no other task of this attempt on
    ``host`` has taken. Tasks that share a node choose at the same moment and bind seconds
    later, so "free right now" alone let two of them pick one port (the second one's server
    then failed to start); a claim file created exclusively settles it."""
    folder = directory(run_dir) / "ports"
    folder.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        port = free_port()
        try:
            os.close(os.open(folder / f"{host}-{port}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue  # another task of this run on this node has it
        return port
    raise BootstrapError(f"could not claim a free port on {host}: every port tried was taken (see {folder})")


def publish(run_dir: str | os.PathLike[str], name: str, data: dict[str, Any]) -> None:
    """Make ``data`` visible to the run's other tasks under ``name``."""
    rundir.write_json(directory(run_dir) / f"{name}.json", data)


def wait_for(
    run_dir: str | os.PathLike[str],
    names: list[str],
    timeout_s: float,
    what: str = "peers",
    never: str = "published an address",
) -> dict[str, dict[str, Any]]:
    """Block until every name is published; a clear error naming the missing ones after timeout_s."""
    folder = directory(run_dir)
    began = time.monotonic()
    deadline = began + timeout_s
    found: dict[str, dict[str, Any]] = {}
    while True:
        for name in names:
            if name not in found:
                data = rundir.read_json(folder / f"{name}.json")
                if data is not None:
                    found[name] = data
        if len(found) == len(names):
            return found
        if time.monotonic() > deadline:
            missing = ", ".join(n for n in names if n not in found)
            raise BootstrapError(
                f"timed out after {timeout_s:.0f} s waiting for {what}: {missing} never "
                f"{never} in {folder} (did those tasks start?)"
            )
        time.sleep(poll_interval(time.monotonic() - began))


def poll_interval(waited_s: float) -> float:
    """How long a wait sleeps before it looks again, having waited ``waited_s`` already: a tenth
    of that, from 20 ms to 0.5 s. A peer is then seen at most about 10 % later than it
    published (a backoff that grows by half at each look can be half the wait late: a chief
    would start its script up to that much after its last worker published); a long wait
    still looks only twice a second."""
    return min(0.5, max(0.02, waited_s / 10))


def exists(run_dir: str | os.PathLike[str], name: str) -> bool:
    """Has ``name`` been published in this attempt?"""
    return (directory(run_dir) / f"{name}.json").exists()
