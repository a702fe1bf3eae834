"""A pool's directory: its spec, the queue of items and who holds each, the markers that close or
stop it, and each allocation's account of itself. The follower (a sweep or a study, on the
login node), ``tfrun tune resume`` and every allocation's coordinator share it through the
filesystem every node sees; each change is one rename or one atomic write.

An item moves ``queue/ID.json`` -> ``running/ID@ALLOCATION.json`` (the claim: a rename, so two
coordinators never both get it; the holder is in the name) -> ``done/ID.json``. An item whose
allocation stopped before it finished goes back to ``queue/`` under its own id, so order is kept.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from tfrun import rundir
from tfrun.plan.pools import PoolSpec

SPEC_FILE = "pool.json"
ALLOCATIONS_FILE = "allocations.json"  # every allocation submitted for the pool, oldest first
CLOSED_FILE = "closed"  # no more items will be fed: an allocation ends once the queue is drained
STOP_FILE = "stop"  # end now (a cancelled sweep or study)
FOLLOWER_FILE = "follower.json"  # the process that starts allocations as the queue needs them
# A follower stamps the pool at each of its polls (every few seconds); one not seen for this
# long is gone, and nothing will start another allocation for the pool's waiting items.
FOLLOWER_GONE_S = 120.0


@dataclass(frozen=True)
class Item:
    """One work item: a planned run, by its id in the pool."""

    id: str
    run_dir: str
    holder: str | None = None  # the allocation that claimed it


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return rundir.read_json(path)
    except ValueError:  # a file being replaced on a filesystem without atomic renames
        return None


class PoolStore:
    """The files of one pool."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.queue, self.running, self.done = self.path / "queue", self.path / "running", self.path / "done"
        self.states, self.logs = self.path / "allocations", self.path / "logs"
        self._started: float | None = None  # this process's start time, once it follows the pool

    # -- the pool as a whole -----------------------------------------------------------
    def create(self, spec: PoolSpec) -> None:
        """Write the spec and the empty queue (once: an existing pool keeps its own)."""
        for folder in (self.queue, self.running, self.done, self.states, self.logs):
            folder.mkdir(parents=True, exist_ok=True)
        if not (self.path / SPEC_FILE).exists():
            rundir.write_json(self.path / SPEC_FILE, spec.to_dict())

    def exists(self) -> bool:
        """Is there a pool here?"""
        return (self.path / SPEC_FILE).is_file()

    def spec(self) -> PoolSpec:
        """The pool's spec."""
        return PoolSpec.from_dict(rundir.read_json(self.path / SPEC_FILE))

    def close(self) -> None:
        """No more items: every allocation ends once the queue is drained."""
        (self.path / CLOSED_FILE).touch()

    def closed(self) -> bool:
        """Will more items come?"""
        return (self.path / CLOSED_FILE).exists()

    def stop(self) -> None:
        """End now: allocations stop their items and end."""
        (self.path / STOP_FILE).touch()
        self.close()

    def stopped(self) -> bool:
        """Was the pool told to end now?"""
        return (self.path / STOP_FILE).exists()

    def follow(self) -> None:
        """Said by the follower (a sweep's or a study's) at each poll: allocations are started
        for this pool's waiting items as they need them."""
        me = os.getpid()
        if self._started is None:
            self._started = rundir.process_started(me)
        rundir.write_json(
            self.path / FOLLOWER_FILE,
            {"pid": me, "started": self._started, "host": rundir.hostname(), "seen": time.time()},
        )

    def followed(self) -> bool:
        """Does a follower still start allocations for this pool? Not once it has not been seen
        for FOLLOWER_GONE_S, nor, on this host, once its process is gone."""
        record = _read(self.path / FOLLOWER_FILE)
        if not record or time.time() - float(record.get("seen", 0.0)) > FOLLOWER_GONE_S:
            return False
        if record.get("host") != rundir.hostname():
            return True  # (another login node's process: its stamps say it lives)
        started = rundir.process_started(int(record["pid"]))
        return started is not None and record.get("started") is not None and abs(started - record["started"]) < 1.0

    def allocations(self) -> list[str]:
        """The job ids of every allocation submitted for the pool (or ``local``)."""
        return list(rundir.read_json(self.path / ALLOCATIONS_FILE, []))

    def add_allocations(self, job_ids: Iterable[str]) -> None:
        """Record allocations just submitted."""
        path = self.path / ALLOCATIONS_FILE
        with rundir.locked(path):
            rundir.write_json(path, [*rundir.read_json(path, []), *job_ids])

    def write_state(self, allocation: str, **fields: Any) -> None:
        """An allocation's account of itself (state, slots, why it ended), merged."""
        path = self.states / f"{allocation}.json"
        record = _read(path) or {"allocation": allocation}
        record.update(fields, updated=time.time())
        rundir.write_json(path, record)

    def state(self, allocation: str) -> dict[str, Any]:
        """What an allocation last said of itself ({} if nothing yet)."""
        return _read(self.states / f"{allocation}.json") or {}

    # -- items -------------------------------------------------------------------------
    def _ids(self) -> Iterator[str]:
        for folder in (self.queue, self.running, self.done):
            for path in folder.glob("*.json"):
                yield path.name.split("@")[0].removesuffix(".json")

    def feed(self, run_dirs: Iterable[str]) -> list[Item]:
        """Queue items (one writer: the follower). A run dir already fed keeps its item."""
        run_dirs = list(run_dirs)
        known = {rundir.read_status(d).get("pool_item") for d in run_dirs} - {None}
        present = set(self._ids()) if known else set()
        following = max((int(i) for i in self._ids()), default=-1) + 1
        items = []
        for run_dir in run_dirs:
            mine = rundir.read_status(run_dir).get("pool_item")
            if mine in present:
                items.append(Item(mine, run_dir))
                continue
            item = Item(f"{following:07d}", run_dir)
            following += 1
            # The item's status names it first: a follower killed in between feeds it again.
            rundir.update_status(run_dir, pool=str(self.path), pool_item=item.id)
            rundir.write_json(self.queue / f"{item.id}.json", {"id": item.id, "run_dir": run_dir, "fed": time.time()})
            items.append(item)
        return items

    def queued(self) -> list[str]:
        """Ids waiting, oldest first."""
        return sorted(p.name.removesuffix(".json") for p in self.queue.glob("*.json"))

    def claim(self, allocation: str) -> Item | None:
        """The oldest waiting item, now held by ``allocation``; None if none waits."""
        for item_id in self.queued():
            target = self.running / f"{item_id}@{allocation}.json"
            try:
                os.rename(self.queue / f"{item_id}.json", target)
            except FileNotFoundError:  # another allocation claimed it first
                continue
            data = _read(target) or {}
            return Item(item_id, str(data.get("run_dir")), allocation)
        return None

    def held(self, allocation: str | None = None) -> list[Item]:
        """Items claimed and not finished (by one allocation, or by any)."""
        found = []
        for path in sorted(self.running.glob("*@*.json")):
            item_id, holder = path.name.removesuffix(".json").split("@", 1)
            if allocation is None or holder == allocation:
                data = _read(path) or {}
                found.append(Item(item_id, str(data.get("run_dir")), holder))
        return found

    def release(self, item: Item) -> bool:
        """Back to the queue, under its own id (its allocation stopped before it finished)."""
        try:
            os.rename(self.running / f"{item.id}@{item.holder}.json", self.queue / f"{item.id}.json")
        except FileNotFoundError:
            return False
        return True

    def finish(self, item: Item) -> None:
        """The item is settled: never run again."""
        source = self.running / f"{item.id}@{item.holder}.json" if item.holder else self.queue / f"{item.id}.json"
        try:
            os.rename(source, self.done / f"{item.id}.json")
        except FileNotFoundError:
            pass

    def take_back(self, item_id: str) -> bool:
        """Remove a waiting item from the queue (it was cancelled before it started)."""
        try:
            os.rename(self.queue / f"{item_id}.json", self.done / f"{item_id}.json")
        except FileNotFoundError:
            return False
        return True

    def where(self, item_id: str) -> tuple[str, str | None]:
        """("queue" | "running" | "done" | "unknown", its holder)."""
        if (self.queue / f"{item_id}.json").exists():
            return "queue", None
        held = list(self.running.glob(f"{item_id}@*.json"))
        if held:
            return "running", held[0].name.removesuffix(".json").split("@", 1)[1]
        return ("done", None) if (self.done / f"{item_id}.json").exists() else ("unknown", None)

    def slot_log(self, allocation: str, slot: int) -> Path:
        """Where a slot's agents write about themselves (their items write to their run dirs)."""
        return self.logs / f"{allocation}-slot{slot}.log"
