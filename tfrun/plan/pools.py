"""A pool, as data: K Slurm allocations (or this machine) of S slots each, held for a sweep or
a tuning study, whose slots take work items (sweep points, trials) as they come. Pure:
:func:`spec_for` says what a pool of these plans is (or why these plans cannot share one),
:func:`request` what it will submit (``--dry-run`` shows it); :mod:`tfrun.targets.pool` acts.

A slot is one long-lived job step (locally: processes) with an item's task shape. In each of
its tasks an agent keeps an interpreter with the slot's environment and the heavy modules the
script imports already loaded; each item then runs in a fresh process started from it
(``warm``), in its own run dir, as a run of its own would.
"""

from __future__ import annotations

import ast
import functools
import math
import os
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from tfrun import deps, variables
from tfrun.config.run_config import Compute
from tfrun.errors import ConfigError
from tfrun.paths import SweepPaths
from tfrun.plan import sbatch, submitit_compat
from tfrun.rundir import Plan

AGENT_MODULE = "tfrun.targets.pool.agent"
# Modules worth importing ahead when the script imports them (seconds each); anything else
# (the user's own modules, whose import may have effects) is imported by the item itself.
HEAVY = ("tensorflow", "keras", "tf_keras", "numpy", "scipy", "sklearn", "pandas")
IDLE_TIMEOUT_S = 60.0  # default: an allocation with nothing to do and no item fed ends after this
AUTO_MIN_POINTS = 10  # compute.pack=auto: at least this many points per allocation
# Compute keys an item may set for itself: they do not change what its slot is.
PER_ITEM_KEYS = (
    "hang_timeout_s",
    "requeue_on_hang",
    "wait",
    "poll_s",
    "pack",
    "pack_size",
    "pack_slots",
    "array_parallelism",
    "stop_grace_s",
    "warm",
    "preload",
)


@dataclass(frozen=True)
class PoolSpec:
    """Everything a pool's allocations and slots need; ``pool.json`` in the pool dir."""

    target: str  # local or slurm
    allocations: int  # K (the local machine: 1)
    slots: int  # S per allocation
    nodes: int  # a slot's shape, which is every item's
    tasks_per_node: int
    backend: str
    python: list[str]  # the slots' interpreter: the deps environment's, or the container's command
    warm: str  # one of tfrun.config.validate.WARM_MODES
    preload: list[str]  # imported before an item comes
    env: dict[str, str]  # set before those imports: the Keras flavour, deps.env
    idle_timeout_s: float  # an allocation with nothing to do and no item fed ends after this
    compute: dict[str, Any]  # the items' composed compute: partition, GPUs, time limit, account, QOS
    setup: list[str] = field(default_factory=list)  # the deps' lines in the allocation's script

    @property
    def world(self) -> int:
        """Tasks per slot."""
        return self.nodes * self.tasks_per_node

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PoolSpec":
        """Inverse of :meth:`to_dict`."""
        return cls(**dict(data))


def pack_allocations(compute: Compute, points: int) -> int:
    """How many allocations a packed sweep of ``points`` holds: ceil(points / compute.pack_size),
    or with pack=auto at most array_parallelism, each for at least AUTO_MIN_POINTS points."""
    if compute.pack == "auto":
        per = max(math.ceil(points / compute.array_parallelism), min(AUTO_MIN_POINTS, points))
    else:
        per = max(1, int(compute.pack_size or 1))
    return math.ceil(points / per)


def is_packed(plans: Sequence[Plan]) -> bool:
    """Does this Slurm sweep ask for packing (its points then run in a pool)?"""
    return bool(plans) and plans[0].target == "slurm" and Compute.of(plans[0].compute).packed


def in_pool(plans: Sequence[Plan]) -> bool:
    """Do a sweep's points run as the items of a pool? A packed Slurm sweep's do, and a local
    sweep's whose points all fit one slot (one after another, each started warm); points of
    different shapes here are runs of their own."""
    if is_packed(plans):
        return True
    return bool(plans) and {p.target for p in plans} == {"local"} and all(conflict(plans[0], p) is None for p in plans)


def script_modules(script: str | os.PathLike[str]) -> list[str]:
    """The modules of HEAVY (and their submodules) the script imports anywhere, in order."""
    return list(_script_modules(str(script)))


@functools.lru_cache(maxsize=64)  # every point of a sweep has the same script: read once
def _script_modules(script: str) -> tuple[str, ...]:
    try:
        tree = ast.parse(Path(script).read_text(errors="replace"))
    except (OSError, SyntaxError, ValueError):
        return ()
    found: list[str] = []
    for node in ast.walk(tree):
        names = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module]
            if isinstance(node, ast.ImportFrom) and node.module and not node.level
            else []
        )
        found += [n for n in names if n.split(".")[0] in HEAVY and n not in found]
    return tuple(found)


