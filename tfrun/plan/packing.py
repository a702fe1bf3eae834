"""Which points of a packed sweep share a Slurm allocation, and what that allocation and
each point's job step are (``compute.pack_size``, ``compute.pack=auto``). Pure; the
runner inside the allocation is :mod:`tfrun.targets.pack`."""
from __future__ import annotations

import math
import os
import shlex
from dataclasses import replace
from typing import Any, Sequence

from tfrun import deps
from tfrun.plan import sbatch
from tfrun.rundir import Plan

AUTO_MIN_POINTS = 10  # pack=auto: at least this many points per job


def pack_size(compute: dict[str, Any], points: int) -> int:
    """K for a sweep of ``points``: compute.pack_size, or with pack=auto at most
    array_parallelism jobs and at least AUTO_MIN_POINTS points per job."""
    if compute.get("pack") == "auto":
        return max(math.ceil(points / compute["array_parallelism"]), min(AUTO_MIN_POINTS, points))
    return max(1, int(compute.get("pack_size") or 1))


def is_packed(plans: Sequence[Plan]) -> bool:
    """Does this Slurm sweep ask for packing?"""
    return bool(plans) and pack_size(plans[0].compute, len(plans)) > 1


def packs(plans: Sequence[Plan]) -> list[list[Plan]]:
    """Consecutive groups of K points, in sweep order."""
    k = pack_size(plans[0].compute, len(plans))
    return [list(plans[i:i + k]) for i in range(0, len(plans), k)]


def allocation_parameters(plan: Plan) -> dict[str, Any]:
    """One point's parameters, widened to ``pack_slots`` points side by side. The runner
    is the batch script itself (no srun); the time-limit warning goes to the job steps,
    i.e. to the running points, whose rank 0 requeues the job."""
    params = sbatch.plan_parameters(plan)
    slots = int(plan.compute.get("pack_slots") or 1)
    params["ntasks_per_node"] = plan.compute["tasks_per_node"] * slots
    params["use_srun"] = False
    params.pop("srun_args", None)
    return params


def request(plans: Sequence[Plan], sweep_dir: str) -> list[dict[str, Any]]:
    """For --dry-run: which points go in which job, and the array's sbatch script."""
    groups = packs(plans)
    folder = os.path.join(sweep_dir, sbatch.SUBMITIT_DIR)
    text = sbatch.sbatch_text(allocation_parameters(plans[0]), deps.python_words(plans[0]), folder,
                             array_size=len(groups))
    return [{"runs": [p.run_id for p in plans], "sbatch": text,
             "jobs": [{"array_index": i, "runs": [p.run_id for p in g]} for i, g in enumerate(groups)]}]


def point_requests(plans: Sequence[Plan]) -> list[Plan]:
    """A packed sweep's plans with each point's request being its job step (not a job of its own)."""
    if not is_packed(plans):
        return list(plans)
    return [replace(p, request={"srun": shlex.join(step_command(p)), "packed": True}) for p in plans]


def step_command(plan: Plan) -> list[str]:
    """The job step that runs one point: srun with the point's own task layout."""
    c = plan.compute
    world = c["nodes"] * c["tasks_per_node"]
    srun = ["srun", "--exact", "--unbuffered", f"--nodes={c['nodes']}", f"--ntasks={world}",
            f"--ntasks-per-node={c['tasks_per_node']}", "--kill-on-bad-exit=1", *c.get("srun_args", [])]
    if c.get("cpus_per_task"):
        # Said again, for every release: 24.11's srun takes the allocation's --cpus-per-task
        # (SLURM_CPUS_PER_TASK), 22.05's gives an --exact step one CPU per task.
        srun.append(f"--cpus-per-task={c['cpus_per_task']}")
    if c.get("gpus_per_task"):
        srun.append(f"--gpus-per-task={c['gpus_per_task']}")
    return [*srun, *deps.python_words(plan), "-u", "-m", "tfrun.bootstrap", plan.run_dir]


def sweep_arrays(plans: Sequence[Plan], sweep_dir: str) -> list[dict[str, Any]]:
    """The job arrays a Slurm sweep submits: its packed allocations, or one array per group
    of points with equal Slurm parameters."""
    return request(plans, sweep_dir) if is_packed(plans) else sbatch.array_requests(plans, sweep_dir)
