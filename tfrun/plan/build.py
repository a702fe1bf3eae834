"""RunConfig (:mod:`tfrun.config.run_config`) -> Plan: a frozen, plain-data description of everything a run will do.

Building a plan has no side effects. ``--dry-run`` prints it, tests assert on it, the
launchers write it to the run dir as ``plan.json``, and the bootstrap in every task
reads it back (:class:`tfrun.rundir.Plan`) to learn what to do.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from tfrun import backends, variables
from tfrun.paths import RunPaths
from tfrun.plan import sbatch
from tfrun.rundir import Plan, Task

if TYPE_CHECKING:  # what a plan is built from: made and checked in config/ (tfrun.config.composition)
    from tfrun.config.run_config import Compute, RunConfig


def script_args(trainer: Mapping[str, Any], prefix: str, style: str, bools: str = "flag") -> list[str]:
    """``trainer`` as command-line flags, the way the cloud estimator passed script_params.

    ``None`` gives a bare flag, a list gives the flag followed by each item, and every
    value is one argv entry as it is. A boolean is a switch (``bools="flag"``: ``true`` a
    bare flag, as ``store_true`` expects, ``false`` no flag) or a value (``--flag True``).
    """
    args: list[str] = []
    for key, value in trainer.items():
        name = str(key).replace("_", "-") if style == "dashes" else str(key)
        flag = f"{prefix}{name}"
        if isinstance(value, bool) and bools == "flag":
            args += [flag] if value else []
        elif value is None:
            args.append(flag)
        elif isinstance(value, (list, tuple)):
            args += [flag, *(str(v) for v in value)]
        else:
            args += [flag, str(value)]
    return args


def local_gpus(local_rank: int, gpus_per_task: int) -> str | None:
    """The devices a local task gets when nothing bound them before tfrun."""
    if gpus_per_task <= 0:
        return None
    first = local_rank * gpus_per_task
    return ",".join(str(first + i) for i in range(gpus_per_task))


def base_env(
    run_id: str, run_dir: str, ident: Mapping[str, int], role: str, world_size: int, backend: str
) -> dict[str, str]:
    """The TFRUN_* variables every task gets (also read by :func:`tfrun.task.context`)."""
    return {
        variables.RUN_ID: run_id,
        variables.RUN_DIR: run_dir,
        variables.OUTPUT_DIR: str(RunPaths.of(run_dir).outputs),
        variables.RANK: str(ident["rank"]),
        variables.LOCAL_RANK: str(ident["local_rank"]),
        variables.NODE_INDEX: str(ident["node_index"]),
        variables.WORLD_SIZE: str(world_size),
        variables.ROLE: role,
        variables.BACKEND: backend,
    }


def run_id_for(run_dir: Path, runs_dir: Path) -> str:
    """A run's id is its path under the runs dir (``<id>`` or ``sweep-<id>/<n>``)."""
    try:
        return run_dir.resolve().relative_to(runs_dir.resolve()).as_posix()
    except ValueError:
        return run_dir.name


def build_plan(run: RunConfig, run_dir: str | os.PathLike[str], sweep_dir: str | None = None) -> Plan:
    """Describe the run a checked config asks for (``sweep_dir``: the sweep it is a point of).

    Raises :class:`tfrun.errors.ConfigError` for an environment (``deps``) that cannot work.
    """
    # Imported here: the runner of a packed allocation, which imports this package for its
    # points' job steps, does not need deps.
    from tfrun import deps

    compute, entry = run.compute, run.entry
    backend = backends.get(run.backend.name)
    world_size = compute.world_size
    run_path = (run.cwd / run_dir).resolve()
    run_id = run_id_for(run_path, run.tfrun.runs_dir)
    flags = script_args(run.trainer, entry.flag_prefix, entry.flag_style, entry.bool_style)
    argv = [str(entry.script), *flags, *entry.args]

    extra_env = {str(k): str(v) for k, v in run.deps.env.items()}
    if run.backend.legacy_keras:
        extra_env["TF_USE_LEGACY_KERAS"] = "1"

    tasks = []
    roles = backend.roles(run.backend.options, world_size)
    for rank, (role, role_index, runs_script) in enumerate(roles):
        ident = {
            "rank": rank,
            "local_rank": rank % compute.tasks_per_node,
            "node_index": rank // compute.tasks_per_node,
        }
        env = {**base_env(run_id, str(run_path), ident, role, world_size, run.backend.name), **extra_env}
        tasks.append(
            Task(
                **ident,
                role=role,
                role_index=role_index,
                runs_script=runs_script,
                argv=argv,
                env=env,
                gpus=local_gpus(ident["local_rank"], compute.gpus_per_rank) if compute.target == "local" else None,
                tf_config=backend.tf_config(run.backend.options, roles, rank),
            )
        )

    gpus = bool(compute.gpus_per_node or compute.gpus_per_task)
    deps_plan = deps.plan_for(
        run.deps.options,
        entry.python or sys.executable,
        compute.target,
        gpus,
        str(run_path),
        str(entry.script),
        str(entry.source_dir),
        run.cwd,
    )
    python = deps_plan.python  # the environment's interpreter (or the container's)
    plan = Plan(
        run_id=run_id,
        run_dir=str(run_path),
        target=compute.target,
        backend=run.backend.name,
        script=str(entry.script),
        source_dir=str(entry.source_dir),
        python=python,
        command=[*deps_plan.command_prefix, python, "-u", "-m", "tfrun.bootstrap", str(run_path)],
        tasks=tasks,
        config=dict(run.data),
        deps=deps_plan.to_dict(),
        warnings=list(run.warnings),
    )
    return replace(plan, request=target_request(plan, sweep_dir, compute))


def target_request(plan: Plan, sweep_dir: str | None = None, compute: Compute | None = None) -> dict[str, Any]:
    """What the compute target is asked to do (``--dry-run`` shows it): on Slurm the exact
    sbatch script (``compute``: the plan's, typed, when the caller has it); here, one process
    per task with the variables that say which."""
    if plan.target == "slurm":
        return sbatch.request(plan, sweep_dir, compute)
    return {"processes": [{"rank": t.rank, "argv": plan.command, "env": task_launch_env(t.rank)} for t in plan.tasks]}


def task_launch_env(rank: int, attempt: str = "local-<launch time>") -> dict[str, str]:
    """The variables a local task's bootstrap needs to know which task it is, and which launch."""
    return {variables.LAUNCHER: "local", variables.RANK: str(rank), variables.ATTEMPT: attempt}
