"""The agent in every task of a pool's slot: ``python -m tfrun.targets.pool.agent POOL_DIR``.

It sets the slot's environment (the Keras flavour, ``deps.env``; srun or the local pool gave it
its rank and GPUs), imports tfrun's bootstrap and the heavy modules the items' script uses,
and keeps the next item's process started ahead (``compute.warm``): forked from this warm
interpreter, or a fresh interpreter that did the same imports. An order from the coordinator
(one JSON line on stdin; on Slurm srun gives the step's stdin to every task) names a run dir:
that process becomes the item's task of this rank, in a session of its own, and runs
:func:`tfrun.bootstrap.run_task` as a task of a run of its own would. Its end is reported (one
line on stdout) and the next process is started ahead. The agent itself runs no user code, so
nothing an item does (a global it sets, a crash, ``os._exit``) reaches the next one.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from typing import Any

from tfrun import rundir, variables
from tfrun.paths import RunPaths
from tfrun.plan.pools import AGENT_MODULE, PoolSpec
from tfrun.task import ending

EVENT = "tfrun-pool "  # starts every line the coordinator reads; anything else is noise
CHILD_FLAG = "--child"
COLD_FLAG = "--cold"
# Stop requests are meant for items (Slurm sends the time-limit warning to every process of a
# step): the agent and a process waiting for its item ignore them; an item's bootstrap
# installs its own handlers.
_ITEM_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
_PR_SET_PDEATHSIG = 1
WAIT_S = 0.02  # where pidfds are missing: how often a running item's end is looked for


def emit(**event: Any) -> None:
    """One event line for the coordinator, in one write (lines of several tasks never mix)."""
    os.write(1, (EVENT + json.dumps(event) + "\n").encode())


def say(message: str) -> None:
    """A line in the slot's log."""
    print(f"tfrun-pool: {message}", file=sys.stderr, flush=True)


def task_rank() -> int:
    """This task's rank in the slot (the item's rank it runs)."""
    return int(os.environ.get("SLURM_PROCID") or os.environ.get(variables.RANK) or 0)


def warm_up(spec: PoolSpec, preload: bool = True) -> tuple[list[str], list[str]]:
    """The slot's environment, then the imports: (imported, failed). A module that cannot be
    imported is left to the item (which fails on it, with its own traceback, if it needs it)."""
    for key, value in spec.env.items():
        os.environ.setdefault(key, value)
    import tfrun.bootstrap  # noqa: F401  (the item's first import)

    done, failed = [], []
    for name in spec.preload if preload else []:
        try:
            importlib.import_module(name)
            done.append(name)
        except Exception as exc:  # anything an import raises is the item's problem, not the slot's
            failed.append(f"{name} ({type(exc).__name__}: {exc})")
    return done, failed


