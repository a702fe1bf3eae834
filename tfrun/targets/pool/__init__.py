"""Warm pools: K Slurm allocations (or this machine) of S slots each, held for a sweep or a study,
that run work items (sweep points, tuning trials) fed to them while they run. An item costs no
sbatch, no queue wait and no srun: a free slot takes the next one at once, and starts it in a
fresh process from an interpreter that has its imports done (:mod:`~tfrun.targets.pool.agent`).
Each item keeps what a run of its own has: its run dir, status, logs, metrics, rank records,
backups, ``tfrun status/logs/cancel``, exit codes; a failing item does not stop the others.

The interface a follower (a sweep, a study; later the runner's Target) uses is :class:`Pool`:
``create``/``open``, :meth:`~Pool.feed`, :meth:`~Pool.ensure` (keep allocations alive while work
remains), :meth:`~Pool.signal` and :meth:`~Pool.cancel` of one item, :meth:`~Pool.close` (no more
items: allocations end once drained) and :meth:`~Pool.stop` (end now). Item states are the items'
own status files; :func:`refresh_items` settles the items an ended pool can no longer run.

Modules: :mod:`~tfrun.plan.pools` (the spec, pure), :mod:`~tfrun.targets.pool.store` (the pool
dir), :mod:`~tfrun.targets.pool.coordinator` (each allocation's loop),
:mod:`~tfrun.targets.pool.slots` and :mod:`~tfrun.targets.pool.agent` (the slots).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Sequence

from tfrun import rundir
from tfrun.errors import ConfigError
from tfrun.paths import RunPaths, SweepPaths
from tfrun.plan import Plan, pools
from tfrun.plan.pools import PoolSpec
from tfrun.states import FINAL, RunState
from tfrun.targets.pool.store import Item, PoolStore

# How often a follower asks Slurm about a pool's allocations (its items' states are files).
QUERY_EVERY_S = 3.0


class Pool(ABC):
    """Slots held for a set of items, fed while they run."""

    def __init__(self, store: PoolStore) -> None:
        self.store = store
        self.spec = store.spec()

    @staticmethod
    def create(spec: PoolSpec, pool_dir: str | os.PathLike[str], extra_env: dict[str, str] | None = None) -> "Pool":
        """A new pool (an existing one in ``pool_dir`` is opened instead). Nothing starts yet."""
        PoolStore(pool_dir).create(spec)
        return Pool.open(pool_dir, extra_env)

    @staticmethod
    def open(pool_dir: str | os.PathLike[str], extra_env: dict[str, str] | None = None) -> "Pool":
        """The pool in ``pool_dir`` (a follower reattaching to it)."""
        store = PoolStore(pool_dir)
        return SlurmPool(store) if store.spec().target == "slurm" else LocalPool(store, extra_env)

    @property
    def stopped(self) -> bool:
        """Was it told to end now (a cancelled sweep or study)?"""
        return self.store.stopped()

    def feed(self, plans: Sequence[Plan]) -> list[Item]:
        """Queue planned runs (already written); an item fed before keeps its place."""
        now = time.time()
        for plan in plans:
            if rundir.read_status(plan.run_dir).get("pool_item"):
                continue
            rundir.update_status(
                plan.run_dir,
                run_id=plan.run_id,
                state=RunState.PENDING,
                target=plan.target,
                backend=plan.backend,
                world_size=len(plan.tasks),
                submitted=now,
                started=None,
                ended=None,
                job_ids=[],
                failed_rank=None,
                reason=None,
                **self._owner(),
            )
        items = self.store.feed([p.run_dir for p in plans])
        self.ensure()
        return items

    def _owner(self) -> dict[str, Any]:
        return {}

    def signal(self, run_dir: str | os.PathLike[str], sig: int = signal.SIGUSR2, requeue: bool = False) -> None:
        """Deliver ``sig`` to one item's processes (a policy's stop: SIGUSR2, the item backs up
        and stops) through the coordinator holding it."""
        rundir.write_json(
            RunPaths.of(run_dir).signal_request, {"signal": int(sig), "requeue": requeue, "time": time.time()}
        )

    def cancel(self, run_dir: str | os.PathLike[str]) -> None:
        """Cancel one item: never started if it waits, else its processes end; the others go on."""
        RunPaths.of(run_dir).cancel_request.touch()
        item = rundir.read_status(run_dir).get("pool_item")
        if item and self.store.take_back(item):
            rundir.update_status(
                run_dir, state=RunState.CANCELLED, ended=time.time(), reason="cancelled with tfrun cancel"
            )

    def close(self) -> None:
        """No more items: each allocation ends as soon as the queue is drained."""
        self.store.close()

    def stop(self) -> None:
        """End now: running items are cancelled, waiting ones never start, allocations end."""
        self.store.stop()
        self._end()
        for item_id in self.store.queued():
            self._cancel_waiting(item_id)

    def _cancel_waiting(self, item_id: str) -> None:
        data = rundir.read_json(self.store.queue / f"{item_id}.json") or {}
        if self.store.take_back(item_id) and data.get("run_dir"):
            rundir.update_status(
                data["run_dir"],
                state=RunState.CANCELLED,
                ended=time.time(),
                reason="its pool was stopped before it ran",
            )

    @abstractmethod
    def _end(self) -> None:
        """End the allocations now."""

    @abstractmethod
    def ensure(self) -> None:
        """While work remains: items held by allocations that are over go back to the queue,
        and allocations are started where none is alive (within the pool's budget)."""


class SlurmPool(Pool):
    """Allocations submitted as one job array (more if some end while work remains)."""

    def __init__(self, store: PoolStore) -> None:
        super().__init__(store)
        self._info: dict[str, dict[str, str]] = {}
        self._asked = 0.0

    def allocation_states(self, fresh: bool = False) -> dict[str, str]:
        """tfrun's state of each allocation (one batched query; at most every QUERY_EVERY_S)."""
        from tfrun.targets import slurm

        jobs = self.store.allocations()
        if jobs and (fresh or time.monotonic() - self._asked > QUERY_EVERY_S):
            self._info, self._asked = slurm.query(jobs), time.monotonic()
        return {j: slurm.tfrun_state(self._info[j]["State"]) if j in self._info else RunState.PENDING for j in jobs}

    def live(self, states: dict[str, str]) -> list[str]:
        """Allocations that are queued or running and whose coordinator has not ended."""
        return [j for j, s in states.items() if s not in FINAL and self.store.state(j).get("state") != "ended"]

    def start(self, count: int | None = None) -> list[str]:
        """Submit ``count`` allocations (default: the pool's K) as one job array."""
        from tfrun.targets import slurm

        count = self.spec.allocations if count is None else count
        folder = str(SweepPaths.of(self.store.path).submitit)
        executor = slurm._executor(folder, pools.allocation_parameters(self.spec), self.spec.python)
        try:
            if count == 1:
                jobs = [executor.submit(run_allocation, str(self.store.path))]
            else:
                with executor.batch():
                    jobs = [executor.submit(run_allocation, str(self.store.path)) for _ in range(count)]
        except Exception as exc:  # submitit raises its own types, with sbatch's message inside
            raise pool_rejected(self.spec, exc) from exc
        ids = [str(job.job_id) for job in jobs]
        self.store.add_allocations(ids)
        self._asked = 0.0
        return ids

    def ensure(self) -> None:
        if self.store.stopped():
            return
        self.store.follow()
        states = self.allocation_states()
        live = self.live(states)
        for item in self.store.held():
            if item.holder not in live and states.get(str(item.holder)) in FINAL:
                self._recover(item, states[str(item.holder)])
        waiting = self.store.queued()
        if not waiting or live:
            return
        # Allocations that ended without running anything (their slots would not start, Slurm
        # ended them early): the pool gives up after compute.max_requeues of them. One that ran
        # items and reached its time limit is simply followed by another.
        failed = [
            j
            for j, s in states.items()
            if s in FINAL
            and self.store.state(j).get("why") not in ("drained", "idle")
            and not self.store.state(j).get("items")
        ]
        if len(failed) > int(self.spec.compute.get("max_requeues", 3)):
            for item_id in waiting:
                self._give_up(item_id, failed, states)
            return
        before = self.store.allocations()
        ids = self.start(min(self.spec.allocations, len(waiting)))
        if before:  # (the first ones are the sweep's or the study's to announce)
            print(
                f"tfrun: pool: started allocation(s) {', '.join(ids)} for {len(waiting)} waiting item(s) (the "
                f"earlier ones ended: {', '.join(before)})",
                file=sys.stderr,
                flush=True,
            )

    def _recover(self, item: Item, state: str) -> None:
        """An item whose allocation ended (killed, not requeued) while it ran: it resumes elsewhere."""
        rundir.update_status(
            item.run_dir,
            state=RunState.PENDING,
            reason=f"its allocation {item.holder} ended ({state}) while it ran: back in the queue",
        )
        self.store.release(item)

    def _give_up(self, item_id: str, failed: list[str], states: dict[str, str]) -> None:
        data = rundir.read_json(self.store.queue / f"{item_id}.json") or {}
        if self.store.take_back(item_id) and data.get("run_dir"):
            last = failed[-1]
            rundir.update_status(
                data["run_dir"],
                state=ended_state(states[last]),
                ended=time.time(),
                reason=f"the pool's allocations ended before it ran ({len(failed)} ended "
                f"early, the last {last} {states[last]}; compute.max_requeues)",
            )

    def _end(self) -> None:
        from tfrun.targets import slurm

        slurm.cancel(self.store.allocations())


class LocalPool(Pool):
    """This machine's slots, driven by a coordinator in a thread of the follower."""

    def __init__(self, store: PoolStore, extra_env: dict[str, str] | None = None) -> None:
        super().__init__(store)
        self.extra_env = dict(extra_env or {})
        self.thread: threading.Thread | None = None
        self.coordinator: Any = None

    def _owner(self) -> dict[str, Any]:
        # A local item's launcher is this process: when it is gone, `tfrun status` shows LOST.
        return {
            "launcher_pid": os.getpid(),
            "launcher_started": rundir.process_started(os.getpid()),
            "launcher_host": rundir.hostname(),
        }

    def ensure(self) -> None:
        if self.store.stopped() or (self.thread is not None and self.thread.is_alive()):
            return
        if not self.store.queued() and not self.store.held():
            return
        from tfrun.targets.pool.coordinator import Coordinator
        from tfrun.targets.pool.slots import LocalSlot

        def slot(index: int) -> LocalSlot:
            return LocalSlot(self.spec, self.store, "local", index, self.extra_env)

        self.coordinator = Coordinator(self.store, slot, "local", "local", local_fields=self._owner())
        self.thread = threading.Thread(target=self.coordinator.run, name="tfrun-pool", daemon=True)
        self.thread.start()

    def interrupt(self) -> None:
        """Ctrl-C: running items back up and stop (STOPPED, resumable); waiting ones never start."""
        self.store.close()
        if self.coordinator is not None:
            self.coordinator.request_stop("interrupted")
        self.join()
        for item_id in self.store.queued():
            self._cancel_waiting(item_id)

    def _end(self) -> None:
        if self.coordinator is not None:
            self.coordinator.request_stop("cancelled")
        self.join()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the coordinator to end (it does once the queue is closed and drained)."""
        if self.thread is not None:
            self.thread.join(timeout)


def ended_state(allocation_state: str) -> str:
    """An item's state when its pool ended without running it: as its allocation's end."""
    return allocation_state if allocation_state in (RunState.CANCELLED, RunState.TIMEOUT) else RunState.FAILED


def pool_rejected(spec: PoolSpec, exc: Exception) -> ConfigError:
    """Slurm refused the pool's allocation: say what the pool asked for, and Slurm's words."""
    from tfrun.targets import slurm

    c = spec.compute
    per_node = c.get("gpus_per_node") and not c.get("gpus_per_task")
    gpus = f", {c['gpus_per_node'] * spec.slots} GPU(s) per node" if per_node else ""
    asked = (
        f"{spec.nodes} node(s) x {spec.tasks_per_node * spec.slots} task(s){gpus} in partition "
        f"{c.get('partition') or '(default)'}, {c['timeout_min']} min"
    )
    return ConfigError(
        f"the pool's allocation ({spec.slots} slot(s) of {spec.nodes} node(s) x "
        f"{spec.tasks_per_node} task(s): {asked}) cannot be had: {slurm._rejected(exc)}. Ask for "
        f"fewer slots per allocation (compute.pack_slots; a study: hydra.sweeper.pool.allocations "
        f"and max_parallel) or smaller items"
    )


def run_allocation(pool_dir: str) -> None:
    """What each pool allocation runs (pickled by submitit, in the batch script)."""
    from tfrun.targets.pool.coordinator import Coordinator
    from tfrun.targets.pool.slots import SlurmSlot

    store = PoolStore(pool_dir)
    spec = store.spec()
    env = os.environ
    allocation = (
        f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
        if env.get("SLURM_ARRAY_JOB_ID")
        else env["SLURM_JOB_ID"]
    )
    coordinator = Coordinator(
        store,
        lambda i: SlurmSlot(spec, store, allocation, i),
        allocation,
        "slurm",
        restart=int(env.get("SLURM_RESTART_COUNT") or 0),
    )
    coordinator.install_signals()
    why = coordinator.run()
    coordinator.requeue_if_due(why)


def refresh_items(items: Sequence[tuple[Path, dict[str, Any]]], info: dict[str, dict[str, str]]) -> None:
    """Pool items not finished (with their statuses, updated in place) whose pool can no longer
    run them: its queue is closed, none of its allocations is alive (``info``: the allocations'
    sacct records), and no follower will start another (it was stopped, or its follower is
    gone: a detached sweep). They end as their allocation did. A pool still open, or one whose
    follower lives, is left to that follower: an allocation that ended at its time limit put
    its unfinished items back in the queue, and the follower starts another for them."""
    from tfrun.targets import slurm

    by_pool: dict[str, list[tuple[Path, dict[str, Any]]]] = {}
    for run_dir, status in items:
        by_pool.setdefault(str(status["pool"]), []).append((run_dir, status))
    for pool_dir, members in by_pool.items():
        store = PoolStore(pool_dir)
        if not store.exists() or store.spec().target != "slurm" or not store.closed():
            continue
        if store.followed() and not store.stopped():
            continue
        jobs = store.allocations()
        states = {j: slurm.tfrun_state(info[j]["State"]) if j in info else RunState.PENDING for j in jobs}
        if not jobs or any(s not in FINAL and store.state(j).get("state") != "ended" for j, s in states.items()):
            continue
        last = jobs[-1]
        for run_dir, status in members:
            where, holder = store.where(str(status.get("pool_item")))
            if where not in ("queue", "running"):
                continue
            state = ended_state(states.get(str(holder or last), RunState.FAILED))
            fields = {
                "state": state,
                "ended": time.time(),
                "reason": f"its pool's allocation {holder or last} ended ({states.get(str(holder or last))}) "
                f"before it {'finished' if where == 'running' else 'ran'}",
            }
            status.update(rundir.update_status(run_dir, **fields))
            store.finish(Item(str(status.get("pool_item")), str(run_dir), holder))


def allocations_of(statuses: Sequence[dict[str, Any]]) -> list[str]:
    """The allocations of the closed pools these items are in, which :func:`refresh_items` may
    need (for one query with the other jobs). A pool still open has a follower that asks about
    its allocations itself, at its own pace."""
    found: list[str] = []
    for pool_dir in sorted({str(s["pool"]) for s in statuses if s.get("pool")}):
        store = PoolStore(pool_dir)
        if store.exists() and store.closed():
            found += store.allocations()
    return found


def cancel_items(run_dirs: Sequence[Path], statuses: Sequence[dict[str, Any]], whole: bool) -> list[str]:
    """``tfrun cancel`` of pool items: one item ends alone; a whole sweep or study ends its pool."""
    done = []
    pools_seen: dict[str, Pool] = {}
    for run_dir, status in zip(run_dirs, statuses):
        if status.get("state") in FINAL:
            continue
        pool = pools_seen.get(status["pool"]) or pools_seen.setdefault(status["pool"], Pool.open(status["pool"]))
        if whole:
            RunPaths.of(run_dir).cancel_request.touch()
        else:
            pool.cancel(run_dir)
        done.append(f"{status.get('run_id', run_dir.name)}" + ("" if whole else " (its pool's other items go on)"))
    if whole:
        for pool in pools_seen.values():
            pool.stop()
            for run_dir, status in zip(run_dirs, statuses):
                if status.get("state") not in FINAL and isinstance(pool, SlurmPool):
                    rundir.update_status(
                        run_dir,
                        state=RunState.CANCELLED,
                        ended=time.time(),
                        reason="cancelled with tfrun cancel (its pool was ended)",
                    )
    return done
