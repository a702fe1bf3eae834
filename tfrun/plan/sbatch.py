"""What a run or a sweep will submit to Slurm, as data: submitit's parameters and the exact
sbatch script. Pure (``--dry-run`` shows it); :mod:`tfrun.targets.slurm` submits it."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
from typing import Any, Sequence

from tfrun import backends, deps, variables
from tfrun.config.run_config import Compute
from tfrun.paths import RunPaths, SweepPaths
from tfrun.plan import submitit_compat
from tfrun.rundir import Plan

# The line that starts each attempt's part of a job's log ("... JOBID-RESTARTS on NODE").
ATTEMPT_STARTS = "tfrun: starting attempt"
ATTEMPT_STARTS_RE = re.compile(r"^" + re.escape(ATTEMPT_STARTS) + r" (\S+)-(\d+) on ", re.M)

# The first lines of every job's script. A stop request sent to the batch shell (with the
# job: ``scancel --full --signal=USR2``; alone: ``scancel --batch``, ``--signal=B:USR2@N``)
# killed it (bash's default), and the job ended FAILED. The shell now passes it on to the
# job's tasks and goes on; srun runs in the background so that the trap runs at once (bash
# runs traps only between commands), and the script still ends with srun's exit status.
#
# A task holds the stop signals from the first line of its Python (tfrun.task.held), not
# before: one that comes while the interpreter itself starts kills the task, srun exits
# 128 + the signal's number, and the job would end FAILED with nothing requeued (Slurm 24.11
# can send the time-limit warning of a requeued job within its first second). SIGUSR1 and
# SIGUSR2 are only ever stop requests to a tfrun task (its handlers take them from then on):
# when the step ends by one, its tasks run once more with it pending (STOP_PENDING), held
# from their first line, and they stop before the script runs as they would for a stop that
# comes while they prepare: the job is requeued by the one rule.
BATCH_SHELL_LINES = [
    # Each attempt of the job (Slurm starts the script again after a requeue) says so in the job's
    # log first, which the job's attempts share: how an attempt ended is read from its own lines.
    f'echo "{ATTEMPT_STARTS} $SLURM_JOB_ID-${{SLURM_RESTART_COUNT:-0}} on $SLURMD_NODENAME" >&2',
    '_tfrun_stop() { scancel --signal="$1" "$SLURM_JOB_ID"; }',
    "trap '_tfrun_stop USR1' USR1",
    "trap '_tfrun_stop USR2' USR2",
    '_tfrun_srun() { command srun "$@" & local pid=$!; while kill -0 "$pid" 2>/dev/null; do wait "$pid"; done; wait "$pid"; }',
    '_tfrun_again() { echo "tfrun: SIG$1 ended the tasks before they could hold it: they run again with it pending" >&2;'
    f' local sig=$1; shift; {variables.STOP_PENDING}=$sig _tfrun_srun "$@"; }}',
    # A task killed by a signal: srun exits 128 + its number (138, 140).
    f'srun() {{ _tfrun_srun "$@"; local code=$?; case $code in {128 + signal.SIGUSR1}) _tfrun_again USR1 "$@";;'
    f' {128 + signal.SIGUSR2}) _tfrun_again USR2 "$@";; *) return $code;; esac; }}',
]


def parameters(compute: Compute, backend: str = "none") -> dict[str, Any]:
    """submitit/sbatch parameters for a run (names as ``_make_sbatch_string`` takes them)."""
    # A rank that exits non-zero ends the whole step at once: no rank is left waiting
    # forever in a collective for a peer that is gone. Backends that survive losing a
    # server task (ps) stop their servers themselves when the chief ends.
    tolerant = getattr(backends.get(backend), "TOLERATES_WORKER_LOSS", False)
    params: dict[str, Any] = {
        "job_name": compute.job_name,
        "time": compute.timeout_min,
        "nodes": compute.nodes,
        "ntasks_per_node": compute.tasks_per_node,
        "signal_delay_s": compute.signal_delay_s,
        "stderr_to_stdout": True,
        "srun_args": [f"--kill-on-bad-exit={0 if tolerant else 1}", *compute.srun_args],
        "setup": [*BATCH_SHELL_LINES, *compute.setup],
        "array_parallelism": compute.array_parallelism,
    }
    if compute.gpus_per_task:
        params["gpus_per_task"] = compute.gpus_per_task
    elif compute.gpus_per_node:
        params["gpus_per_node"] = compute.gpus_per_node
    if compute.mem_gb:
        params["mem"] = submitit_compat.mem(compute.mem_gb)
    for key in ("partition", "cpus_per_task", "account", "qos", "constraint", "exclude", "nodelist"):
        if getattr(compute, key) is not None:
            params[key] = getattr(compute, key)
    # tfrun requeues jobs itself (time limits, preemptions, hangs): a cluster whose default is
    # JobRequeue=0 refuses that for a job that did not ask for it. A user's own requeue or
    # no_requeue among additional_parameters wins.
    extra = dict(compute.additional_parameters or {})
    if "no_requeue" not in extra:
        extra.setdefault("requeue", True)
    params["additional_parameters"] = extra
    return params


def plan_parameters(plan: Plan, compute: Compute | None = None) -> dict[str, Any]:
    """:func:`parameters` of a plan (``compute``: its section, typed, when the caller has it),
    with the setup lines its deps add (module loads, an in-job build)."""
    params = parameters(compute or Compute.of(plan.compute), plan.backend)
    params["setup"] = [*params["setup"], *deps.setup_lines(plan)]
    return params


# A Slurm task's interpreter runs submitit's module through this one, which holds the stop
# signals from its first line until the bootstrap's handlers take them (see the module). Named
# here, not imported: the task's floor is above this one.
HELD_MODULE = "tfrun.task.held"


def task_python(plan: Plan) -> list[str]:
    """What starts a Slurm task's Python: the deps' interpreter (or container command) with the
    stop signals held from its first line."""
    return [*deps.python_words(plan), "-u", "-m", HELD_MODULE]


def submitit_command(python: str | Sequence[str], folder: str | os.PathLike[str]) -> str:
    """The command submitit puts after srun in the sbatch script."""
    return f"{shell_words(python)} -u -m {submitit_compat.SUBMIT_MODULE} {shlex.quote(str(folder))}"


def shell_words(python: str | Sequence[str]) -> str:
    """An interpreter, or a command that ends with one (apptainer exec ... IMAGE python3), quoted."""
    return shlex.quote(python) if isinstance(python, str) else shlex.join(python)


def sbatch_text(
    params: dict[str, Any], python: str | Sequence[str], folder: str | os.PathLike[str], array_size: int | None = None
) -> str:
    """The exact sbatch script submitit will write for these parameters."""
    extra = {"map_count": array_size} if array_size and array_size > 1 else {}
    return submitit_compat.sbatch_script(submitit_command(python, folder), folder, **params, **extra)


def submitit_folder(plan: Plan) -> str:
    """Where submitit keeps its pickles and logs: beside the run, or beside the sweep."""
    return str(RunPaths.of(plan.run_dir).submitit)


def request(plan: Plan, sweep_dir: str | None = None, compute: Compute | None = None) -> dict[str, Any]:
    """What ``sbatch`` will get for this run (shown by ``--dry-run``); a sweep's runs share its folder."""
    params = plan_parameters(plan, compute)
    folder = str(SweepPaths.of(sweep_dir).submitit) if sweep_dir else submitit_folder(plan)
    text = sbatch_text(params, task_python(plan), folder)
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    return {"parameters": params, "folder": folder, "sbatch": text, "srun": srun}