def preload_for(plan: Plan) -> list[str]:
    """``compute.preload``: a list as given, or ``auto``: what the script imports of HEAVY, with
    TensorFlow and the run's Keras first when it uses either or its backend does."""
    setting = Compute.of(plan.compute).preload
    if setting != "auto":
        return [str(m) for m in setting or []]
    found = script_modules(plan.script)
    if plan.backend != "none" or any(m.split(".")[0] in ("tensorflow", "keras", "tf_keras") for m in found):
        keras = "tf_keras" if plan.tasks[0].env.get("TF_USE_LEGACY_KERAS") == "1" else "keras"
        found = ["tensorflow", keras, *(m for m in found if m not in ("tensorflow", keras))]
    return found


def warm_env(plan: Plan) -> dict[str, str]:
    """What a slot's interpreter must have before its imports: the task variables that are not
    tfrun's own per-run ones (the Keras flavour, ``deps.env``)."""
    return {k: v for k, v in plan.tasks[0].env.items() if not k.startswith(variables.PREFIX)}


def _shape(
    compute: Mapping[str, Any],
    backend: str,
    python: list[str],
    setup: list[str],
    env: dict[str, str],
    preload: list[str],
) -> dict[str, Any]:
    """What an item's slot is made of, by the key a user sets it with."""
    shape = {f"compute.{k}": v for k, v in compute.items() if k not in PER_ITEM_KEYS}
    if compute.get("target") == "local":
        shape.pop("compute.timeout_min", None)  # a local pool times each item itself
    shape.update({"backend.name": backend, "python": python, "deps": setup, "warm env": env, "preload": preload})
    return shape


def plan_shape(plan: Plan) -> dict[str, Any]:
    """The slot a plan needs."""
    return _shape(
        plan.compute, plan.backend, deps.python_words(plan), deps.setup_lines(plan), warm_env(plan), preload_for(plan)
    )


def spec_shape(spec: PoolSpec) -> dict[str, Any]:
    """The slots a pool has."""
    return _shape(spec.compute, spec.backend, spec.python, spec.setup, spec.env, spec.preload)


def _differs(have: dict[str, Any], want: dict[str, Any], who: str, than: str) -> str | None:
    for key in sorted(set(have) | set(want)):
        if have.get(key) != want.get(key):
            return f"{key} is {want.get(key)!r} for {who} but {have.get(key)!r} for {than}"
    return None


def conflict(first: Plan, other: Plan) -> str | None:
    """Why ``other`` cannot run in a slot made for ``first`` (None if it can)."""
    return _differs(plan_shape(first), plan_shape(other), other.run_id, first.run_id)


def misfit(spec: PoolSpec, plan: Plan) -> str | None:
    """Why ``plan`` cannot run in this pool's slots (None if it can)."""
    return _differs(spec_shape(spec), plan_shape(plan), plan.run_id, "the pool's slots")


def check_items(first: Plan, plans: Sequence[Plan], what: str) -> None:
    """Every item must fit the pool's slots; else a ConfigError naming the key that differs."""
    for plan in plans:
        why = conflict(first, plan)
        if why:
            raise ConfigError(
                f"{what}: the items of a pool share its slots, so they must ask for the same task "
                f"shape and environment, but {why}. Sweep that key in separate sweeps, or run "
                f"without a pool"
            )


def spec_for(first: Plan, allocations: int, slots: int, idle_timeout_s: float) -> PoolSpec:
    """The pool whose slots are shaped like ``first``'s tasks (checked: see :func:`check_settings`)."""
    c = Compute.of(first.compute)
    return PoolSpec(
        target=first.target,
        allocations=allocations,
        slots=slots,
        nodes=int(c.nodes),
        tasks_per_node=int(c.tasks_per_node),
        backend=first.backend,
        python=deps.python_words(first),
        warm=str(c.warm),
        preload=preload_for(first),
        env=warm_env(first),
        idle_timeout_s=float(idle_timeout_s),
        compute=dict(first.compute),
        setup=deps.setup_lines(first),
    )


def allocation_parameters(spec: PoolSpec) -> dict[str, Any]:
    """One item's Slurm parameters, widened to ``slots`` items side by side. The coordinator
    runs in the batch script itself (no srun); the time-limit warning goes to the job steps,
    i.e. to the slots' agents and their items."""
    compute = Compute.of(spec.compute)
    params = sbatch.parameters(compute, spec.backend)
    params["setup"] = [*params["setup"], *spec.setup]
    params["ntasks_per_node"] = spec.tasks_per_node * spec.slots
    if params.get("gpus_per_node"):
        params["gpus_per_node"] = params["gpus_per_node"] * spec.slots
    if compute.mem_gb:
        params["mem"] = submitit_compat.mem(compute.mem_gb * spec.slots)
    params["use_srun"] = False
    params.pop("srun_args", None)
    return params


def agent_command(spec: PoolSpec, pool_dir: str | os.PathLike[str]) -> list[str]:
    """What every task of a slot runs: the agent."""
    return [*spec.python, "-u", "-m", AGENT_MODULE, str(pool_dir)]


