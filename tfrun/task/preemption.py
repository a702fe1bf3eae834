"""Slurm's account of a job from inside it: is a SIGTERM to it a preemption, and how will it
end? Is a job step still running?

The SIGTERM's account is asked once, by rank 0, in a thread (never in a signal handler, never
by every rank): see :mod:`tfrun.task.preempt`; a step's, by the watchdog
(:mod:`tfrun.task.watchdog`). Every query goes through :func:`tfrun.task.preempt.slurm_command`.
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from tfrun.task.preempt import slurm_command

QUERY_BUDGET_S = 5.0  # all the Slurm queries rank 0 makes about a SIGTERM: the grace time is running
# scontrol's JobState of a job still running while Slurm signals it (SIGNALING: seen during a
# preemption's SIGTERM), and of one its time limit ended.
SLURM_STILL_RUNNING = frozenset({"RUNNING", "SIGNALING"})
SLURM_TIMEOUT = "TIMEOUT"
# scontrol's answer about a step the controller does not have: the step ended ("Job step 7.0 not
# found"), or its whole job did and was forgotten ("Invalid job id specified").
SLURM_NO_SUCH_STEP = re.compile(r"Job step \S+ not found|Invalid job id specified")


def scontrol_fields(*what: str, timeout_s: float = 10.0) -> dict[str, str]:
    """``scontrol -o show WHAT...`` as a dict (empty if it cannot be read)."""
    try:
        out = slurm_command(["scontrol", "-o", "show", *what], timeout_s)
    except (OSError, subprocess.SubprocessError):
        return {}
    if out.returncode:
        return {}
    return dict(word.split("=", 1) for word in out.stdout.split() if "=" in word)


@dataclass(frozen=True)
class Step:
    """A job step as Slurm has it: ``ended`` once Slurm has no such step any more; while it runs,
    when it started (``StartTime``, to tell it from the step of the same id a requeued job runs)."""

    ended: bool
    start: str = ""

    def started_after(self, when: float) -> bool:
        """Whether it started after ``when`` (``StartTime`` is local time, whole seconds); False
        if that is not known."""
        try:
            return time.mktime(time.strptime(self.start, "%Y-%m-%dT%H:%M:%S")) > when
        except (ValueError, OverflowError):
            return False


def step(job: str, step_id: str, timeout_s: float = 10.0) -> Step | None:
    """``scontrol -o show step JOB.STEP``; None when Slurm does not answer (the controller is
    down or slow, scontrol missing): not knowing is never taken for an end."""
    try:
        out = slurm_command(["scontrol", "-o", "show", "step", f"{job}.{step_id}"], timeout_s)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode:
        return Step(ended=True) if SLURM_NO_SUCH_STEP.search(out.stdout + out.stderr) else None
    fields = dict(word.split("=", 1) for word in out.stdout.split() if "=" in word)
    return Step(ended=False, start=fields.get("StartTime", "")) if "StepId" in fields else None


def slurm_config(timeout_s: float = 10.0) -> dict[str, str]:
    """``scontrol show config`` (one ``Key = value`` per line) as a dict; empty if unreadable."""
    try:
        out = slurm_command(["scontrol", "show", "config"], timeout_s).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    pairs = (line.split("=", 1) for line in out.splitlines() if " = " in line)
    return {key.strip(): value.strip() for key, value in pairs}


def seconds(text: str | None) -> int | None:
    """A duration as Slurm prints it ([D-][HH:]MM:SS, or plain seconds); None if it is not one
    (empty, INVALID, UNLIMITED, NOT_SET)."""
    if not text:
        return None
    days, _, clock = text.rpartition("-")
    try:
        parts = [int(p) for p in clock.split(":")]
    except ValueError:
        return None
    if len(parts) == 1 and not days:
        return parts[0]
    while len(parts) < 3:
        parts.insert(0, 0)
    return (int(days) if days else 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


def account(job: str, partition: str | None = None, qos: str | None = None) -> dict[str, Any]:
    """Slurm's account of a SIGTERM to this job, for rank 0 to ask once, outside the signal
    handler: ``{"preempted": True, ...}`` with the preemption's time, partition, mode and
    grace time; ``{"preempted": False, "job_state": ...}`` for a cancel, the time limit or a
    step ended; ``{}`` when Slurm does not answer (the caller then saves the work as for a
    preemption). All of it within :data:`QUERY_BUDGET_S`: the grace time is running.

    While a running job is being preempted, Slurm sets its ``PreemptTime``; a cancelled or
    timed-out job is no longer RUNNING (nor SIGNALING), and a requeue clears PreemptTime. How
    the preemption ends (``PreemptMode``: REQUEUE, CANCEL, ...) and the grace time are the job's
    QOS's under ``preempt/qos``, else its partition's (or the cluster's)."""
    deadline = time.monotonic() + QUERY_BUDGET_S

    def left() -> float:
        return max(0.1, deadline - time.monotonic())

    record = scontrol_fields("job", job, timeout_s=left())
    if not record:
        return {}
    if record.get("JobState") not in SLURM_STILL_RUNNING or record.get("PreemptTime", "None") in (
        "None",
        "Unknown",
        "",
    ):
        return {"preempted": False, "job_state": record.get("JobState")}
    partition, qos = record.get("Partition") or partition, record.get("QOS") or qos
    found: dict[str, Any] = {
        "preempted": True,
        "preempt_time": record["PreemptTime"],
        "partition": partition,
        "qos": qos,
    }
    config = slurm_config(timeout_s=left())
    if config.get("SLURM_VERSION"):  # how the preemption ends differs between releases (tfrun.task.requeue)
        found["slurm_version"] = config["SLURM_VERSION"]
    mode, grace = _qos_preemption(qos, left()) if "qos" in config.get("PreemptType", "") else (None, None)
    if mode is None:
        settings = scontrol_fields("partition", partition, timeout_s=left()) if partition else {}
        mode, grace = settings.get("PreemptMode") or config.get("PreemptMode"), settings.get("GraceTime")
    # Slurm did not say how it ends the preemption: none assumed (the requeue then counts).
    found.update(preempt_mode=mode.upper() if mode else None, grace_s=seconds(grace))
    return found


def _qos_preemption(qos: str | None, timeout_s: float) -> tuple[str | None, str | None]:
    """(PreemptMode, GraceTime) of a QOS from the accounting database, (None, None) if unknown."""
    if not qos:
        return None, None
    try:
        out = slurm_command(
            ["sacctmgr", "-nP", "show", "qos", qos, "format=PreemptMode,GraceTime"], timeout_s
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None, None
    mode, _, grace = out.partition("|")
    return (mode or None) if mode != "cluster" else None, grace or None