def max_array_size() -> int:
    """The cluster's MaxArraySize (Slurm's default when it cannot be read)."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 1001
    for line in out.splitlines():
        if line.startswith("MaxArraySize"):
            return int(line.split("=", 1)[1].strip())
    return 1001


def parameter_groups(plans: Sequence[Plan]) -> list[list[Plan]]:
    """Plans whose Slurm parameters are equal go in one array (a sweep over nodes makes several)."""
    groups: dict[str, list[Plan]] = {}
    for plan in plans:
        key = repr(sorted(plan_parameters(plan).items())) + shlex.join(task_python(plan))
        groups.setdefault(key, []).append(plan)
    return list(groups.values())


def array_requests(plans: Sequence[Plan], sweep_dir: str) -> list[dict[str, Any]]:
    """What a sweep submits: per group of equal parameters, its runs and the array's sbatch."""
    folder = str(SweepPaths.of(sweep_dir).submitit)
    chunk = max_array_size()
    requests = []
    for group in parameter_groups(plans):
        for start in range(0, len(group), chunk):
            part = group[start : start + chunk]
            params = plan_parameters(part[0])
            requests.append(
                {
                    "runs": [p.run_id for p in part],
                    "sbatch": sbatch_text(params, task_python(part[0]), folder, array_size=len(part)),
                }
            )
    return requests
