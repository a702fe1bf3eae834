"""The watchdog of a run's attempt: finds a rank that stopped making progress, shows where it
is stuck, and ends the attempt (or requeues it) instead of letting it wait until the time limit.

Rank 0's bootstrap starts it as a process of its own (``python -m tfrun.task.watchdog``),
beside the tasks: a frozen or stuck rank 0 does not freeze it. Every ``POLL_S`` it reads
the ranks' heartbeats (:mod:`tfrun.task.heartbeat`). When a rank made no progress for
``compute.hang_timeout_s`` (a rank that has not reached its first step yet gets
``STARTUP_S`` at least: TensorFlow's import and a strategy's set-up are no steps), it:

1. asks every rank for its Python stacks, all threads (a signal the bootstrap hands to
   ``faulthandler``), and with py-spy installed also takes each rank's stacks from outside
   (native frames too, and a process frozen as a whole cannot answer a signal);
2. names the rank that stopped first, its node, its last step and how long ago, and the
   ranks waiting, in ``status.json`` and the ranks' logs; a node that does not answer on
   the network is named as lost;
3. ends the attempt: kills the job step (the job fails), or with
   ``compute.requeue_on_hang`` requeues the job (bounded by ``compute.max_requeues``),
   which then resumes from its last backup like a preempted one. Locally: kills the tasks.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tfrun import rundir
from tfrun.task import heartbeat, identity, preempt, requeue

POLL_S = 1.0
STARTUP_S = 600.0  # before a rank's first step: imports, data, a strategy's set-up
STACKS = signal.SIGURG  # faulthandler's signal in every task (ignored by anything else)
STACK_WAIT_S = 3.0
SLURMD_PORT = 6818
NODE_CHECK_S = 5.0  # across nodes: how often every node's slurmd is asked whether it is there
NODE_LOST_S = 12.0  # a node that has not answered for this long is lost (its network or slurmd gone)
# Frames of a rank that waits for the others (a collective, a barrier, a distributed step).
WAITING = re.compile(r"/horovod/|collective|all_?reduce|allgather|broadcast|barrier|/distribute/|rendezvous",
                     re.IGNORECASE)


def say(message: str) -> None:
    print(f"tfrun: watchdog: {message}", file=sys.stderr, flush=True)


def limit_for(beat: dict[str, Any], timeout_s: float) -> float:
    """How long a rank may go without progress: a rank still starting gets STARTUP_S at least."""
    stepping = beat.get("step") is not None or beat.get("epoch") is not None
    return timeout_s if stepping else max(timeout_s, STARTUP_S)


def stalled(beats: dict[int, dict[str, Any]], world_size: int, timeout_s: float, now: float,
            since: float) -> list[int]:
    """The ranks whose progress is older than their limit (a rank never seen: since ``since``);
    tasks that serve (parameter servers) or have ended do not count."""
    found = []
    for rank in range(world_size):
        beat = beats.get(rank, {"progressed": since, "phase": "started"})
        if beat.get("phase") in ("serving", "ended"):
            continue
        if now - float(beat["progressed"]) > limit_for(beat, timeout_s):
            found.append(rank)
    return found


def where(beat: dict[str, Any] | None) -> str:
    if not beat:
        return "before its first heartbeat"
    if beat.get("step") is not None:
        return f"since step {beat['step']}" + (f" (epoch {beat['epoch']})" if beat.get("epoch") is not None else "")
    if beat.get("epoch") is not None:
        return f"since epoch {beat['epoch']}"
    return f"since its phase '{beat.get('phase')}'"


def main_stack(dump: str) -> list[str] | None:
    """The frames of the thread that runs the script (the one the bootstrap runs it from), most
    recent first, from a faulthandler dump; None if the dump has no such thread."""
    for block in re.split(r"\n(?=(?:Current thread|Thread) 0x)", dump):
        frames = re.findall(r'^\s+File "(.*)", line \d+ in (\S+)', block, re.MULTILINE)
        if any(path.endswith("bootstrap.py") and func == "run_script" for path, func in frames):
            return [f"{path} {func}" for path, func in frames]
    return None


def blame(late: list[int], beats: dict[int, dict[str, Any]], dumps: dict[int, str], since: float) -> int:
    """The rank that stopped the others: one that did not answer the stack request (frozen as a
    whole), else one whose script is not waiting in a collective (stuck in its own code: a
    read, a lock), else the one furthest behind (fewest steps, then oldest progress)."""
    answered = [r for r in late if main_stack(dumps.get(r, "")) is not None]
    frozen = [r for r in late if r not in answered]
    if frozen and answered:
        return frozen[0]
    own = [r for r in answered if not any(WAITING.search(f) for f in (main_stack(dumps[r]) or [])[:8])]
    if own and len(own) < len(answered):
        return own[0]

    def behind(rank: int) -> tuple[float, float, int]:
        beat = beats.get(rank, {})
        return (float(beat.get("step") or 0), float(beat.get("progressed", since)), rank)
    return min(late, key=behind)


def reachable(host: str, timeout_s: float = 3.0) -> bool:
    """Does a node answer on the network (its slurmd's port, open on every Slurm node)?"""
    try:
        with socket.create_connection((host, SLURMD_PORT), timeout=timeout_s):
            return True
    except OSError:
        return False


def report(beats: dict[int, dict[str, Any]], culprit: int, world_size: int, now: float, since: float,
           lost: list[str], hosts: dict[int, str], stalled_too: bool = True) -> dict[str, Any]:
    """The hang as status.json records it, with one sentence that says it all."""
    def age(rank: int) -> float:
        return now - float(beats.get(rank, {}).get("progressed", since))

    host = hosts.get(culprit, "?")
    waiting = [r for r in range(world_size) if r != culprit and beats.get(r, {}).get("phase") != "serving"]
    text = (f"rank {culprit} on {host} made no progress {where(beats.get(culprit))} ({age(culprit):.0f} s)"
            + ("; ranks waiting: " + ", ".join(f"{r} on {hosts.get(r, '?')} ({where(beats.get(r))}, "
                                                f"{age(r):.0f} s)" for r in waiting) if waiting else ""))
    if lost:
        on_lost = [r for r, h in hosts.items() if h in lost]
        text = (f"node {', '.join(lost)} lost: it does not answer on the network (cut off, or its slurmd is "
                f"gone), ranks {', '.join(map(str, on_lost)) or '-'} on it" + ("; " + text if stalled_too else ""))
    return {"rank": culprit, "host": host, "step": beats.get(culprit, {}).get("step"),
            "epoch": beats.get(culprit, {}).get("epoch"), "stalled_s": round(age(culprit), 1),
            "waiting": waiting, "lost_nodes": lost, "detected": now, "reason": text}


class Watchdog:
    """One attempt of one run, watched from a process of its own."""

    def __init__(self, run_dir: str, attempt: str, launcher: str, timeout_s: float, parent: int) -> None:
        self.run_dir, self.attempt, self.launcher, self.timeout_s = run_dir, attempt, launcher, timeout_s
        self.parent, self.since = parent, time.time()
        plan = rundir.Plan.load(run_dir)
        self.world_size, self.compute = len(plan.tasks), plan.compute
        self.job, self.step = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_STEP_ID")
        nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST") or ""
        self.nodes = identity.expand_nodelist(nodelist) if launcher == "slurm" and nodelist else []
        self.silent: dict[str, float] = {}  # node -> since when it has not answered

    def run(self) -> None:
        checked = 0.0
        while True:
            time.sleep(POLL_S)
            if self._over():
                return
            beats = heartbeat.read_all(self.run_dir, self.attempt)
            now = time.time()
            late = stalled(beats, self.world_size, self.timeout_s, now, self.since)
            if len(self.nodes) > 1 and now - checked >= NODE_CHECK_S:
                checked = now
                lost = self.lost_nodes(now)
                if lost:  # training may go on without noticing (a killed slurmd): Slurm would end it later
                    late = late or [r for r, b in beats.items() if b.get("host") in lost] or [0]
            if late:
                self.act(beats, late, now)
                return

    def lost_nodes(self, now: float) -> list[str]:
        """The job's nodes whose slurmd has not answered for NODE_LOST_S (every node runs one)."""
        for node in self.nodes:
            if reachable(node, timeout_s=2.0):
                self.silent.pop(node, None)
            else:
                self.silent.setdefault(node, now)
        return sorted(n for n, since in self.silent.items() if now - since >= NODE_LOST_S)

    def _over(self) -> bool:
        """The attempt ended (every rank recorded its end), or rank 0 is gone (run locally)."""
        records = rundir.rank_records(self.run_dir)
        if len(records) == self.world_size and all(r.get("ended") for r in records.values()):
            return True
        return self.launcher == "local" and os.getppid() != self.parent

    def act(self, beats: dict[int, dict[str, Any]], late: list[int], now: float) -> None:
        hosts = {r: beats.get(r, {}).get("host", "?") for r in range(self.world_size)}
        silent = set(self.lost_nodes(now) if self.silent else [])
        # A node just found lost is not asked again: each probe of a silent node costs its whole
        # timeout, and the job waits for them.
        lost = sorted(silent | {h for h in set(hosts.values())
                                if len(self.nodes) > 1 and h != "?" and h not in silent and not reachable(h)})
        dumps = self.stacks(beats, lost)
        # Every rank that should be stepping, not only the late ones: a rank frozen before its
        # heartbeat was next written still looks young.
        suspects = [r for r in range(self.world_size) if beats.get(r, {}).get("phase") not in ("serving", "ended")]
        culprit = blame(suspects or late, beats, dumps, self.since)
        if lost:  # a node gone from the network: its ranks are the ones that stopped
            culprit = min((r for r in range(self.world_size) if hosts.get(r) in lost), default=culprit)
        still = stalled(beats, self.world_size, self.timeout_s, now, self.since)
        record = report(beats, culprit, self.world_size, now, self.since, lost, hosts, stalled_too=bool(still))
        say(record["reason"])
        requeue = self._requeue_allowed()
        rundir.update_status(self.run_dir, hang={**record, "attempt": self.attempt, "requeued": requeue},
                             failed_rank=culprit, host=record["host"], reason=f"hang: {record['reason']}")
        rundir.update_attempt(self.run_dir, self.attempt, ended=time.time(), reason="hang", requeued=requeue,
                              error=record["reason"])
        self.end(beats, requeue)

    def _requeue_allowed(self) -> bool:
        earlier = [a for a in rundir.attempts(self.run_dir) if a.get("attempt") != self.attempt]
        return self.launcher == "slurm" and requeue.decide(requeue.Cause.HANG, {}, earlier, self.compute).requeue

    def stacks(self, beats: dict[int, dict[str, Any]], lost: list[str]) -> dict[int, str]:
        """Every rank's Python stacks into its own log: faulthandler through a signal, and
        py-spy from outside where it is installed. Returns what each rank's log gained."""
        logs = {r: rundir.rank_log(self.run_dir, r) for r in range(self.world_size)}
        sizes = {r: (log.stat().st_size if log.exists() else 0) for r, log in logs.items()}
        if self.launcher == "slurm" and self.job and self.step is not None:
            # scancel returns once every node of the step has answered: a lost node holds it up
            # for Slurm's MessageTimeout and more (~15-20 s seen here), while the reachable ranks
            # have their signal at once. So with a node lost it is not waited for past
            # STACK_WAIT_S (it ends on its own; the ranks that can answer have had that long);
            # otherwise as long as it takes (30 s at most), then STACK_WAIT_S.
            sent = time.monotonic()
            signalling = subprocess.Popen(["scancel", f"--signal={int(STACKS)}", f"{self.job}.{self.step}"],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL)
            try:
                signalling.wait(timeout=STACK_WAIT_S if lost else 30)
            except subprocess.TimeoutExpired:
                if not lost:
                    signalling.kill()
                    signalling.wait()
            time.sleep(max(0.0, STACK_WAIT_S - (time.monotonic() - sent)) if lost else STACK_WAIT_S)
        else:
            for beat in beats.values():
                try:
                    os.kill(int(beat["pid"]), STACKS)
                except (OSError, KeyError, ValueError):
                    pass
            time.sleep(STACK_WAIT_S)
        dumps = {r: _read_from(logs[r], sizes[r]) for r in logs}
        # nothing runs on a node that cannot be reached
        spied = [(r, b) for r, b in sorted(beats.items()) if b.get("host") not in lost]
        if shutil.which("py-spy") is not None and spied:
            # Every rank at once: a dump takes a second or two, through srun on another node
            # several, and the job waits for them all.
            with ThreadPoolExecutor(max_workers=min(8, len(spied))) as pool:
                spies = {rank: pool.submit(self._py_spy, beat) for rank, beat in spied}
                for rank, spy in spies.items():
                    with open(rundir.rank_log(self.run_dir, rank), "a") as log:
                        log.write(f"tfrun: watchdog: rank {rank}'s stacks from py-spy:\n{spy.result()}\n")
        return dumps

    def _py_spy(self, beat: dict[str, Any]) -> str:
        """``py-spy dump`` of a rank, native frames included; a process frozen as a whole
        cannot be paused for that, so then its Python stacks without pausing it."""
        text = self._run_py_spy(beat, ["--native"])
        if "Failed to get stack traces" in text:
            text = self._run_py_spy(beat, ["--nonblocking"])
        return text

    def _run_py_spy(self, beat: dict[str, Any], options: list[str]) -> str:
        command = ["py-spy", "dump", *options, "--pid", str(beat.get("pid"))]
        if self.launcher == "slurm" and beat.get("host") != rundir.hostname():
            # the rank lives on another node: run py-spy there, as a step beside the job's own
            command = ["srun", "--overlap", f"--jobid={self.job}", f"--nodelist={beat.get('host')}", "-N1", "-n1",
                       *command]
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"py-spy could not run: {exc}"
        return (out.stdout + out.stderr).strip()

    def end(self, beats: dict[int, dict[str, Any]], requeue: bool) -> None:
        if self.launcher != "slurm":
            for beat in beats.values():
                try:
                    os.kill(int(beat["pid"]), signal.SIGKILL)
                except (OSError, KeyError, ValueError):
                    pass
            return
        if requeue:
            say(f"requeueing job {self.job} (compute.requeue_on_hang): it resumes from its last backup")
            failure = preempt.requeue(str(self.job))
            if not failure:
                return
            say(f"could not requeue job {self.job}: {failure}; ending it instead")
        say(f"ending job {self.job}")
        # The whole job: a lost node's tasks could hold its step up until Slurm marks the node down.
        subprocess.run(["scancel", str(self.job)], capture_output=True, timeout=60, check=False)


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def spawn(run_dir: str, attempt: str, launcher: str, timeout_s: float) -> None:
    """Start the watchdog of this attempt beside rank 0 (from rank 0's bootstrap)."""
    with open(rundir.rank_log(run_dir, 0).with_name("watchdog.log"), "ab") as log:
        subprocess.Popen([sys.executable, "-u", "-m", "tfrun.task.watchdog", run_dir, attempt, launcher,
                          str(timeout_s), str(os.getpid())], stdin=subprocess.DEVNULL, stdout=log,
                         stderr=subprocess.STDOUT, start_new_session=launcher == "local")


def main(argv: list[str] | None = None) -> None:
    """``python -m tfrun.task.watchdog RUN_DIR ATTEMPT LAUNCHER TIMEOUT_S PARENT_PID``."""
    run_dir, attempt, launcher, timeout_s, parent = argv or sys.argv[1:]
    # A stop request to the job's tasks (preemption, Ctrl-C) is not for the watchdog.
    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, STACKS):
        signal.signal(sig, signal.SIG_IGN)
    Watchdog(run_dir, attempt, launcher, float(timeout_s), int(parent)).run()


if __name__ == "__main__":
    main()