def _die_with_parent() -> None:
    """An item whose agent is gone (its slot ended, locally: the follower was killed) ends too."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the coordinator's cleanup ends it instead
        pass


def become_item(order: dict[str, Any]) -> None:
    """In the item's own process: leave the agent's world, run the task, exit with its code."""
    os.setsid()  # its own group: a cancel reaches it and what it started, not the slot
    _die_with_parent()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    os.environ.update(order["env"])
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    from tfrun import bootstrap

    rank = task_rank()
    bootstrap.redirect_output(RunPaths.of(order["run_dir"]).rank_log(rank))
    _reseed()
    code = 1
    try:
        code = bootstrap.run_task(order["run_dir"], order["env"].get(variables.LAUNCHER, "slurm"))
    except BaseException as exc:  # tfrun's own failure before the script: the item fails, alone
        bootstrap.print_user_traceback(exc)
    finally:
        ending.exit_past_teardown(code)  # as every task ends


def _reseed() -> None:
    """A forked process has its parent's random state: every item would draw the same numbers
    (Python's own module reseeds itself at fork; NumPy's global one does not)."""
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()


class Ahead:
    """The next item's process, started before its item comes."""

    def __init__(self, spec: PoolSpec, pool_dir: str) -> None:
        self.spec, self.pool_dir = spec, pool_dir
        self.pid: int | None = None
        self.pipe: int | None = None  # write end: the order goes here
        # Interpreters started with subprocess are reaped through their Popen (which may reap them
        # itself when another is started: a bare waitpid would then find nothing).
        self.popens: dict[int, subprocess.Popen[bytes]] = {}

    def exit_code(self, pid: int, block: bool = False) -> int | None:
        """A child's exit code once it has ended (negative: the signal), else None."""
        proc = self.popens.get(pid)
        if proc is None:
            return _reap(pid, block)
        code = proc.wait() if block else proc.poll()
        if code is not None:
            del self.popens[pid]
        return code

    def prepare(self) -> None:
        """Start the next process now (nothing for ``cold``)."""
        if self.pid is not None or self.spec.warm == "cold":
            return
        if self.spec.warm == "fork":
            read, write = os.pipe()
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                os.close(write)
                _die_with_parent()
                # Neither the agent's orders nor its events: a process holding the coordinator's
                # pipe open would hide the agent's end from it.
                null = os.open(os.devnull, os.O_RDWR)
                os.dup2(null, 0)
                os.dup2(null, 1)
                os.close(null)
                order = _read_order(read)
                if order is None:
                    os._exit(0)
                become_item(order)
            os.close(read)
            self.pid, self.pipe = pid, write
            return
        proc = subprocess.Popen(
            [*self.spec.python, "-u", "-m", AGENT_MODULE, CHILD_FLAG, self.pool_dir],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            close_fds=True,
        )
        assert proc.stdin is not None
        self.pid, self.pipe = proc.pid, os.dup(proc.stdin.fileno())
        proc.stdin.close()
        self.popens[proc.pid] = proc

    def start(self, order: dict[str, Any]) -> int:
        """Hand the order to the process started ahead (or start one now): its pid."""
        if self.spec.warm == "cold":
            proc = subprocess.Popen(
                [*self.spec.python, "-u", "-m", AGENT_MODULE, CHILD_FLAG, self.pool_dir, COLD_FLAG],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                close_fds=True,
            )
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(order).encode() + b"\n")
            proc.stdin.close()
            self.popens[proc.pid] = proc
            return proc.pid
        for _ in range(2):
            self.prepare()
            assert self.pid is not None and self.pipe is not None
            pid, pipe, self.pid, self.pipe = self.pid, self.pipe, None, None
            try:
                os.write(pipe, json.dumps(order).encode() + b"\n")
                return pid
            except BrokenPipeError:  # it died while it waited (killed from outside): another one
                self.exit_code(pid, block=True)
            finally:
                os.close(pipe)
        raise OSError("the item's process ended before it got its order, twice")

    def dismiss(self) -> None:
        """No more items: the process started ahead exits (end of input)."""
        if self.pipe is not None:
            os.close(self.pipe)
        if self.pid is not None:
            self.exit_code(self.pid, block=True)
        self.pid = self.pipe = None


def _read_order(fd: int) -> dict[str, Any] | None:
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 65536)
        if not chunk:
            return None
        data += chunk
    os.close(fd)
    return json.loads(data)


