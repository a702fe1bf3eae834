"""Whether a task's script is doing anything: the CPU time of the threads that run it.

A script that reports no steps (a custom loop, a script that never imports tfrun) is still
watched, by what it costs: its main thread (which runs the script), TensorFlow's own threads
(``tf_*``: they run the script's ops and its input pipeline), the Python threads the script
or its libraries start, and its child processes. A rank blocked in a read, a sleep, a lock, a
collective that waits for another rank, or frozen as a whole uses none of that CPU: across
several seconds, exactly none.

TensorFlow's threads count only when they work (:data:`TF_BUSY`): under
MultiWorkerMirroredStrategy they also wake now and then for a few microseconds while every
rank waits (its coordination service's heartbeats).

Left out, because they run whether or not training advances: the threads of Horovod's
background loop and of Gloo, gRPC and the other native libraries (C++ threads with no
``tf_`` name; Horovod's negotiates with the other ranks every few milliseconds, stuck or
not), tfrun's own threads (``tfrun-*``: the heartbeat that samples this, the rendezvous
server), the Python health check that MultiWorkerMirroredStrategy runs every 30 s where
TensorFlow's coordination service is off, and the watchdog (a child process of rank 0). Measured from ``/proc`` (Linux): elsewhere
:meth:`Activity.sample` answers None and the rank is not watched by its activity.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from types import FrameType

import psutil

TF_THREADS = "tf_"  # TensorFlow names its thread pools' threads tf_Compute, tf_data_..., ...
# The share of one core TensorFlow's threads must use between two samples to count: their
# bookkeeping while a collective waits (tens of microseconds every few seconds) stays far below,
# a step or an input pipeline at work far above.
TF_BUSY = 0.005
OWN_THREADS = "tfrun-"
# Python threads of the frameworks that run on a timer, training or not: (file, function).
TIMERS = (("collective_all_reduce_strategy.py", "_check_health"),)

_TASKS = Path("/proc/self/task")


def cpu_ns(tid: int) -> int | None:
    """CPU time a thread of this process has used (ns; clock-tick precision where the kernel
    has no schedstat); None if it is gone or cannot be read."""
    try:
        return int((_TASKS / str(tid) / "schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    try:  # utime + stime, in clock ticks, after the command name (which may hold spaces)
        fields = (_TASKS / str(tid) / "stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _cpu_of(tids: set[int]) -> dict[int | str, int]:
    found = {tid: cpu_ns(tid) for tid in tids}
    return {tid: ns for tid, ns in found.items() if ns is not None}


def _started_in(frame: FrameType | None) -> tuple[str, str]:
    """(file, function) where a Python thread began: its outermost frame outside threading.py."""
    outer: list[tuple[str, str]] = []
    while frame is not None:
        outer.append((frame.f_code.co_filename, frame.f_code.co_name))
        frame = frame.f_back
    for filename, function in reversed(outer):
        if not filename.endswith("threading.py"):
            return filename, function
    return "", ""


class Activity:
    """Samples the CPU this process spends on its script; :meth:`sample` says whether any was
    spent since the last sample."""

    def __init__(self) -> None:
        """Made on the thread that runs the script (the bootstrap's)."""
        self.ignored: set[int] = set()  # child processes that are tfrun's (the watchdog)
        self.last: dict[int | str, int] = {}
        self.sampled = time.monotonic()
        self.names: dict[int, str] = {}
        self.counted: dict[int, bool] = {}  # Python thread ident -> whether its CPU counts
        # This thread's id, not threading.main_thread().native_id: in a process forked from a
        # warm one (a pool's item, a local sweep's point) Python 3.11 keeps the parent's id
        # there, and the script's CPU went unseen.
        self.main = threading.get_native_id()
        self._main_file: int | None = None  # its schedstat, kept open: one read a sample

    def ignore(self, pid: int) -> None:
        """Leave a child process (and its own children) out: it is tfrun's, not the script's."""
        self.ignored.add(pid)

    def sample(self) -> bool | None:
        """True if the script used CPU since the last sample (the first sample: since the
        process started); None if this system does not say. Once the script's thread stops,
        the first sample may still say True for what its other threads and children used
        while it ran (read only then): a hang is seen one sample later, never a busy rank
        taken for one."""
        if not _TASKS.is_dir():
            return None
        # The script's thread first, and alone when it ran. Every file read hands the GIL over
        # and takes it back, and a script busy in Python makes each take wait for it: reading
        # every thread's CPU then took seconds under load, the heartbeat went unwritten as long,
        # and a busy rank looked stalled to the watchdog.
        main = self._main_cpu()
        if main is not None and main > self.last.get(self.main, main):
            self.last[self.main] = main
            return True
        script, tensorflow = self._threads()
        now = {**script, **tensorflow, **self._children()}
        if not now:
            return None
        elapsed_ns = max(1.0, (time.monotonic() - self.sampled) * 1e9)
        self.sampled = time.monotonic()
        spent = (
            any(ns > self.last.get(key, 0) for key, ns in now.items() if key not in tensorflow)
            or sum(ns - self.last.get(key, ns) for key, ns in tensorflow.items()) >= TF_BUSY * elapsed_ns
        )
        self.last = now
        return spent

    def _main_cpu(self) -> int | None:
        """CPU time of the script's thread (ns): one read of its schedstat, kept open."""
        try:
            if self._main_file is None:
                self._main_file = os.open(_TASKS / str(self.main) / "schedstat", os.O_RDONLY)
            return int(os.pread(self._main_file, 128, 0).split()[0])
        except (OSError, ValueError, IndexError):
            return cpu_ns(self.main)

    def _threads(self) -> tuple[dict[int | str, int], dict[int | str, int]]:
        """CPU of the script's threads and of TensorFlow's, by thread id."""
        counted: set[int] = {self.main}
        frames = sys._current_frames()
        threads = threading.enumerate()
        for thread in threads:
            if thread.native_id is not None and thread.ident is not None and self._counts(thread, frames):
                counted.add(thread.native_id)
        alive = {t.ident for t in threads}
        self.counted = {ident: c for ident, c in self.counted.items() if ident in alive}  # idents are reused
        try:
            tids = [int(t) for t in os.listdir(_TASKS)]
        except OSError:
            return {}, {}
        tensorflow: set[int] = set()
        for tid in tids:
            if tid not in self.names:
                try:
                    self.names[tid] = (_TASKS / str(tid) / "comm").read_text().strip()
                except OSError:
                    self.names[tid] = ""
            if self.names[tid].startswith(TF_THREADS) and tid not in counted:
                tensorflow.add(tid)
        for gone in set(self.names) - set(tids):  # thread ids are reused
            del self.names[gone]
        return _cpu_of(counted), _cpu_of(tensorflow)

    def _counts(self, thread: threading.Thread, frames: dict[int, FrameType]) -> bool:
        if thread is threading.main_thread():
            return True
        if thread.name.startswith(OWN_THREADS):
            return False
        ident = thread.ident
        assert ident is not None
        if ident not in self.counted:
            if ident not in frames:  # not running yet: its start is not known
                return True
            filename, function = _started_in(frames[ident])
            self.counted[ident] = not any(filename.endswith(f) and function == fn for f, fn in TIMERS)
        return self.counted[ident]

    def _children(self) -> dict[int | str, int]:
        """CPU of the child processes (their whole trees), and of those already ended."""
        found: dict[int | str, int] = {}
        own = process_cpu_ns(os.getpid())
        if own is not None:
            found["ended children"] = own[1]
        pending = [c for c in children(os.getpid()) if c not in self.ignored]
        while pending:
            pid = pending.pop()
            spent = process_cpu_ns(pid)
            if spent is not None:
                found[f"pid {pid}"] = sum(spent)
                pending.extend(children(pid))
        return found


def process_cpu_ns(pid: int) -> tuple[int, int] | None:
    """(CPU of a process's threads, CPU of its children that ended) in ns, clock-tick precision;
    None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        tick = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) * tick, (int(fields[13]) + int(fields[14])) * tick
    except (OSError, ValueError, IndexError):
        return None


def children(pid: int) -> list[int]:
    """A process's child processes: from ``/proc/PID/task/TID/children`` (cheap), else by
    scanning every process (psutil) where the kernel does not list them."""
    try:
        found: list[int] = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            found += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        return found
    except FileNotFoundError:
        pass
    except (OSError, ValueError):
        return []
    try:
        return [c.pid for c in psutil.Process(pid).children()]
    except psutil.Error:
        return []
