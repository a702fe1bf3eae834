"""Plans as text a person reads (``--dry-run``) or JSON a program reads (``--dry-run=json``)."""

from __future__ import annotations

import json
import os
import shlex
from typing import Any

from tfrun import deps
from tfrun.plan import Plan


def _env_lines(env: dict[str, str], indent: str) -> list[str]:
    return [f"{indent}{k}={shlex.quote(v)}" for k, v in sorted(env.items())]


def plan_text(plan: Plan) -> str:
    """A human-readable account of what the plan will do."""
    c = plan.compute
    lines = [
        f"run {plan.run_id}: {len(plan.tasks)} task(s) on {c['target']} "
        f"({c['nodes']} node(s) x {c['tasks_per_node']} task(s)), backend {plan.backend}",
        f"  run dir:    {plan.run_dir}",
        f"  script:     {plan.script}",
        f"  cwd:        {plan.source_dir}",
        f"  python:     {plan.python}",
    ]
    lines += ["  " + line for line in deps.describe(plan.deps)]
    export = plan.config.get("export") or {}
    if export.get("format", "none") != "none":
        lines.append(
            f"  export:     rank 0 converts the saved model to {export['format']} after the script "
            f"succeeds: " + " ".join(f"{k}={v}" for k, v in sorted(export.items()) if k != "format")
        )
    for task in plan.tasks:
        lines.append(
            f"  task rank {task.rank}: {task.role} {task.role_index}, node {task.node_index}, "
            f"local rank {task.local_rank}{'' if task.runs_script else ' (serves; does not run the script)'}"
        )
        if plan.request.get("pool"):
            lines.append(
                f"    command: a process started from a warm slot of the pool {plan.request['pool']}, "
                f"running the bootstrap as: {shlex.join(plan.command)}"
            )
        else:
            lines.append(f"    command: {plan.request.get('srun') or shlex.join(plan.command)}")
        lines.append(f"    argv:    {shlex.join(task.argv)}")
        if task.gpus is not None:
            lines.append(f"    CUDA_VISIBLE_DEVICES={task.gpus}")
        if task.tf_config is not None:
            lines.append(f"    TF_CONFIG={json.dumps(task.tf_config, sort_keys=True)}")
        lines.append("    env:")
        lines += _env_lines(task.env, "      ")
    lines += [f"  warning: {w}" for w in plan.warnings]
    if "sbatch" in plan.request:
        lines.append("  sbatch script:")
        lines += ["    " + line for line in plan.request["sbatch"].splitlines()]
    return "\n".join(lines)


def sweep_arrays(plans: list[Plan]) -> list[dict[str, Any]]:
    """The job arrays a Slurm sweep submits (none for local sweeps and sweeps in a pool)."""
    from tfrun.plan import pools, sbatch

    if not plans or any(p.target != "slurm" for p in plans) or pools.is_packed(plans):
        return []
    return sbatch.array_requests(plans, os.path.dirname(plans[0].run_dir))


def sweep_pool(plans: list[Plan]) -> dict[str, Any] | None:
    """The pool a sweep runs in (packed on Slurm; locally, its points share one shape), or None."""
    from tfrun.plan import pools

    if not pools.in_pool(plans):
        return None
    sweep_dir = os.path.dirname(plans[0].run_dir)
    spec = pools.sweep_pool(plans, sweep_dir)
    return pools.request(spec, pools.pool_dir_of(sweep_dir), [p.run_id for p in plans])


def pool_text(pool: dict[str, Any]) -> str:
    """A pool's description (and its allocations' sbatch script) as indented lines."""
    lines = ["  " + line for line in pool["describe"]]
    if "sbatch" in pool:
        lines.append("  sbatch script of each allocation (its coordinator starts the slots' steps):")
        lines += ["    " + line for line in pool["sbatch"].splitlines()]
    return "\n".join(lines)


def plans_text(plans: list[Plan], multirun: bool = False) -> str:
    """Text for a single run or every point of a sweep (with the arrays or the pool it becomes)."""
    if not multirun:
        return plan_text(plans[0])
    parts = [f"sweep of {len(plans)} run(s) in {os.path.dirname(plans[0].run_dir)}"]
    pool = sweep_pool(plans)
    if pool is not None:
        parts.append(pool_text(pool))
    for array in sweep_arrays(plans):
        body = "\n".join("    " + line for line in array["sbatch"].splitlines())
        parts.append(
            f"  job array of {len(array['runs'])} run(s): {', '.join(array['runs'])}\n  sbatch script:\n{body}"
        )
    return "\n\n".join([*parts, *(plan_text(p) for p in plans)])


def plans_json(plans: list[Plan], multirun: bool) -> str:
    """JSON: the plan itself for a single run, ``{"runs": [...], "arrays": [...], "pool": ...}`` for a sweep."""
    data: Any = (
        {"runs": [p.to_dict() for p in plans], "arrays": sweep_arrays(plans), "pool": sweep_pool(plans)}
        if multirun
        else plans[0].to_dict()
    )
    return json.dumps(data, indent=1, sort_keys=True)
