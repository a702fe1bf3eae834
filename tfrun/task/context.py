"""What a script can learn about its run, in-process: ``tfrun.context()``.

Works outside tfrun too (a single task, no config), so a script that uses it still
runs as plain ``python train.py``.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from typing import Any

from tfrun import variables
from tfrun.paths import RunPaths


@dataclass(frozen=True)
class Context:
    """The run a task belongs to, and the task's place in it."""

    run_id: str | None
    run_dir: str | None
    output_dir: str
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    role: str = "worker"
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def trainer(self) -> dict[str, Any]:
        """The ``trainer`` section: the script's parameters."""
        return dict(self.config.get("trainer", {}))

    @property
    def is_chief(self) -> bool:
        """True on the one task that should save models and write summaries."""
        return self.role == "chief" or (self.rank == 0 and self.role == "worker")

    @property
    def under_tfrun(self) -> bool:
        """False when the script was started by hand."""
        return self.run_dir is not None


@functools.lru_cache(maxsize=1)
def context() -> Context:
    """The current task's context (read once from the environment and the run's plan)."""
    env = os.environ
    run_dir = env.get(variables.RUN_DIR)
    if not run_dir:
        return Context(run_id=None, run_dir=None, output_dir=os.getcwd())
    plan_path = RunPaths.of(run_dir).plan
    config = json.loads(plan_path.read_text())["config"] if plan_path.is_file() else {}
    return Context(
        run_id=env.get(variables.RUN_ID),
        run_dir=run_dir,
        output_dir=env.get(variables.OUTPUT_DIR, str(RunPaths.of(run_dir).outputs)),
        rank=int(env.get(variables.RANK, 0)),
        local_rank=int(env.get(variables.LOCAL_RANK, 0)),
        world_size=int(env.get(variables.WORLD_SIZE, 1)),
        role=env.get(variables.ROLE, "worker"),
        config=config,
    )
