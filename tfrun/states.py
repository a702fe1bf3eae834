"""The states a run is in: one vocabulary for status.json, the verbs, the API and MLflow.

:class:`RunState` is an enum of strings, so the JSON files keep the words they always had
(``"state": "COMPLETED"``) and a state read back from a file compares equal to its member.
Slurm's own job states are another vocabulary (``sacct``'s); :mod:`tfrun.targets.slurm`
maps them to these.
"""

from __future__ import annotations

import enum


class RunState(str, enum.Enum):
    """Where a run (or a sweep point, or a tuning trial) is in its life."""

    PENDING = "PENDING"  # planned and handed to its target, not running yet (a queued job, a waiting item)
    RUNNING = "RUNNING"
    PREEMPTED = "PREEMPTED"  # its job was preempted and waits to run again (Slurm says PENDING)
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"
    STOPPED = "STOPPED"  # stopped on request, resumable with tfrun resume
    PRUNED = "PRUNED"  # a tuning trial its early-termination policy stopped (not resumed, not a failure)
    LOST = "LOST"  # a local run whose launcher is gone without recording an end: it will not end by itself
    DETACHED = "DETACHED"  # tfrun stopped following it (Ctrl-C); its job goes on under Slurm
    UNKNOWN = "UNKNOWN"  # no status (yet), or one that cannot be read

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def final(self) -> bool:
        """It has ended and will not change by itself."""
        return self in FINAL

    @property
    def ok(self) -> bool:
        """The tfrun command that launched it succeeded (completed, or left in Slurm's hands)."""
        return self in OK

    @classmethod
    def of(cls, value: object) -> "RunState":
        """The member for a state read from a file (UNKNOWN for none or a word tfrun does not use)."""
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN


FINAL = frozenset(
    {RunState.COMPLETED, RunState.FAILED, RunState.CANCELLED, RunState.TIMEOUT, RunState.STOPPED, RunState.PRUNED}
)
# States in which the tfrun command itself succeeded: a submitted run that tfrun did not wait
# for (compute.wait=false, or Ctrl-C while following) is in Slurm's hands.
OK = frozenset({RunState.COMPLETED, RunState.PENDING, RunState.DETACHED})
ENDED = FINAL | {RunState.LOST}  # it will not change any more, one way or another


def is_final(state: object) -> bool:
    """Is this state (a member or a word read from a file) a final one?"""
    return state in FINAL
