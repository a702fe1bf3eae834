"""What tfrun makes of Slurm's answers about its jobs (tfrun.targets.slurm.query), with the
answers of the commands it asks fixed: sacct and squeue on PATH are small scripts here."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tfrun.targets import slurm

# sacct says PREEMPTED of a job that Slurm is about to requeue, as it does for a moment.
SACCT = """#!/bin/sh
printf 'JobID|State|NodeList|ExitCode\\n41|PREEMPTED|node1|0:15\\n41.batch|CANCELLED|node1|0:15\\n'
"""


def _commands(folder: Path, squeue: str) -> None:
    for name, body in (("sacct", SACCT), ("squeue", squeue)):
        path = folder / name
        path.write_text(body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("squeue, state", [
    ("#!/bin/sh\necho '41|PENDING|'\n", "PENDING"),  # requeued: it waits to run again
    ("#!/bin/sh\necho 'slurm_load_jobs error: Invalid job id specified' >&2\nexit 1\n", "PREEMPTED"),  # gone: ended
    ("#!/bin/sh\necho 'slurm_load_jobs error: Unable to contact slurm controller' >&2\nexit 1\n", None),
    ("#!/bin/sh\nsleep 120\n", None),
], ids=["requeued", "ended", "queue-down", "queue-hangs"])
def test_a_preempted_job_is_final_only_when_the_queue_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            squeue: str, state: str | None) -> None:
    """A transient PREEMPTED from sacct, and a queue that does not answer: the job's state is
    not known (left out: its follower keeps the last one), never taken for a final STOPPED."""
    _commands(tmp_path, squeue)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(slurm.subprocess, "run", _with_timeout(slurm.subprocess.run, 3))
    info = slurm.query(["41"])
    assert (info["41"]["State"] if "41" in info else None) == state


def _with_timeout(run, seconds: float):  # type: ignore[no-untyped-def]
    """subprocess.run with a short timeout: the hanging queue's test need not wait a minute."""
    def short(*args, **kwargs):  # type: ignore[no-untyped-def]
        kwargs["timeout"] = min(kwargs.get("timeout", seconds), seconds)
        return run(*args, **kwargs)
    return short