def slot_command(spec: PoolSpec, pool_dir: str | os.PathLike[str]) -> list[str]:
    """The job step that is one slot, for as long as the allocation lives: an item's task layout,
    its own share of the GPUs and memory, its stdin given to every task (the coordinator's
    orders reach each agent), a failing task not ending the others."""
    c = Compute.of(spec.compute)
    step = [
        "srun",
        "--exact",
        f"--nodes={spec.nodes}",
        f"--ntasks={spec.world}",
        f"--ntasks-per-node={spec.tasks_per_node}",
        "--input=all",
        "--kill-on-bad-exit=0",
        *c.srun_args,
    ]
    if c.cpus_per_task:
        # Said again, for every release: 24.11's srun takes the allocation's --cpus-per-task
        # (SLURM_CPUS_PER_TASK), 22.05's gives an --exact step one CPU per task.
        step.append(f"--cpus-per-task={c.cpus_per_task}")
    if c.gpus_per_task:
        step.append(f"--gpus-per-task={c.gpus_per_task}")
    elif c.gpus_per_node:
        step.append(f"--gpus-per-node={c.gpus_per_node}")
    if c.mem_gb:
        step.append(f"--mem={submitit_compat.mem(c.mem_gb)}")
    return [*step, *agent_command(spec, pool_dir)]


def describe(spec: PoolSpec, pool_dir: str | os.PathLike[str]) -> list[str]:
    """What ``--dry-run`` says of a pool, as lines."""
    where = (
        f"{spec.allocations} Slurm allocation(s) of {spec.slots} slot(s)"
        if spec.target == "slurm"
        else f"this machine, {spec.slots} slot(s)"
    )
    start = {
        "fork": "a fresh process forked from the slot's warm interpreter",
        "spawn": "a fresh interpreter started ahead, its imports done",
        "cold": "a new interpreter, started when the item comes",
    }[spec.warm]
    imports = ", ".join(spec.preload) or "tfrun's bootstrap only"
    env = " ".join(f"{k}={v}" for k, v in sorted(spec.env.items()))
    lines = [
        f"pool: {where}; a slot is {spec.nodes} node(s) x {spec.tasks_per_node} task(s), backend {spec.backend}",
        f"  pool dir:   {pool_dir}",
        f"  each item:  {start} (compute.warm={spec.warm}), its own run dir, status and logs",
        f"  warm:       {imports} imported ahead" + (f", with {env}" if env else ""),
        f"  ends:       once its queue is closed and drained; with nothing to run for {spec.idle_timeout_s:g} s",
    ]
    if spec.target == "slurm":
        lines.append(f"  each slot:  {shlex.join(slot_command(spec, pool_dir))}")
    else:
        lines.append(f"  each task:  {shlex.join(agent_command(spec, pool_dir))}")
    return lines


def request(spec: PoolSpec, pool_dir: str | os.PathLike[str], runs: Sequence[str] = ()) -> dict[str, Any]:
    """For --dry-run: the pool, its allocations' sbatch script (Slurm), the items it would run."""
    info: dict[str, Any] = {
        "pool": spec.to_dict(),
        "pool_dir": str(pool_dir),
        "runs": list(runs),
        "describe": describe(spec, pool_dir),
    }
    if spec.target == "slurm":
        folder = str(SweepPaths.of(pool_dir).submitit)
        info["sbatch"] = sbatch.sbatch_text(
            allocation_parameters(spec), spec.python, folder, array_size=spec.allocations
        )
        info["slot_step"] = shlex.join(slot_command(spec, pool_dir))
    return info


def sweep_pool(plans: Sequence[Plan], sweep_dir: str | os.PathLike[str]) -> PoolSpec:
    """The pool a sweep runs in: on Slurm the packed allocations (``compute.pack_size``,
    ``pack_slots``), locally one slot (points run one after another, as they always did)."""
    first = plans[0]
    if first.target == "slurm":
        compute = Compute.of(first.compute)
        check_items(first, plans, f"compute.pack_size={compute.pack_size}")
        allocations = pack_allocations(compute, len(plans))
        return spec_for(first, allocations, int(compute.pack_slots or 1), IDLE_TIMEOUT_S)
    check_items(first, plans, "a local sweep")
    return spec_for(first, 1, 1, IDLE_TIMEOUT_S)


def pool_dir_of(sweep_dir: str | os.PathLike[str]) -> str:
    """A sweep's (or study's) pool dir."""
    return str(SweepPaths.of(sweep_dir).pool)


def point_requests(plans: Sequence[Plan]) -> list[Plan]:
    """A packed sweep's plans with each point's request saying where it runs: a slot of the pool."""
    from dataclasses import replace

    if not is_packed(plans):
        return list(plans)
    pool_dir = pool_dir_of(os.path.dirname(plans[0].run_dir))
    return [replace(p, request={"pool": pool_dir, "packed": True}) for p in plans]
