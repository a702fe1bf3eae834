"""The watchdog of a run's attempt: finds a run that stopped making progress, shows where its
ranks are stuck, and ends the attempt (or requeues it) instead of letting it wait until the
time limit.

Rank 0's bootstrap starts it as a process of its own (``python -m tfrun.task.watchdog``),
beside the tasks: a frozen or stuck rank 0 does not freeze it. Every ``POLL_S`` it reads
the ranks' heartbeats (:mod:`tfrun.task.heartbeat`). A rank's progress is its steps while
it reports steps (Keras batches, ``tfrun.heartbeat(step)``), else the CPU its script uses
(:mod:`tfrun.task.activity`): a script that reports nothing is judged by what it does, not
by its silence. The run is hung when none of the ranks it judges made progress for
``compute.hang_timeout_s``: a rank that waits for a slow one is not hung while that one
works. Tasks that serve (parameter servers) are not judged, nor a parameter-server
evaluator while training goes on (it waits for checkpoints), nor a rank whose activity
cannot be measured (said once, in its log and in ``tfrun status``). Then it:

1. asks every rank for its Python stacks, all threads (a signal the bootstrap hands to
   ``faulthandler``);
2. names the rank that stopped first, its node, its last step and how long ago, and the
   ranks waiting, in ``status.json`` and the ranks' logs; a node that does not answer on
   the network is named as lost (:mod:`tfrun.task.probe`);
3. with py-spy installed, takes each rank's stacks from outside too (native frames, and a
   process frozen as a whole cannot answer a signal): only now, as it takes seconds of CPU
   a rank, and far longer on a busy node;
4. ends the attempt: kills the job (it fails), or with ``compute.requeue_on_hang`` requeues
   it (bounded by ``compute.max_requeues``), which then resumes from its last backup like a
   preempted one; a requeue Slurm refuses is recorded and the job ends as failed. Locally:
   kills the tasks.

It ends with its attempt: once every rank recorded its end; for ranks that end without it
(killed, never started), locally once rank 0 is gone, on Slurm once its job step has ended
(rank 0's end is not enough: another rank may still hang). A pool's item runs in its slot's
step, as long as the allocation: its slot ends the watchdog with rank 0's process, else it
ends once the pool settled the item. Slurm would not end it where it tracks a step's
processes by parent or group (proctrack/linuxproc, pgid): without rank 0 it is no child of
the step's.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tfrun import rundir, variables
from tfrun.paths import RunPaths
from tfrun.states import RunState
from tfrun.task import heartbeat, preempt, preemption, requeue
from tfrun.task.probe import NodeProbe, job_nodes

POLL_S = 1.0
STACKS = signal.SIGURG  # faulthandler's signal in every task (ignored by anything else)
STACK_WAIT_S = 3.0
NODE_CHECK_S = 5.0  # across nodes: how often every node is asked whether it is there (its ranks' ports)
# On Slurm, how often the controller is asked whether the watchdog's job step still runs: while
# rank 0 (its parent) lives, seldom (Slurm ends rank 0 with its step); once rank 0 is gone, more
# often (the other ranks may still run and be watched, or the step may have ended with it).
STEP_CHECK_S = 60.0
ORPHAN_STEP_CHECK_S = 5.0
NOT_JUDGED = ("serving", "ended")  # phases of a task that makes no progress of its own to judge
# Frames of a rank that waits for the others (a collective, a barrier, a distributed step, a
# compiled TensorFlow function: the collectives of a tf.function step run inside it).
WAITING = re.compile(
    r"/horovod/|collective|all_?reduce|allgather|broadcast|barrier|/distribute/|rendezvous"
    r"|/eager/execute\.py quick_execute",
    re.IGNORECASE,
)


def say(message: str) -> None:
    print(f"tfrun: watchdog: {message}", file=sys.stderr, flush=True)


def progressed(beat: dict[str, Any]) -> float | None:
    """When a rank last made progress: its last step (or hold) while it reports steps, else the
    later of its last beat and the last time its script used CPU; None when that cannot be
    known (its activity is not measured on its host)."""
    if beat.get("stepping"):
        return float(beat["progressed"])
    if beat.get("active") is None:
        return None
    return max(float(beat["progressed"]), float(beat["active"]))


def judged(beats: dict[int, dict[str, Any]], roles: list[str], since: float) -> dict[int, float]:
    """The ranks the watchdog judges, each with when it last made progress (a rank never
    heard from: since ``since``). Not judged: tasks that serve (role ``serves``) or have
    ended, a rank whose activity is not measured, and a parameter-server evaluator while
    another rank still runs the script (it waits for the chief's checkpoints, as long as
    training takes)."""
    found: dict[int, float] = {}
    for rank, role in enumerate(roles):
        beat = beats.get(rank)
        if role == "serves":
            continue
        if beat is None:
            found[rank] = since
        elif beat.get("phase") not in NOT_JUDGED and (when := progressed(beat)) is not None:
            found[rank] = when
    training = [r for r in found if roles[r] != "evaluator"]
    return {r: t for r, t in found.items() if roles[r] != "evaluator" or not training}


def stalled(
    beats: dict[int, dict[str, Any]], roles: list[str], timeout_s: float, now: float, since: float
) -> list[int]:
    """The judged ranks, if none of them made progress for ``timeout_s``; else none."""
    ranks = judged(beats, roles, since)
    if ranks and all(now - when > timeout_s for when in ranks.values()):
        return sorted(ranks)
    return []


def unwatched(beat: dict[str, Any], role: str) -> str | None:
    """Why a rank that runs the script is not judged by the watchdog; None if it is."""
    if role == "evaluator":
        return (
            "a parameter-server evaluator is not judged while training goes on (it waits for the "
            "chief's checkpoints); once the others have ended, by its steps or activity"
        )
    if beat.get("active") is None and not beat.get("stepping") and beat.get("phase") not in NOT_JUDGED:
        return (
            "it reports no steps and its CPU cannot be read on this host (no /proc): call "
            "tfrun.heartbeat(step) in its loop to have it watched"
        )
    return None


def where(beat: dict[str, Any] | None) -> str:
    if not beat:
        return "before its first heartbeat"
    if beat.get("stepping") and beat.get("step") is not None:
        return f"since step {beat['step']}" + (f" (epoch {beat['epoch']})" if beat.get("epoch") is not None else "")
    if beat.get("stepping"):
        return f"since epoch {beat['epoch']}" if beat.get("epoch") is not None else "since its last batch"
    if beat.get("phase") == "script running":
        return "since its script last used CPU"
    return f"in its phase '{beat.get('phase')}', since it last used CPU"


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


def report(
    beats: dict[int, dict[str, Any]],
    culprit: int,
    world_size: int,
    now: float,
    since: float,
    lost: list[str],
    hosts: dict[int, str],
    stalled_too: bool = True,
) -> dict[str, Any]:
    """The hang as status.json records it, with one sentence that says it all."""

    def age(rank: int) -> float:
        beat = beats.get(rank)
        if not beat:
            return now - since
        when = progressed(beat)
        return now - (float(beat["progressed"]) if when is None else when)

    host = hosts.get(culprit, "?")
    waiting = [r for r in range(world_size) if r != culprit and beats.get(r, {}).get("phase") not in NOT_JUDGED]
    text = f"rank {culprit} on {host} made no progress {where(beats.get(culprit))} ({age(culprit):.0f} s)" + (
        "; ranks waiting: "
        + ", ".join(f"{r} on {hosts.get(r, '?')} ({where(beats.get(r))}, {age(r):.0f} s)" for r in waiting)
        if waiting
        else ""
    )
    if lost:
        on_lost = [r for r, h in hosts.items() if h in lost]
        text = (
            f"node {', '.join(lost)} lost: it does not answer on the network (cut off, or down), "
            f"ranks {', '.join(map(str, on_lost)) or '-'} on it" + ("; " + text if stalled_too else "")
        )
    return {
        "rank": culprit,
        "host": host,
        "step": beats.get(culprit, {}).get("step"),
        "epoch": beats.get(culprit, {}).get("epoch"),
        "stalled_s": round(age(culprit), 1),
        "waiting": waiting,
        "lost_nodes": lost,
        "detected": now,
        "reason": text,
    }


class Watchdog:
    """One attempt of one run, watched from a process of its own."""

    def __init__(self, run_dir: str, attempt: str, launcher: str, timeout_s: float, parent: int) -> None:
        self.run_dir, self.attempt, self.launcher, self.timeout_s = run_dir, attempt, launcher, timeout_s
        self.parent, self.since = parent, time.time()
        plan = rundir.Plan.load(run_dir)
        self.world_size, self.compute = len(plan.tasks), plan.compute
        self.roles = [t.role if t.runs_script else "serves" for t in plan.tasks]
        # On a pool's item, the step is its slot's: it outlives the item (see _item_over).
        self.job, self.step = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_STEP_ID")
        self.step_asked = time.monotonic()
        nodes = job_nodes(launcher)
        self.probe = NodeProbe(nodes) if len(nodes) > 1 else None
        self.notes: dict[str, str] = {}  # what the watchdog does not watch, said once each

    def run(self) -> None:
        checked = 0.0
        while True:
            time.sleep(POLL_S)
            if self._over():
                return
            beats = heartbeat.read_all(self.run_dir, self.attempt)
            now = time.time()
            self.note_unwatched(beats)
            late = stalled(beats, self.roles, self.timeout_s, now, self.since)
            if self.probe is not None:
                self.see_nodes(beats)
            if self.probe is not None and now - checked >= NODE_CHECK_S:
                checked = now
                lost = self.probe.lost(now)
                if lost:  # the ranks there are out of reach: the others wait for them, or soon will
                    late = late or [r for r, b in beats.items() if b.get("host") in lost] or [0]
            if late:
                self.act(beats, late, now)
                return

    def see_nodes(self, beats: dict[int, dict[str, Any]]) -> None:
        """The lost-node probe takes the ports of ranks that started since: said in the watchdog's
        log, and a node it cannot watch once in the run's status."""
        assert self.probe is not None
        for found in self.probe.see(beats):
            say(f"lost-node probe: {found}")
        for node, why in self.probe.unknown.items():
            self.note(f"node {node}", f"node {node}: not probed for loss, {why}")

    def note_unwatched(self, beats: dict[int, dict[str, Any]]) -> None:
        """Say once, in the rank's log and in the run's status, which rank is not watched and why."""
        for rank, beat in sorted(beats.items()):
            why = unwatched(beat, self.roles[rank]) if self.roles[rank] != "serves" else None
            if why:
                self.note(f"rank {rank}", f"rank {rank}: not watched for hangs, {why}", rank)

    def note(self, key: str, text: str, rank: int | None = None) -> None:
        if key in self.notes:
            return
        self.notes[key] = text
        say(text)
        if rank is not None:
            with open(RunPaths.of(self.run_dir).rank_log(rank), "a") as log:
                log.write(f"tfrun: watchdog: {text}\n")
        rundir.update_status(self.run_dir, watchdog={"attempt": self.attempt, "notes": list(self.notes.values())})

    def _over(self) -> bool:
        """The attempt ended: every rank recorded its end; run locally, rank 0 is gone; on Slurm,
        a pool settled the item, or the job step has ended."""
        records = rundir.rank_records(self.run_dir)
        if len(records) == self.world_size and all(r.get("ended") for r in records.values()):
            return True
        if self.launcher == "local":
            return os.getppid() != self.parent
        return self._item_over() or self._step_over()

    def _item_over(self) -> bool:
        """A pool's item: its coordinator settled it, or put it back in the queue, once every
        rank's process of it ended (the attempt it runs then is no longer this one)."""
        if not os.environ.get(variables.POOL):
            return False
        status = rundir.read_status(self.run_dir)
        return bool(status) and (status.get("attempt") != self.attempt or status.get("state") != RunState.RUNNING)

    def _step_over(self) -> bool:
        """The job step has ended, as Slurm says, or runs again in a requeued job (started after
        this watchdog); Slurm not answering is no end."""
        if not self.job or self.step is None:
            return False
        every = ORPHAN_STEP_CHECK_S if os.getppid() != self.parent else STEP_CHECK_S
        if time.monotonic() - self.step_asked < every:
            return False
        self.step_asked = time.monotonic()
        found = preemption.step(self.job, self.step)
        return found is not None and (found.ended or found.started_after(self.since))

    def act(self, beats: dict[int, dict[str, Any]], late: list[int], now: float) -> None:
        hosts = {r: beats.get(r, {}).get("host", "?") for r in range(self.world_size)}
        lost = self.probe.confirm() if self.probe is not None else []
        dumps = self.stacks(beats, lost)
        # Among the judged ranks (every one of them stalled), not a task that serves or an
        # evaluator that waits for training: their stacks are in their own code, by design.
        culprit = blame(late, beats, dumps, self.since)
        if lost:  # a node gone from the network: its ranks are the ones that stopped
            culprit = min((r for r in range(self.world_size) if hosts.get(r) in lost), default=culprit)
        still = stalled(beats, self.roles, self.timeout_s, now, self.since)
        record = report(beats, culprit, self.world_size, now, self.since, lost, hosts, stalled_too=bool(still))
        say(record["reason"])
        requeue = self._requeue_allowed()
        # Recorded before the requeue: Slurm ends this process with the job's tasks once it is done.
        rundir.update_status(
            self.run_dir,
            hang={**record, "attempt": self.attempt, "requeued": requeue},
            failed_rank=culprit,
            host=record["host"],
            reason=f"hang: {record['reason']}",
        )
        rundir.update_attempt(
            self.run_dir, self.attempt, ended=time.time(), reason="hang", requeued=requeue, error=record["reason"]
        )
        # Only once the hang is on record: py-spy takes seconds of CPU a rank, far more on a busy
        # node, and the user learns which rank stopped and why without waiting for it.
        self.spy(beats, lost)
        self.end(beats, requeue, record)

    def _requeue_allowed(self) -> bool:
        earlier = [a for a in rundir.attempts(self.run_dir) if a.get("attempt") != self.attempt]
        return self.launcher == "slurm" and requeue.decide(requeue.Cause.HANG, {}, earlier, self.compute).requeue

    def stacks(self, beats: dict[int, dict[str, Any]], lost: list[str]) -> dict[int, str]:
        """Every rank's Python stacks into its own log, through a signal its faulthandler answers.
        Returns what each rank's log gained."""
        logs = {r: RunPaths.of(self.run_dir).rank_log(r) for r in range(self.world_size)}
        sizes = {r: (log.stat().st_size if log.exists() else 0) for r, log in logs.items()}
        if self.launcher == "slurm" and self.job and self.step is not None:
            # scancel returns once every node of the step has answered: a lost node holds it up
            # for Slurm's MessageTimeout and more (~15-20 s seen here), while the reachable ranks
            # have their signal at once. So with a node lost it is not waited for past
            # STACK_WAIT_S (it ends on its own; the ranks that can answer have had that long);
            # otherwise as long as it takes (30 s at most), then STACK_WAIT_S.
            sent = time.monotonic()
            signalling = subprocess.Popen(
                ["scancel", f"--signal={int(STACKS)}", f"{self.job}.{self.step}"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
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
        return {r: _read_from(logs[r], sizes[r]) for r in logs}

    def spy(self, beats: dict[int, dict[str, Any]], lost: list[str]) -> None:
        """Every rank's stacks from outside into its own log, with py-spy where it is installed:
        native frames too, and a process frozen as a whole, which cannot answer a signal."""
        # nothing runs on a node that cannot be reached
        spied = [(r, b) for r, b in sorted(beats.items()) if b.get("host") not in lost]
        if shutil.which("py-spy") is not None and spied:
            # Every rank at once: a dump of a training rank takes 3-4 s (its native frames),
            # through srun on another node more, and the job waits for them all.
            with ThreadPoolExecutor(max_workers=min(8, len(spied))) as pool:
                spies = {rank: pool.submit(self._py_spy, beat) for rank, beat in spied}
                for rank, spy in spies.items():
                    with open(RunPaths.of(self.run_dir).rank_log(rank), "a") as log:
                        log.write(f"tfrun: watchdog: rank {rank}'s stacks from py-spy:\n{spy.result()}\n")

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
            command = [
                "srun",
                "--overlap",
                f"--jobid={self.job}",
                f"--nodelist={beat.get('host')}",
                "-N1",
                "-n1",
                *command,
            ]
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"py-spy could not run: {exc}"
        return (out.stdout + out.stderr).strip()

    def end(self, beats: dict[int, dict[str, Any]], requeue: bool, record: dict[str, Any]) -> None:
        if self.launcher != "slurm":
            for beat in beats.values():
                try:
                    os.kill(int(beat["pid"]), signal.SIGKILL)
                except (OSError, KeyError, ValueError):
                    pass
            return
        if os.environ.get(variables.POOL):  # a pool's item: its coordinator ends it, not the allocation
            rundir.write_json(
                RunPaths.of(self.run_dir).signal_request, {"signal": int(signal.SIGKILL), "requeue": requeue}
            )
            return
        if requeue:
            say(f"requeueing job {self.job} (compute.requeue_on_hang): it resumes from its last backup")
            failure = preempt.requeue(str(self.job))
            if not failure:
                return
            say(f"could not requeue job {self.job}: {failure}; ending it instead")
            # The run then ends as a hang, with its rank and reason, not as a cancelled job.
            rundir.update_status(
                self.run_dir, hang={**record, "attempt": self.attempt, "requeued": False, "requeue_failed": failure}
            )
            rundir.update_attempt(self.run_dir, self.attempt, requeued=False, requeue_failed=failure)
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


def spawn(run_dir: str, attempt: str, launcher: str, timeout_s: float) -> int:
    """Start the watchdog of this attempt beside rank 0 (from rank 0's bootstrap); its pid."""
    with open(RunPaths.of(run_dir).watchdog_log, "ab") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-u",
                "-m",
                "tfrun.task.watchdog",
                run_dir,
                attempt,
                launcher,
                str(timeout_s),
                str(os.getpid()),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=launcher == "local",
        ).pid


def main(argv: list[str] | None = None) -> None:
    """``python -m tfrun.task.watchdog RUN_DIR ATTEMPT LAUNCHER TIMEOUT_S PARENT_PID``."""
    run_dir, attempt, launcher, timeout_s, parent = argv or sys.argv[1:]
    # A stop request to the job's tasks (preemption, Ctrl-C) is not for the watchdog.
    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, STACKS):
        signal.signal(sig, signal.SIG_IGN)
    Watchdog(run_dir, attempt, launcher, float(timeout_s), int(parent)).run()


if __name__ == "__main__":
    main()
