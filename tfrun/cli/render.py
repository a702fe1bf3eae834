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
        lines.append(f"  export:     rank 0 converts the saved model to {export['format']} after the script "
                     f"succeeds: " + " ".join(f"{k}={v}" for k, v in sorted(export.items()) if k != "format"))
    for task in plan.tasks:
        lines.append(f"  task rank {task.rank}: {task.role} {task.role_index}, node {task.node_index}, "
                     f"local rank {task.local_rank}{'' if task.runs_script else ' (serves; does not run the script)'}")
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
    """The job arrays a Slurm sweep submits (empty for local sweeps)."""
    if not plans or any(p.target != "slurm" for p in plans):
        return []
    from tfrun.plan import packing

    return packing.sweep_arrays(plans, os.path.dirname(plans[0].run_dir))


def plans_text(plans: list[Plan], multirun: bool = False) -> str:
    """Text for a single run or every point of a sweep (with the arrays it becomes)."""
    if not multirun:
        return plan_text(plans[0])
    parts = [f"sweep of {len(plans)} run(s) in {os.path.dirname(plans[0].run_dir)}"]
    for array in sweep_arrays(plans):
        body = "\n".join("    " + line for line in array["sbatch"].splitlines())
        packing = "".join(f"\n  job {job['array_index']}: {', '.join(job['runs'])}" for job in array.get("jobs", []))
        what = (f"{len(array['jobs'])} packed job(s) for {len(array['runs'])} run(s)" if "jobs" in array
                else f"{len(array['runs'])} run(s): {', '.join(array['runs'])}")
        parts.append(f"  job array of {what}{packing}\n  sbatch script:\n{body}")
    return "\n\n".join([*parts, *(plan_text(p) for p in plans)])


def plans_json(plans: list[Plan], multirun: bool) -> str:
    """JSON: the plan itself for a single run, ``{"runs": [...], "arrays": [...]}`` for a sweep."""
    data: Any = ({"runs": [p.to_dict() for p in plans], "arrays": sweep_arrays(plans)}
                 if multirun else plans[0].to_dict())
    return json.dumps(data, indent=1, sort_keys=True)
