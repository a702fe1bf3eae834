"""What tfrun makes of Slurm's answers about its jobs (tfrun.targets.slurm.query) and, inside a
job, about a job step (tfrun.task.preemption.step), with the answers of the commands it asks
fixed: sacct, squeue and scontrol on PATH are small scripts here."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from tfrun.targets import slurm
from tfrun.task import preemption

# sacct says PREEMPTED of a job that Slurm is about to requeue, as it does for a moment.
SACCT = """#!/bin/sh
printf 'JobID|State|NodeList|ExitCode\\n41|PREEMPTED|node1|0:15\\n41.batch|CANCELLED|node1|0:15\\n'
"""


def _commands(folder: Path, squeue: str) -> None:
    for name, body in (("sacct", SACCT), ("squeue", squeue)):
        path = folder / name
        path.write_text(body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize(
    "squeue, state",
    [
        ("#!/bin/sh\necho '41|PENDING|'\n", "PENDING"),  # requeued: it waits to run again
        ("#!/bin/sh\necho 'slurm_load_jobs error: Invalid job id specified' >&2\nexit 1\n", "PREEMPTED"),  # gone: ended
        ("#!/bin/sh\necho 'slurm_load_jobs error: Unable to contact slurm controller' >&2\nexit 1\n", None),
        ("#!/bin/sh\nsleep 120\n", None),
    ],
    ids=["requeued", "ended", "queue-down", "queue-hangs"],
)
def test_a_preempted_job_is_final_only_when_the_queue_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, squeue: str, state: str | None
) -> None:
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


STEP = "StepId=41.0 UserId=0 StartTime=2026-12-06T08:33:57 TimeLimit=UNLIMITED State=RUNNING NodeList=node1"


@pytest.mark.parametrize(
    "scontrol, found",
    [
        (f"#!/bin/sh\necho '{STEP}'\n", preemption.Step(ended=False, start="2026-12-06T08:33:57")),
        ("#!/bin/sh\necho 'Job step 41.0 not found'\nexit 1\n", preemption.Step(ended=True)),  # the step ended
        (
            "#!/bin/sh\necho 'slurm_get_job_steps error: Invalid job id specified' >&2\nexit 1\n",
            preemption.Step(ended=True),
        ),  # its job ended and was forgotten
        (
            "#!/bin/sh\necho 'slurm_get_job_steps error: Unable to contact slurm controller (connect failure)' >&2\n"
            "exit 1\n",
            None,
        ),
        ("#!/bin/sh\nsleep 120\n", None),
    ],
    ids=["running", "step-ended", "job-forgotten", "controller-down", "controller-hangs"],
)
def test_a_step_is_over_only_when_slurm_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scontrol: str, found: preemption.Step | None
) -> None:
    """The watchdog ends once its job step has ended: a controller that does not answer is no end."""
    path = tmp_path / "scontrol"
    path.write_text(scontrol)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert preemption.step("41", "0", timeout_s=3) == found


def test_a_step_of_the_same_id_started_later_is_another_one() -> None:
    """A requeued job runs its step again under the same id: its StartTime tells them apart."""
    started = preemption.Step(ended=False, start="2026-12-06T08:33:57")
    at = time.mktime(time.strptime("2026-12-06T08:33:57", "%Y-%m-%dT%H:%M:%S"))
    assert started.started_after(at - 5) and not started.started_after(at + 0.5)
    assert not preemption.Step(ended=False, start="Unknown").started_after(0)
