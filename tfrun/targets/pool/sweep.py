"""A sweep run in a pool: every point is fed at once and the queue closed, so each allocation
ends as soon as the last point is done. On Slurm that is a packed sweep (``compute.pack_size``
points per allocation, ``compute.pack_slots`` side by side); locally, one slot that runs the
points one after another, each from a warm interpreter, its output shown as it comes."""

from __future__ import annotations

import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

from tfrun import deps, rundir
from tfrun.paths import RunPaths
from tfrun.plan import Plan, pools
from tfrun.states import FINAL, RunState
from tfrun.targets import progress, slurm
from tfrun.targets.pool import LocalPool, Pool, SlurmPool, refresh_items
from tfrun.targets.report import print_outcome

FOLLOW_LOCAL_S = 0.1


def run_sweep(plans: Sequence[Plan], sweep_dir: str | os.PathLike[str]) -> list[str]:
    """Run a sweep's points in a pool; unless ``compute.wait=false``, follow them to their end."""
    spec = pools.sweep_pool(plans, sweep_dir)
    pool_dir = pools.pool_dir_of(sweep_dir)
    first = plans[0]
    with progress.busy(f"submitting {len(plans)} run(s) to a pool") if spec.target == "slurm" else nullcontext():
        for plan in plans:
            os.makedirs(RunPaths.of(plan.run_dir).rank_log(0).parent, exist_ok=True)
            plan.save()
        extra_env = deps.prepare(first)  # a broken environment fails here, before anything starts
        for plan in plans[1:]:
            deps.prepare(plan)
        pool = Pool.create(spec, pool_dir, extra_env)
        pool.store.close()  # every point is fed now: allocations end once the queue is drained
        pool.feed(plans)
    if isinstance(pool, SlurmPool):
        jobs = pool.store.allocations()
        print(
            f"tfrun: submitted {len(plans)} run(s) to a pool of {spec.allocations} allocation(s) x {spec.slots} "
            f"slot(s) (job(s) {', '.join(sorted({j.split('_')[0] for j in jobs}))}); sweep dir {sweep_dir}",
            file=sys.stderr,
            flush=True,
        )
        if not first.compute["wait"]:
            slurm._detached(sorted({j.split("_")[0] for j in jobs}), str(sweep_dir))
            return [RunState.PENDING] * len(plans)
        try:
            return follow_slurm(pool, plans, float(first.compute["poll_s"]))
        except KeyboardInterrupt:
            slurm._detached(sorted({j.split("_")[0] for j in jobs}), str(sweep_dir))
            return [RunState.DETACHED] * len(plans)
    assert isinstance(pool, LocalPool)
    try:
        return follow_local(pool, plans)
    except KeyboardInterrupt:
        print("\ntfrun: stopping: the running point backs up and stops; the others do not start", file=sys.stderr)
        pool.interrupt()
        return [rundir.read_status(p.run_dir).get("state", RunState.CANCELLED) for p in plans]


def follow_slurm(pool: SlurmPool, plans: Sequence[Plan], poll_s: float) -> list[str]:
    """Until every point is final: the pool's allocations kept alive, one query per poll."""
    shown, view = "", progress.sweep_view()
    dirs = [Path(p.run_dir) for p in plans]
    try:
        while True:
            pool.ensure()
            statuses = [rundir.read_status(d) for d in dirs]
            unfinished = [(d, s) for d, s in zip(dirs, statuses) if s.get("state") not in FINAL]
            if unfinished:
                jobs = pool.store.allocations()
                refresh_items(unfinished, slurm.query(jobs) if jobs else {})
            states = {str(d): s.get("state", RunState.PENDING) for d, s in zip(dirs, statuses)}
            shown = slurm.show_sweep(view, plans, states, shown)
            if all(s in FINAL for s in states.values()):
                return [states[p.run_dir] for p in plans]
            time.sleep(poll_s)
    finally:
        if view is not None:
            view.close()
        elif sys.stderr.isatty():
            print(file=sys.stderr)


def follow_local(pool: LocalPool, plans: Sequence[Plan]) -> list[str]:
    """The points run one after another; each one's output is shown as it comes, and its
    outcome when it ends, as for a run of its own."""
    states: dict[str, str] = {}
    tails: dict[str, list[_Tail]] = {}
    for num, plan in enumerate(plans):
        print(f"tfrun: sweep point {num + 1}/{len(plans)}: {plan.run_id}", file=sys.stderr, flush=True)
        while plan.run_dir not in states:
            status = rundir.read_status(plan.run_dir)
            if status.get("state") != RunState.PENDING and plan.run_dir not in tails:
                tails[plan.run_dir] = [
                    _Tail(RunPaths.of(plan.run_dir).rank_log(t.rank), len(plan.tasks) > 1, t.rank) for t in plan.tasks
                ]
            for tail in tails.get(plan.run_dir, []):
                tail.pump()
            if status.get("state") in FINAL:
                for tail in tails.get(plan.run_dir, []):
                    tail.pump(last=True)
                states[plan.run_dir] = status["state"]
                print_outcome(plan, status["state"])
                break
            if pool.thread is not None and not pool.thread.is_alive() and status.get("state") == RunState.PENDING:
                pool.ensure()  # (it ended idle, or its slots could not start: tried again, then given up)
                if pool.thread is None or not pool.thread.is_alive():
                    states[plan.run_dir] = _not_run(plan)
                    break
            time.sleep(FOLLOW_LOCAL_S)
    pool.join()
    return [states[p.run_dir] for p in plans]


def _not_run(plan: Plan) -> str:
    rundir.update_status(
        plan.run_dir,
        state=RunState.FAILED,
        ended=time.time(),
        reason="its pool's slot could not be started (see the pool's logs)",
    )
    print_outcome(plan, RunState.FAILED)
    return RunState.FAILED


class _Tail:
    """Prints what a rank's log gained since the last call (prefixed with its rank when there are several)."""

    def __init__(self, path: Path, prefixed: bool, rank: int) -> None:
        self.path, self.offset = path, 0
        self.prefix = f"[rank{rank}] ".encode() if prefixed else b""
        self.partial = b""

    def pump(self, last: bool = False) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        if last and self.partial:
            lines, self.partial = [*lines, self.partial], b""
        for line in lines:
            sys.stdout.buffer.write(self.prefix + line + b"\n")
        sys.stdout.buffer.flush()
