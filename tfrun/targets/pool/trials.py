"""A tuning study's trials in a pool (``hydra.sweeper.pool``): the one place where the study
hands a trial to a pool rather than to a job of its own. By default the pool is one allocation
of ``max_parallel`` slots shaped by the composed ``compute`` (locally: ``max_parallel`` slots
on this machine); ``hydra.sweeper.pool=false`` gives a job (or a local process) per trial."""

from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from tfrun import deps
from tfrun.config.validate import is_number, is_whole
from tfrun.errors import ConfigError
from tfrun.paths import RunPaths
from tfrun.plan import Plan, pools
from tfrun.plan.pools import PoolSpec
from tfrun.targets.pool import LocalPool, Pool, SlurmPool, pool_rejected

KEYS = ("allocations", "slots", "idle_timeout_s")
DEFAULTS: dict[str, Any] = {"allocations": 1, "slots": None, "idle_timeout_s": pools.IDLE_TIMEOUT_S}


@dataclass(frozen=True)
class PoolSettings:
    """``hydra.sweeper.pool`` checked against the study and its trials' compute."""

    allocations: int
    slots: int
    idle_timeout_s: float


def settings(raw: Any, max_parallel: int, compute: Mapping[str, Any]) -> PoolSettings | None:
    """``hydra.sweeper.pool`` (false: a job per trial; true or a mapping: a pool), checked."""
    _no_packing(compute)
    if raw in (False, None):
        return None
    given = {} if raw is True else dict(raw) if isinstance(raw, Mapping) else None
    if given is None:
        raise ConfigError.invalid("hydra.sweeper.pool", raw, f"false, true, or settings ({', '.join(KEYS)})")
    unknown = sorted(set(given) - set(KEYS))
    if unknown:
        raise ConfigError.invalid(
            f"hydra.sweeper.pool.{unknown[0]}", given[unknown[0]], f"a key of hydra.sweeper.pool: {', '.join(KEYS)}"
        )
    found = {**DEFAULTS, **{k: v for k, v in given.items() if v is not None}}
    allocations, slots, idle = found["allocations"], found["slots"], found["idle_timeout_s"]
    if not is_whole(allocations, 1):
        raise ConfigError.invalid("hydra.sweeper.pool.allocations", allocations, "a whole number, 1 or more")
    if compute["target"] == "local" and allocations != 1:
        raise ConfigError.invalid(
            "hydra.sweeper.pool.allocations", allocations, "1 with compute=local (the pool is this machine)"
        )
    if not (is_number(idle) and idle > 0):
        raise ConfigError.invalid("hydra.sweeper.pool.idle_timeout_s", idle, "a number of seconds > 0")
    if slots is None:
        if max_parallel % allocations:
            raise ConfigError(
                f"hydra.sweeper.pool.allocations={allocations} does not divide "
                f"hydra.sweeper.max_parallel={max_parallel}: every allocation holds the same number of "
                f"slots, and the pool has max_parallel in all. Choose allocations that divide it"
            )
        slots = max_parallel // allocations
    if not is_whole(slots, 1) or slots * allocations != max_parallel:
        raise ConfigError(
            f"hydra.sweeper.pool.slots={slots!r} with allocations={allocations} makes "
            f"{slots * allocations if is_whole(slots, 1) else '?'} slot(s), but "
            f"hydra.sweeper.max_parallel={max_parallel} trials run at once: the pool must have exactly "
            f"max_parallel slots (slots x allocations). Leave slots out to have it computed"
        )
    return PoolSettings(int(allocations), int(slots), float(idle))


def _no_packing(compute: Mapping[str, Any]) -> None:
    """A study's trials run in its pool; packing is for grid sweeps (``tfrun -m``)."""
    for key, off in (("pack", "off"), ("pack_size", 1), ("pack_slots", 1)):
        if key in compute and compute[key] != off:
            raise ConfigError(
                f"compute.{key}={compute[key]!r} packs the points of a grid sweep; a tuning study "
                f"(hydra/sweeper=tfrun) runs its trials in a pool of hydra.sweeper.max_parallel slots "
                f"(hydra.sweeper.pool.*), or with hydra.sweeper.pool=false a job per trial. Remove "
                f"compute.{key}"
            )


def spec(found: PoolSettings, first: Plan) -> PoolSpec:
    """The study's pool, shaped by its first trial's plan."""
    return pools.spec_for(first, found.allocations, found.slots, found.idle_timeout_s)


