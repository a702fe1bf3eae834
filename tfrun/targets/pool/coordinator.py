"""The coordinator of one pool allocation (on Slurm, in its batch script; locally, a thread of
the follower): starts the slots, hands each free slot the oldest waiting item at once, delivers
an item's cancel and signals to that item's processes only, settles each item in its own run
dir as its launcher would, and ends when the queue is closed and drained, when it was told to
stop, or after the pool's idle timeout.

A stop of the allocation (a preemption, the time-limit warning) reaches the items' tasks,
which back up and stop; their items go back to the queue, to resume from their backups when
this allocation runs again (it requeues itself, by tfrun's rule for a job of its own) or in
another allocation of the pool. Finished items are never run again.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tfrun import rundir, variables
from tfrun.paths import RunPaths
from tfrun.states import FINAL, RunState
from tfrun.targets.pool.slots import Slot
from tfrun.targets.pool.store import Item, PoolStore
from tfrun.targets.settle import Ending, critical_ranks, settle
from tfrun.task import preempt, preemption, requeue
from tfrun.tracking import mlflow_sync

POLL_S = 0.05  # markers, time limits and the queue are looked at this often; events come at once
STOP_WAIT_S = 90.0  # how long a stopping allocation waits for its items to back up and stop
SLOT_RESTARTS = 3  # a slot whose processes end is started again this many times, then retired


@dataclass
class Running:
    """An item in a slot."""

    item: Item
    slot: Slot
    attempt: str
    started: float
    deadline: float | None
    critical: set[int]
    codes: dict[int, int] = field(default_factory=dict)
    outcome: str | None = None  # decided before its end: cancelled, timeout, release
    kill_at: float | None = None  # SIGKILL then (after a SIGTERM)


def say(message: str, log: Path | None = None) -> None:
    """A line in the allocation's log: the batch script's output on Slurm, a file locally (where
    stderr is the user's terminal)."""
    line = f"tfrun: pool: {time.strftime('%H:%M:%S')} {message}\n"
    if log is None:
        sys.stderr.write(line)
        sys.stderr.flush()
        return
    with open(log, "a") as f:
        f.write(line)


CANCELLED = "cancelled with tfrun cancel"


def item_ending(run_dir: str, codes: dict[int, int], outcome: str | None, stopped: bool) -> Ending:
    """What the coordinator saw of an item's end: its ranks' exit codes and what was decided
    before it (``outcome``: cancelled, timeout); ``stopped``: a rank stopped on request."""
    cancelled = outcome == "cancelled" or RunPaths.of(run_dir).cancel_request.exists()
    if cancelled:
        state, reason = RunState.CANCELLED, CANCELLED
    elif outcome == "timeout":
        state, reason = RunState.TIMEOUT, None
    elif all(c == 0 for c in codes.values()):
        state, reason = RunState.COMPLETED, None
    elif stopped and all(c in (0, preempt.EXIT_PREEMPTED) for c in codes.values()):
        state, reason = RunState.STOPPED, "stopped on request; continue it with: tfrun resume " + run_dir
    else:
        state, reason = RunState.FAILED, None
    return Ending(state, codes, cancelled=cancelled, reason=reason, host=rundir.hostname())


class Coordinator:
    """Runs one allocation's slots until the pool's work is done (:meth:`run`)."""

    def __init__(
        self,
        store: PoolStore,
        make_slot: Callable[[int], Slot],
        allocation: str,
        launcher: str,
        restart: int = 0,
        local_fields: dict[str, Any] | None = None,
    ) -> None:
        self.store, self.make_slot, self.allocation, self.launcher = store, make_slot, allocation, launcher
        self.spec = store.spec()
        self.restart = restart
        self.began = time.time()  # this attempt of the allocation (the time-limit warning is judged from it)
        self.requested: str | None = None  # a stop asked by the follower (local pools)
        self.local_fields = dict(local_fields or {})  # local items: who runs them (for LOST detection)
        self.slots: list[Slot] = []
        self.restarts: dict[int, int] = {}
        self.retired: set[int] = set()  # slots that kept ending
        self.running: dict[str, Running] = {}
        self.stopping: str | None = None
        self.stop_deadline = 0.0
        self.signalled = False
        self.grace_s = float(self.spec.compute.get("stop_grace_s", 5.0))
        self.handed = 0
        self.log = store.logs / f"{allocation}.log" if launcher == "local" else None

    # -- life --------------------------------------------------------------------------
    def run(self) -> str:
        """Until the work is done; returns why it ended (drained, idle, stopped, cancelled, ...)."""
        self.store.write_state(
            self.allocation,
            state="starting",
            host=rundir.hostname(),
            pid=os.getpid(),
            restart=self.restart,
            started=time.time(),
        )
        for item in self.store.held(self.allocation):  # this allocation's earlier attempt was killed
            self._release(item, "its allocation was restarted", attempt=None)
        self.slots = [self.make_slot(i) for i in range(self.spec.slots)]
        for slot in self.slots:
            slot.start()
        idle_since = time.monotonic()
        why = "stopped"
        try:
            while True:
                self._pump(POLL_S)
                self._watch()
                if self.signalled:
                    self.signalled = False
                    self._on_sigterm()
                if not self.stopping and (self.requested or self.store.stopped()):
                    self._begin_stop(self.requested or "cancelled")
                if self.stopping:
                    self._restart_slots(again=False)  # (a slot Slurm ended: its item is not coming back)
                    if not self.running or time.monotonic() > self.stop_deadline:
                        why = self.stopping
                        break
                    continue
                self._hand_out()
                if self.running:
                    idle_since = time.monotonic()
                elif not self.store.queued():
                    if self.store.closed():
                        why = "drained"
                        break
                    if time.monotonic() - idle_since > self.spec.idle_timeout_s:
                        why = "idle"
                        break
                if not self._restart_slots():
                    why = "its slots could not be started"
                    break
        finally:
            for run in list(self.running.values()):  # not ended in time
                if why == "cancelled":
                    self._settle(
                        run.item,
                        Ending(
                            RunState.CANCELLED, run.codes, cancelled=True, reason="its pool was stopped while it ran"
                        ),
                    )
                else:  # back in the queue, to resume elsewhere or in this allocation's next attempt
                    self._release(run.item, f"its allocation ended ({why}) while it ran", attempt=run.attempt)
            for slot in self.slots:
                slot.stop()
        # A stop that may be followed by a requeue is not an end yet (requeue_if_due says).
        self.store.write_state(
            self.allocation,
            state="stopping" if why in ("preempted", "timeout") else "ended",
            why=why,
            ended=time.time(),
            items=self.handed,
        )
        self._say(f"allocation {self.allocation} ends: {why} ({self.handed} item(s) run)")
        return why

    def _say(self, message: str) -> None:
        say(message, self.log)

    def request_stop(self, reason: str) -> None:
        """From the follower's thread: ``cancelled`` (items end now) or ``interrupted`` (items
        back up and stop, STOPPED)."""
        self.requested = reason

    def requeue_if_due(self, why: str) -> None:
        """After a stop for a preemption or the time-limit warning: requeue this allocation, by
        the rule a job of tfrun's own follows (:mod:`tfrun.task.requeue`, over this allocation's
        earlier requeues), then wait for Slurm to end this attempt."""
        if why not in ("preempted", "timeout") or self.store.stopped():
            return
        cause = requeue.Cause.PREEMPTED if why == "preempted" else requeue.Cause.TIME_LIMIT
        request = preemption.account(self.allocation) if why == "preempted" else {}
        earlier = list(self.store.state(self.allocation).get("requeues", []))
        decision = requeue.decide(cause, request, earlier, self.spec.compute)
        if not decision.requeue:
            self._say(
                f"{why}: allocation {self.allocation} is not requeued ({decision.why_not}); its unfinished "
                f"items wait in the pool's queue"
            )
            self.store.write_state(self.allocation, state="ended")
            return
        if requeue.requeued_as_it_ends(request):
            # Slurm requeues this allocation as it ends; requeued by tfrun too, it would be
            # requeued once more when its next attempt ends. So it ends now.
            record = {
                "reason": cause.value,
                "requeued": True,
                "requeued_by": "slurm",
                "time": time.time(),
                "preempted": True,
                "preempt_mode": request.get("preempt_mode"),
            }
            self.store.write_state(
                self.allocation, state="requeued", why=why, requeued=time.time(), requeues=[*earlier, record]
            )
            self._say(
                f"{why}: allocation {self.allocation} ends now and Slurm requeues it (PreemptMode=REQUEUE, "
                f"Slurm {request.get('slurm_version')}); its items resume from their backups"
            )
            return
        failure = preempt.requeue(self.allocation)
        if failure:
            self._say(f"could not requeue allocation {self.allocation}: {failure}")
            self.store.write_state(self.allocation, state="ended")
            return
        record = {
            "reason": cause.value,
            "requeued": True,
            "requeued_by": "tfrun",
            "time": time.time(),
            **{k: request[k] for k in ("preempted", "preempt_mode") if k in request},
        }
        self.store.write_state(
            self.allocation, state="requeued", why=why, requeued=time.time(), requeues=[*earlier, record]
        )
        self._say(f"{why}: allocation {self.allocation} requeued; its items resume from their backups")
        preempt.wait_to_be_stopped()

    def install_signals(self) -> None:
        """In the batch script: SIGTERM is Slurm ending this attempt (a preemption, a cancel,
        the time limit); the coordinator finds out which, and its items settle accordingly."""
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "signalled", True))
        for sig in preempt.SIGNALS:  # meant for the items, which the steps deliver it to
            signal.signal(sig, signal.SIG_IGN)

    # -- slots and their events ----------------------------------------------------------
    def _pump(self, timeout: float) -> None:
        fds = {fd: slot for slot in self.slots for fd in slot.fds()}
        if not fds:
            time.sleep(timeout)
            return
        try:
            ready, _, _ = select.select(list(fds), [], [], timeout)
        except InterruptedError:
            return
        for fd in ready:
            slot = fds[fd]
            for event in slot.read(fd):
                self._event(slot, event)

    def _event(self, slot: Slot, event: dict[str, Any]) -> None:
        kind = event.get("ev")
        if kind == "ready":
            slot.ready.add(int(event["rank"]))
            slot.warm_s = max(slot.warm_s, float(event.get("warm_s") or 0))
            if slot.is_ready():
                imported = ", ".join(event.get("imported") or []) or "tfrun"
                self._say(f"slot {slot.index} warm in {slot.warm_s:.1f} s ({imported})")
        elif kind == "ended":
            run = self.running.get(str(event.get("item")))
            if run is None:
                return
            code = int(event["code"])
            run.codes[int(event["rank"])] = code
            if (
                code not in (0, preempt.EXIT_PREEMPTED)
                and int(event["rank"]) in run.critical
                and len(run.codes) < self.spec.world
                and run.kill_at is None
            ):
                self._signal(run, signal.SIGTERM)  # as srun --kill-on-bad-exit: no rank waits for a dead peer
                run.kill_at = time.monotonic() + self.grace_s
            if len(run.codes) == self.spec.world:
                self._ended(run)

    def _restart_slots(self, again: bool = True) -> bool:
        """Slots whose processes ended (all they said read): their item's missing ranks are taken
        as killed; the slot starts again (a few times). False when no slot is left."""
        for i, slot in enumerate(self.slots):
            if slot.alive() or slot.fds() or i in self.retired or not slot.procs:
                continue
            run = next((r for r in self.running.values() if r.slot is slot), None)
            if run is not None:
                for rank in range(self.spec.world):
                    run.codes.setdefault(rank, -signal.SIGKILL)
                run.outcome = run.outcome or ("release" if self.stopping else None)
                self._say(f"slot {i} ended ({slot.why_ended()})")
                self._ended(run)
            if not again:
                continue
            if self.restarts.get(i, 0) >= SLOT_RESTARTS:
                self._say(f"slot {i} ended {SLOT_RESTARTS + 1} times: not started again ({slot.why_ended()})")
                self.retired.add(i)
                continue
            self.restarts[i] = self.restarts.get(i, 0) + 1
            self._say(f"slot {i}: starting it again ({slot.why_ended()})")
            slot.stop(grace_s=0)
            self.slots[i] = self.make_slot(i)
            self.slots[i].start()
        return len(self.retired) < len(self.slots)

    # -- items ---------------------------------------------------------------------------
    def _hand_out(self) -> None:
        for slot in self.slots:
            if slot.item is not None or not slot.is_ready():
                continue
            item = self.store.claim(self.allocation)
            if item is None:
                return
            status = rundir.read_status(item.run_dir)
            if status.get("state") in FINAL:  # settled already (cancelled while queued)
                self.store.finish(item)
                continue
            if RunPaths.of(item.run_dir).cancel_request.exists():
                self._settle(item, Ending(RunState.CANCELLED, {}, cancelled=True, reason=CANCELLED))
                continue
            if RunPaths.of(item.run_dir).prune.exists():  # its policy stopped it while it waited (back in
                self._settle(item, Ending(RunState.STOPPED, {}))  # the queue after a preemption): PRUNED
                continue
            self._start(slot, item)

    def _start(self, slot: Slot, item: Item) -> None:
        self.handed += 1
        if self.handed == 1:  # the allocation has run something (SlurmPool.ensure counts those that did not)
            self.store.write_state(self.allocation, state="running", items=1)
        attempt = f"pool-{self.allocation}-{self.restart}-{item.id}"
        plan = rundir.Plan.load(item.run_dir)
        minutes = plan.compute.get("timeout_min")
        now = time.time()
        rundir.update_status(
            item.run_dir,
            state=RunState.RUNNING,
            started=now,
            ended=None,
            failed_rank=None,
            reason=None,
            exit_codes=None,
            allocation=self.allocation,
            slot=slot.index,
            attempt=attempt,
            job_ids=[self.allocation] if self.launcher == "slurm" else [],
            **self.local_fields,
        )
        RunPaths.of(item.run_dir).signal_request.unlink(missing_ok=True)  # meant for an earlier attempt
        env = {variables.ATTEMPT: attempt, variables.LAUNCHER: self.launcher, variables.POOL: str(self.store.path)}
        run = Running(
            item, slot, attempt, now, time.monotonic() + 60 * float(minutes) if minutes else None, critical_ranks(plan)
        )
        self.running[item.id] = run
        slot.item = item.id
        if not slot.send({"op": "run", "item": item.id, "run_dir": item.run_dir, "env": env}):
            run.codes = {r: -signal.SIGKILL for r in range(self.spec.world)}
            run.outcome = "release"
            self._ended(run)

    def _signal(self, run: Running, sig: int) -> None:
        run.slot.send({"op": "signal", "item": run.item.id, "signal": int(sig)})

    def _watch(self) -> None:
        """Each running item's cancel, signal requests and time limit; kills that are due."""
        now = time.monotonic()
        for run in list(self.running.values()):
            folder = Path(run.item.run_dir)
            if run.outcome is None and RunPaths.of(folder).cancel_request.exists():
                run.outcome = "cancelled"
                self._signal(run, signal.SIGTERM)
                run.kill_at = now + self.grace_s
            asked = RunPaths.of(folder).signal_request
            if asked.exists():
                request = rundir.read_json(asked) or {}
                asked.unlink(missing_ok=True)
                if request.get("requeue"):
                    run.outcome = "release"
                self._signal(run, int(request.get("signal", signal.SIGUSR2)))
            if run.outcome is None and run.deadline is not None and now > run.deadline:
                run.outcome = "timeout"
                self._signal(run, signal.SIGTERM)
                run.kill_at = now + self.grace_s
            if run.kill_at is not None and now > run.kill_at:
                self._signal(run, signal.SIGKILL)
                run.kill_at = now + 60

    def _ended(self, run: Running) -> None:
        """Every rank of the item has ended: settle it, or put it back in the queue."""
        self.running.pop(run.item.id, None)
        run.slot.item = None
        folder = Path(run.item.run_dir)
        stopped = any(c == preempt.EXIT_PREEMPTED for c in run.codes.values())
        decided = RunPaths.of(folder).prune.exists() or RunPaths.of(folder).cancel_request.exists()
        if stopped and not decided and not self.stopping and self.launcher == "slurm":
            reason = self._why_stopping()
            if reason in ("preempted", "timeout"):
                self._begin_stop(reason)
        # While the allocation stops for a preemption or its time limit, an item that did not
        # complete runs again (one killed before its stop handler was in place included).
        interrupted = (
            self.stopping in ("preempted", "timeout") and not decided and any(c != 0 for c in run.codes.values())
        )
        if run.outcome == "release" or interrupted:
            self._release(run.item, self.stopping or "its processes ended", attempt=run.attempt)
            return
        self._settle(run.item, item_ending(run.item.run_dir, run.codes, run.outcome, stopped))

    def _settle(self, item: Item, ending: Ending) -> None:
        fields = settle(item.run_dir, ending)
        rundir.update_status(item.run_dir, **fields)
        self.store.finish(item)
        mlflow_sync.sync_if_asked(item.run_dir, fields["state"])  # (a follower's job for a run of its own)

    def _release(self, item: Item, why: str, attempt: str | None) -> None:
        """Back in the queue: it resumes from its backup in the next slot that takes it."""
        if attempt is not None:
            rundir.update_attempt(
                item.run_dir, attempt, ended=time.time(), reason=why, requeued=True, requeued_by="tfrun"
            )
        rundir.update_status(
            item.run_dir, state=RunState.PENDING, reason=f"{why}: back in its pool's queue, to resume from its backup"
        )
        self.store.release(item)

    # -- stops ---------------------------------------------------------------------------
    def _why_stopping(self) -> str:
        """Why an item stopped on request with no cancel or policy behind it: its allocation is
        being preempted, or its time limit is near (the warning); else it was asked alone."""
        if preemption.account(self.allocation).get("preempted"):
            return "preempted"
        elapsed = time.time() - self.began
        if (
            requeue.cause_of({"signal": preempt.SIGNALS[1].name}, elapsed, self.spec.compute)
            is requeue.Cause.TIME_LIMIT
        ):
            return "timeout"
        return "item"

    def _begin_stop(self, reason: str) -> None:
        self.stopping = reason
        self.stop_deadline = time.monotonic() + (STOP_WAIT_S if reason != "cancelled" else 2 * self.grace_s + 5)
        self._say(f"allocation {self.allocation} stopping: {reason}; {len(self.running)} item(s) running")
        for run in self.running.values():
            if reason == "cancelled":
                run.outcome = run.outcome or "cancelled"
                self._signal(run, signal.SIGTERM)
                run.kill_at = time.monotonic() + self.grace_s
            else:
                self._signal(run, preempt.SIGNALS[1])  # back up and stop (Slurm's own signal may come too)

    def _on_sigterm(self) -> None:
        if self.stopping:
            return
        found = preemption.account(self.allocation)
        if found.get("preempted") or not found:  # (Slurm did not answer: the work is saved, as for a preemption)
            self._begin_stop("preempted")
            return
        self._begin_stop("timeout" if found.get("job_state") == preemption.SLURM_TIMEOUT else "cancelled")
