"""A pool's slots as its coordinator sees them: the agents' processes, a way to send them an
order, and their events. On Slurm a slot is one ``srun`` job step, alive as long as the
allocation (srun gives its stdin to every task and gathers their stdout); locally it is one
agent process per task."""

from __future__ import annotations

import json
import os
import subprocess
import time
from abc import ABC, abstractmethod
from typing import IO, Any

from tfrun import rundir, variables
from tfrun.plan import pools
from tfrun.plan.pools import PoolSpec
from tfrun.targets.pool.agent import EVENT
from tfrun.targets.pool.store import PoolStore


class Slot(ABC):
    """One slot: ``world`` agents, at most one item at a time."""

    def __init__(self, spec: PoolSpec, store: PoolStore, allocation: str, index: int) -> None:
        self.spec, self.store, self.allocation, self.index = spec, store, allocation, index
        self.procs: list[subprocess.Popen[bytes]] = []
        self.inputs: list[IO[bytes]] = []
        self.buffers: dict[int, bytes] = {}  # stdout fd -> what came after its last full line
        self.ready: set[int] = set()  # ranks whose agent is warm
        self.warm_s = 0.0
        self.item: str | None = None  # the item it runs (the coordinator's bookkeeping)
        self.started = 0.0

    @property
    def log(self) -> str:
        """The slot's own log (its agents' stderr; srun's messages on Slurm)."""
        return str(self.store.slot_log(self.allocation, self.index))

    @abstractmethod
    def start(self) -> None:
        """Start the slot's processes; they report ``ready`` once warm."""

    def _spawn(self, command: list[str], env: dict[str, str] | None = None) -> None:
        with open(self.log, "ab") as log:
            proc = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env, start_new_session=True
            )
        assert proc.stdin is not None and proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        self.procs.append(proc)
        self.inputs.append(proc.stdin)
        self.buffers[proc.stdout.fileno()] = b""
        self.started = time.monotonic()

    def is_ready(self) -> bool:
        """Every agent is warm, and alive."""
        return len(self.ready) == self.spec.world and self.alive()

    def alive(self) -> bool:
        """Are its processes all running?"""
        return bool(self.procs) and all(p.poll() is None for p in self.procs)

    def fds(self) -> list[int]:
        """Its agents' stdout, to wait on."""
        return list(self.buffers)

    def send(self, order: dict[str, Any]) -> bool:
        """One order to every agent; False if the slot is gone."""
        line = json.dumps(order).encode() + b"\n"
        try:
            for stream in self._order_streams():
                stream.write(line)
                stream.flush()
        except (BrokenPipeError, ValueError):
            return False
        return True

    def _order_streams(self) -> list[IO[bytes]]:
        return self.inputs

    def read(self, fd: int) -> list[dict[str, Any]]:
        """The events that arrived on ``fd``; the fd is forgotten at its end."""
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return []
        if not chunk:
            self.buffers.pop(fd, None)
            return []
        data = self.buffers.get(fd, b"") + chunk
        *lines, self.buffers[fd] = data.split(b"\n")
        events = []
        for line in lines:
            text = line.decode(errors="replace")
            if text.startswith(EVENT):
                try:
                    events.append(json.loads(text[len(EVENT) :]))
                except ValueError:  # a line cut by something else writing to the same pipe
                    continue
        return events

    def stop(self, grace_s: float = 10.0) -> None:
        """No more orders: the agents exit (their items, if any, are ended with them)."""
        for stream in self.inputs:
            try:
                stream.close()
            except (BrokenPipeError, OSError):
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(0.05)
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()

    def why_ended(self) -> str:
        """How its processes ended, and the last lines of its log."""
        codes = ", ".join(str(p.poll()) for p in self.procs)
        return f"exit status {codes}; last lines of {self.log}:\n{rundir.tail(self.log, 10)}"


class SlurmSlot(Slot):
    """One job step of the allocation, started by the coordinator in the batch script."""

    def start(self) -> None:
        self._spawn(pools.slot_command(self.spec, self.store.path))


class LocalSlot(Slot):
    """One agent process per task, on this machine."""

    def __init__(
        self, spec: PoolSpec, store: PoolStore, allocation: str, index: int, extra_env: dict[str, str] | None = None
    ) -> None:
        super().__init__(spec, store, allocation, index)
        self.extra_env = dict(extra_env or {})

    def start(self) -> None:
        devices = local_devices(self.spec, self.index)
        for rank in range(self.spec.world):
            env = {**os.environ, **self.extra_env, variables.LAUNCHER: "local", variables.RANK: str(rank)}
            if devices is not None:
                env["CUDA_VISIBLE_DEVICES"] = devices
            self._spawn(pools.agent_command(self.spec, self.store.path), env)


def local_devices(spec: PoolSpec, index: int) -> str | None:
    """A local slot's own GPUs: its share of what this process may use (CUDA_VISIBLE_DEVICES, or
    0..N-1), ``gpus_per_node`` each; None when the items ask for none."""
    per = int(spec.compute.get("gpus_per_node") or 0)
    if not per:
        return None
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = [d for d in given.split(",") if d] if given else [str(i) for i in range(per * spec.slots)]
    return ",".join(devices[index * per : (index + 1) * per])