def _reap(pid: int, block: bool = False) -> int | None:
    """The exit code of a child of ours once it has ended (negative: the signal), else None."""
    try:
        done, status = os.waitpid(pid, 0 if block else os.WNOHANG)
    except ChildProcessError:
        return -1
    if done == 0:
        return None
    return os.waitstatus_to_exitcode(status)


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Agent:
    """One task of a slot: orders in, events out, one item at a time."""

    def __init__(self, pool_dir: str) -> None:
        from tfrun.targets.pool.store import PoolStore

        self.pool_dir = pool_dir
        self.spec = PoolStore(pool_dir).spec()
        self.rank = task_rank()
        self.ahead = Ahead(self.spec, pool_dir)
        self.item: str | None = None
        self.pid: int | None = None
        self.pidfd: int | None = None
        self.buffer = b""

    def run(self) -> int:
        for sig in _ITEM_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        # Slurm's SIGTERM (a preemption, a cancel) reaches the items too; the agent lives on to
        # report how they ended, until the coordinator closes its input or Slurm kills it.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        started = time.monotonic()
        # Forked items share this interpreter's imports; otherwise each item's own process does them.
        done, failed = warm_up(self.spec, preload=self.spec.warm == "fork")
        self.ahead.prepare()
        emit(
            ev="ready",
            rank=self.rank,
            pid=os.getpid(),
            host=rundir.hostname(),
            warm_s=time.monotonic() - started,
            imported=done,
            failed=failed,
        )
        for note in failed:
            say(f"could not import {note} ahead; the items import what they need themselves")
        try:
            while self._step():
                pass
        finally:
            if self.pid is not None:
                _kill_group(self.pid, signal.SIGKILL)
            self.ahead.dismiss()
        return 0

    def _step(self) -> bool:
        """Wait for an order or the item's end; False once there will be no more orders."""
        fds = [0] + ([self.pidfd] if self.pidfd is not None else [])
        timeout = WAIT_S if self.pid is not None and self.pidfd is None else None
        ready, _, _ = select.select(fds, [], [], timeout)
        if self.pid is not None and (self.pidfd in ready or self.pidfd is None):
            self._check_item()
        if 0 in ready:
            chunk = os.read(0, 65536)
            if not chunk:
                return False  # the coordinator is gone or done
            self.buffer += chunk
            while b"\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\n", 1)
                if line.strip() and not self._order(json.loads(line)):
                    return False
        return True

    def _order(self, order: dict[str, Any]) -> bool:
        op = order.get("op")
        if op == "exit":
            return False
        if op == "run" and self.pid is None:
            try:
                pid = self.ahead.start(order)
            except OSError as exc:
                say(f"item {order['item']}: could not start its process: {exc}")
                emit(ev="ended", rank=self.rank, item=order["item"], code=-1, error=str(exc))
                return True
            self.item, self.pid = order["item"], pid
            self.pidfd = _pidfd(self.pid)
            emit(ev="started", rank=self.rank, item=self.item, pid=self.pid, host=rundir.hostname())
            self.ahead.prepare()  # the next one, while this item runs
        elif op == "signal" and self.pid is not None and order.get("item") == self.item:
            _kill_group(self.pid, int(order["signal"]))
        return True

    def _check_item(self) -> None:
        assert self.pid is not None
        code = self.ahead.exit_code(self.pid)
        if code is None:
            return
        _kill_group(self.pid, signal.SIGKILL)  # what the item left behind in its group ends with it
        if self.pidfd is not None:
            os.close(self.pidfd)
        emit(ev="ended", rank=self.rank, item=self.item, code=code)
        self.item, self.pid, self.pidfd = None, None, None


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # an older kernel: the agent polls instead
        return None


def child_main(pool_dir: str, cold: bool) -> None:
    """An item's process started as an interpreter of its own (``spawn``, ``cold``)."""
    from tfrun.targets.pool.store import PoolStore

    for sig in _ITEM_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if not cold:
        warm_up(PoolStore(pool_dir).spec())
    order = _read_order(0)
    if order is None:
        sys.exit(0)
    become_item(order)


def main(argv: list[str] | None = None) -> None:
    """``python -m tfrun.targets.pool.agent POOL_DIR`` (``--child POOL_DIR [--cold]``: an item)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [CHILD_FLAG]:
        child_main(argv[1], COLD_FLAG in argv[2:])
        return
    code = Agent(argv[0]).run()
    sys.stdout.flush()
    sys.stderr.flush()
    # Nothing here needs the interpreter's teardown, which with TensorFlow imported takes seconds
    # of CPU while the slot, and its allocation, are still held.
    os._exit(code)


if __name__ == "__main__":
    main()
