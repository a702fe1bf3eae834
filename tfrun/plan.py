"""RunConfig -> Plan: a frozen, plain-data description of everything a run will do.

Building a plan has no side effects. ``--dry-run`` prints it, tests assert on it, the
launchers write it to the run dir as ``plan.json``, and the bootstrap in every task
reads it back to learn what to do.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from tfrun import backends, targets
from tfrun.config import validate

PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class Task:
    """One process of the run."""

    rank: int
    local_rank: int
    node_index: int
    role: str  # worker, chief, ps, evaluator
    role_index: int
    runs_script: bool  # false for tasks that only serve (parameter servers)
    argv: list[str]  # sys.argv the script sees
    env: dict[str, str]  # variables tfrun sets in this task (hosts and ports are filled in the task)
    gpus: str | None  # CUDA_VISIBLE_DEVICES when known at plan time (local), else None
    tf_config: dict[str, Any] | None  # TF_CONFIG with host/port placeholders


@dataclass(frozen=True)
class Plan:
    """Everything the run will do, as plain data."""

    run_id: str
    run_dir: str
    target: str  # compute target: local or slurm
    backend: str
    script: str
    source_dir: str
    python: str
    command: list[str]  # what each task's process runs (before the bootstrap takes over)
    tasks: list[Task]
    config: dict[str, Any]  # the composed, resolved config
    request: dict[str, Any] = field(default_factory=dict)  # launcher-specific (sbatch text, ...)
    warnings: list[str] = field(default_factory=list)  # things that will run but probably not as meant
    deps: dict[str, Any] = field(default_factory=dict)  # the environment (tfrun.deps.DepsPlan as data)

    @property
    def output_dir(self) -> str:
        """Where the script should write what it produces."""
        return os.path.join(self.run_dir, "outputs")

    @property
    def compute(self) -> dict[str, Any]:
        """The composed compute section."""
        return self.config["compute"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    def save(self) -> Path:
        """Write plan.json into the run dir atomically."""
        from tfrun.runs import write_json

        path = Path(self.run_dir) / PLAN_FILE
        write_json(path, self.to_dict())
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Plan":
        """Inverse of :meth:`to_dict`."""
        fields = dict(data)
        fields["tasks"] = [Task(**t) for t in data["tasks"]]
        return cls(**fields)

    @classmethod
    def load(cls, run_dir: str | os.PathLike[str]) -> "Plan":
        """Read plan.json from a run dir."""
        return cls.from_dict(json.loads((Path(run_dir) / PLAN_FILE).read_text()))


def script_args(trainer: Mapping[str, Any], prefix: str, style: str) -> list[str]:
    """``trainer`` as command-line flags, the way the cloud estimator passed script_params.

    ``None`` gives a bare flag, a list gives the flag followed by each item.
    """
    args: list[str] = []
    for key, value in trainer.items():
        name = str(key).replace("_", "-") if style == "dashes" else str(key)
        flag = f"{prefix}{name}"
        if value is None:
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


def base_env(run_id: str, run_dir: str, ident: Mapping[str, int], role: str, world_size: int,
             backend: str) -> dict[str, str]:
    """The TFRUN_* variables every task gets (also read by :func:`tfrun.context`)."""
    return {
        "TFRUN_RUN_ID": run_id,
        "TFRUN_RUN_DIR": run_dir,
        "TFRUN_OUTPUT_DIR": os.path.join(run_dir, "outputs"),
        "TFRUN_RANK": str(ident["rank"]),
        "TFRUN_LOCAL_RANK": str(ident["local_rank"]),
        "TFRUN_NODE_INDEX": str(ident["node_index"]),
        "TFRUN_WORLD_SIZE": str(world_size),
        "TFRUN_ROLE": role,
        "TFRUN_BACKEND": backend,
    }


def run_id_for(run_dir: Path, runs_dir: Path) -> str:
    """A run's id is its path under the runs dir (``<id>`` or ``sweep-<id>/<n>``)."""
    try:
        return run_dir.resolve().relative_to(runs_dir.resolve()).as_posix()
    except ValueError:
        return run_dir.name


def build_plan(cfg: Mapping[str, Any], run_dir: str | os.PathLike[str], cwd: Path | None = None) -> Plan:
    """Validate a composed, resolved config and describe the run it asks for.

    Raises :class:`tfrun.errors.ConfigError` for anything that cannot run.
    """
    # Imported here: every task's bootstrap imports this module for Plan.load, and these
    # pull in omegaconf and the schemas (a quarter of a second per task of a packed sweep).
    from tfrun import deps, export

    cwd = cwd or Path.cwd()
    compute, backend_cfg, entry = cfg["compute"], cfg["backend"], cfg["entry"]
    validate.check_entry(entry)
    validate.check_compute(compute)
    validate.check_trainer(cfg["trainer"])
    export.check(cfg["export"])
    launcher = targets.get(compute["target"])
    backend = backends.get(backend_cfg["name"])
    script, source_dir = validate.resolve_script(entry, cwd)

    world_size = compute["nodes"] * compute["tasks_per_node"]
    backend.check(backend_cfg, world_size)
    run_path = (cwd / run_dir).resolve()
    run_id = run_id_for(run_path, cwd / cfg["tfrun"]["runs_dir"])
    argv = [str(script), *script_args(cfg["trainer"], entry["flag_prefix"], entry["flag_style"]), *entry["args"]]
    gpus_per_task = compute.get("gpus_per_task") or compute["gpus_per_node"] // compute["tasks_per_node"]

    extra_env = {str(k): str(v) for k, v in cfg["deps"].get("env", {}).items()}
    if backend_cfg.get("legacy_keras"):
        extra_env["TF_USE_LEGACY_KERAS"] = "1"

    tasks = []
    roles = backend.roles(backend_cfg, world_size)
    for rank, (role, role_index, runs_script) in enumerate(roles):
        ident = {"rank": rank, "local_rank": rank % compute["tasks_per_node"], "node_index": rank // compute["tasks_per_node"]}
        env = {**base_env(run_id, str(run_path), ident, role, world_size, backend_cfg["name"]), **extra_env}
        tasks.append(Task(
            **ident, role=role, role_index=role_index, runs_script=runs_script, argv=argv, env=env,
            gpus=local_gpus(ident["local_rank"], gpus_per_task) if compute["target"] == "local" else None,
            tf_config=backend.tf_config(backend_cfg, roles, rank),
        ))

    deps_plan = deps.plan_for(cfg["deps"], entry.get("python") or sys.executable, compute, str(run_path),
                              str(script), str(source_dir), cwd)
    python = deps_plan.python  # the environment's interpreter (or the container's)
    plan = Plan(
        run_id=run_id, run_dir=str(run_path), target=compute["target"], backend=backend_cfg["name"],
        script=str(script), source_dir=str(source_dir), python=python,
        command=[*deps_plan.command_prefix, python, "-u", "-m", "tfrun.bootstrap", str(run_path)], tasks=tasks,
        config=dict(cfg), deps=deps_plan.to_dict(),
        warnings=[w for w in [validate.keras3_warning(script, backend_cfg)] if w],
    )
    return replace(plan, request=launcher.request(plan))


def in_sweep(plan: Plan, sweep_dir: str | os.PathLike[str]) -> Plan:
    """The plan of a sweep point: the launcher's request as the sweep will submit it."""
    return replace(plan, request=targets.get(plan.target).request(plan, sweep_dir=str(sweep_dir)))