def check_allocation(spec: PoolSpec, pool_dir: str) -> None:
    """Ask Slurm whether the pool's allocation could ever run (``sbatch --test-only``: nothing is
    submitted); a ConfigError with Slurm's words if not."""
    text = pools.request(spec, pool_dir)["sbatch"]
    try:
        out = subprocess.run(["sbatch", "--test-only"], input=text, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):  # no Slurm here: the submission itself will say
        return
    if out.returncode:
        raise pool_rejected(spec, RuntimeError(out.stderr.strip() or out.stdout.strip()))


class TrialPool:
    """The study's side of its pool: trials are fed to it, stopped and cancelled through it."""

    def __init__(self, found: PoolSettings, sweep_dir: Path) -> None:
        self.found, self.pool_dir = found, pools.pool_dir_of(sweep_dir)
        self.pool: Pool | None = Pool.open(self.pool_dir) if Path(self.pool_dir, "pool.json").exists() else None

    @property
    def stopped(self) -> bool:
        """Was the pool ended (the study cancelled)?"""
        return self.pool is not None and self.pool.stopped

    def launch(self, plan: Plan) -> None:
        """Hand a trial (planned and written) to the pool; again for one fed before: nothing."""
        if self.pool is None:
            first = spec(self.found, plan)
            self.pool = Pool.create(first, self.pool_dir, deps.prepare(plan) if plan.target == "local" else None)
        else:
            why = pools.misfit(self.pool.spec, plan)
            if why:
                raise ConfigError(
                    f"hydra.sweeper.pool: this trial cannot run in the study's pool: {why}. The "
                    f"trials of a pool share its slots; search that key with hydra.sweeper.pool=false"
                )
        os_makedirs(plan)
        if plan.target == "slurm":
            deps.prepare(plan)
        self.pool.feed([plan])

    def poll(self) -> None:
        """Keep the pool's allocations alive while trials wait."""
        if self.pool is not None:
            self.pool.ensure()

    def stop_request(self, run_dir: Path) -> None:
        """A policy's stop: the trial backs up and stops; its slot is free once it has."""
        if self.pool is not None:
            self.pool.signal(run_dir, signal.SIGUSR2)

    def close(self) -> None:
        """The study has every trial it will have: allocations end once they are done."""
        if self.pool is not None:
            self.pool.close()
            if isinstance(self.pool, LocalPool):
                self.pool.join()

    def stop(self) -> None:
        """The study ends early (an error): the pool's allocations end, its waiting trials never start."""
        if self.pool is not None:
            self.pool.stop()

    def interrupted(self) -> None:
        """Ctrl-C: Slurm trials go on (``tfrun tune resume``); local ones end with the follower."""
        if isinstance(self.pool, LocalPool):
            self.pool.stop()

    def description(self) -> str:
        """Where a trial was sent, for the study's progress lines."""
        if isinstance(self.pool, SlurmPool):
            return f"pool {', '.join(self.pool.store.allocations()) or '(not submitted)'}"
        return "local pool"


def os_makedirs(plan: Plan) -> None:
    """The trial's logs dir and plan.json (as a job of its own would have them)."""
    import os

    os.makedirs(RunPaths.of(plan.run_dir).rank_log(0).parent, exist_ok=True)
    plan.save()


def describe(found: PoolSettings | None, first: Plan, sweep_dir: str) -> list[str]:
    """``--dry-run -m hydra/sweeper=tfrun``: the study's pool."""
    if found is None:
        return [
            "pool: none (hydra.sweeper.pool=false): each trial is a job of its own"
            + (" (a Slurm job)" if first.target == "slurm" else " (a local process)")
        ]
    pool_dir = pools.pool_dir_of(sweep_dir)
    request = pools.request(spec(found, first), pool_dir)
    lines = list(request["describe"])
    if "sbatch" in request:
        lines.append("  sbatch script of each allocation (its coordinator starts the slots' steps):")
        lines += ["    " + line for line in request["sbatch"].splitlines()]
    return lines


def as_item(found: PoolSettings | None, plan: Plan, sweep_dir: str) -> Plan:
    """A trial's plan as the study runs it: in the pool (no job of its own), or as planned."""
    from dataclasses import replace

    return plan if found is None else replace(plan, request={"pool": pools.pool_dir_of(sweep_dir)})
