"""A run's life, in one place: started on its target and followed there (:func:`launch`), its
outcome said, its MLflow run ended if its tasks could not; brought up to date, cancelled or
asked to stop later (:mod:`~tfrun.runner.control`); the points of a sweep
(:mod:`~tfrun.runner.sweeps`). The command line, the Python API and estimator, the Hydra
launcher plugin and the tuning study all come through here; the targets below do the acting
(:mod:`tfrun.targets`).
"""

from __future__ import annotations

import sys
from typing import IO, TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from tfrun.plan import Plan


def _say_warning(text: str) -> None:
    print(f"tfrun: warning: {text}", file=sys.stderr)


def launch(
    plan: Plan, out: IO[bytes] | None = None, report: bool = True, warn: Callable[[str], None] | None = _say_warning
) -> str:
    """Start a planned run where its compute target says and follow it (with
    ``compute.wait=false``: until its scheduler has it); its state. ``report``: print its outcome
    (the command line's; a notebook or a study's trial reads the state instead). ``warn``: how
    the plan's warnings are told (None: they were told already). An ended run whose tasks could
    not end its MLflow run (``tracking=mlflow``) has it ended here, by the process that saw it end."""
    from tfrun import targets
    from tfrun.targets.report import print_outcome
    from tfrun.tracking import mlflow_sync

    if warn is not None:
        for warning in plan.warnings:
            warn(warning)
    state = targets.get(plan.target).run(plan, out)
    if report:
        print_outcome(plan, state)
    mlflow_sync.sync_if_asked(plan.run_dir, state)
    return state
