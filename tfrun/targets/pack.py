"""Sweeps of many short runs packed into few Slurm allocations (``compute.pack_size``).

A sweep of N points becomes ceil(N/K) jobs of one array. In each allocation a runner
(running in the batch script, not under srun) starts every point as its own job step,
``slots`` at a time side by side: each point keeps its own run dir, bootstrap, ranks,
logs, status and rendezvous. A failing point does not stop the others. The time-limit
warning reaches the running points' tasks; the point's rank 0 requeues the job (as in
a run of its own), the runner stops starting points, and on restart it runs only the
points not yet finished.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from tfrun import deps, rundir
from tfrun.errors import ConfigError
from tfrun.plan import Plan, packing, sbatch
from tfrun.targets import progress, slurm
from tfrun.task import preempt

CANCEL_MARKER = "cancel-requested"
# How often the runner looks for finished points. A slot stays idle for half of this on
# average after its point ends; at 0.2 s that was a third of a trivial point's cost, and
# polling a few child processes 20 times a second costs nothing measurable.
POLL_S = 0.05


def _killed_by_stop_signal(run_dir: str, code: int) -> bool:
    """Did the point's step end because a task died of the stop signal itself?"""
    signum = int(preempt.SIGNALS[1])
    if code in (-signum, 128 + signum):
        return True
    return "task 0: " + signal.strsignal(signum) in rundir.tail(Path(run_dir) / "srun.log", 20)


def _finished(run_dir: str) -> bool:
    return rundir.read_status(run_dir).get("state") in rundir.FINAL_STATES


class _Runner:
    """Runs a pack's points inside the allocation; all the state it needs is in the run dirs."""

    def __init__(self, run_dirs: Sequence[str], slots: int):
        self.run_dirs = list(run_dirs)
        self.pending = [d for d in run_dirs if not _finished(d)]  # a requeued job skips finished points
        self.slots, self.running, self.stop, self.requeue_needed = slots, {}, False, False
        self.job = os.environ.get("SLURM_JOB_ID", "")
        self.array_job = (f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
                          if os.environ.get("SLURM_ARRAY_JOB_ID") else self.job)

    def on_signal(self, signum: int, frame: object) -> None:
        self.stop = True

    def start(self, run_dir: str) -> None:
        if (Path(run_dir) / CANCEL_MARKER).exists():
            rundir.update_status(run_dir, state="CANCELLED", ended=time.time(), reason="cancelled with tfrun cancel")
            return
        plan = Plan.load(run_dir)
        log = open(Path(run_dir) / "srun.log", "ab")
        env = {**os.environ, "TFRUN_LAUNCHER": "slurm"}
        rundir.update_status(run_dir, state="RUNNING", started=time.time(), srun_log=str(Path(run_dir) / "srun.log"),
                             allocation=self.job)
        self.running[run_dir] = subprocess.Popen(packing.step_command(plan), env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def reap(self) -> None:
        for run_dir, proc in list(self.running.items()):
            code = proc.poll()
            if code is None:
                continue
            del self.running[run_dir]
            if (Path(run_dir) / CANCEL_MARKER).exists():
                state = "CANCELLED"
            elif code == 0:
                state = "COMPLETED"
            elif self.stop or code == preempt.EXIT_PREEMPTED:
                self.stop = True  # the point stopped for a requeue: not finished, it runs again
                continue
            elif _killed_by_stop_signal(run_dir, code):
                # The warning came while the point was still starting (before its bootstrap
                # could catch it), so nobody requeued the job: the runner does.
                self.stop = self.requeue_needed = True
                continue
            else:
                state = "FAILED"
            rundir.update_status(run_dir, **slurm.settle(run_dir, state))

    def wind_down(self) -> None:
        """The job is being requeued (a point's rank 0 asked) or ended: let the running
        points stop on their own, record nothing as finished that did not finish, and
        wait for Slurm to end this attempt (or end it, where Slurm requeues it as it ends)."""
        for proc in self.running.values():
            proc.send_signal(preempt.SIGNALS[1])  # srun forwards it to the point's tasks
        deadline = time.monotonic() + 60
        while self.running and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.5)
        if self.requeue_needed:
            self._requeue()
        print("tfrun: pack stopping; its unfinished points run again when the job restarts", file=sys.stderr, flush=True)
        if not self._requeued_as_it_ends():
            preempt.wait_to_be_stopped()

    def _requeued_as_it_ends(self) -> bool:
        """Is the allocation being preempted, and does Slurm requeue it as it ends (the points'
        rank 0 then leave the requeue to Slurm: see preempt.requeued_as_it_ends)? Kept waiting,
        it would be killed at the end of the grace time, and requeued once more later."""
        found, _ = preempt.preemption(self.job) if self.job else (None, "not a Slurm job")
        return found is not None and preempt.requeued_as_it_ends(found)

    def _requeue(self) -> None:
        """Requeue the allocation, bounded for time-outs by compute.max_requeues like a run of
        its own (Slurm counts this job's restarts)."""
        compute = Plan.load(self.run_dirs[0]).compute
        reason = preempt.stop_reason(self.job, compute.get("signal_delay_s", 120))
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        if not preempt.may_requeue(reason, restarts, compute.get("max_requeues", 3)):
            print(f"tfrun: time limit reached after {restarts} requeue(s) (compute.max_requeues): the pack's "
                  f"unfinished points are not run again", file=sys.stderr, flush=True)
            return
        failure = preempt.requeue(self.job)
        if failure:
            print(f"tfrun: could not requeue job {self.job}: {failure}", file=sys.stderr, flush=True)

    def run(self) -> None:
        # SIGTERM: Slurm is ending this attempt (requeue, cancel, time limit). submitit
        # would ignore it; here it means: start nothing more, mark nothing as failed.
        for sig in (*preempt.SIGNALS, signal.SIGTERM):
            signal.signal(sig, self.on_signal)
        while self.pending or self.running:
            self.reap()
            if self.stop:
                self.wind_down()
                return
            while self.pending and len(self.running) < self.slots:
                self.start(self.pending.pop(0))
            time.sleep(POLL_S)


def run_pack(run_dirs: list[str], slots: int) -> None:
    """What each array element runs (pickled by submitit, in the batch shell)."""
    _Runner(run_dirs, slots).run()


def submit(groups: Sequence[Sequence[Plan]], folder: str) -> list[str]:
    """One array element per pack (arrays split at MaxArraySize)."""
    first = groups[0][0]
    params = packing.allocation_parameters(first)
    executor = slurm._executor(folder, params, deps.python_words(first))
    slots = int(first.compute.get("pack_slots") or 1)
    ids: list[str] = []
    chunk = max(1, sbatch.max_array_size())
    for start in range(0, len(groups), chunk):
        part = groups[start:start + chunk]
        try:
            with executor.batch():
                jobs = [executor.submit(run_pack, [p.run_dir for p in g], slots) for g in part]
        except Exception as exc:  # sbatch's message inside
            slurm.cancel(ids)
            raise slurm._rejected(exc) from exc
        ids += [str(job.job_id) for job in jobs]
    return ids


def point_state(run_dir: str | os.PathLike[str], job_state: str) -> str:
    """A packed point's state: its own, until its allocation ended without finishing it."""
    status = rundir.read_status(run_dir)
    state = status.get("state", "PENDING")
    if state in rundir.FINAL_STATES or job_state not in rundir.FINAL_STATES:
        return state
    state = job_state if job_state != "COMPLETED" else "FAILED"
    rundir.update_status(run_dir, state=state, ended=time.time(),
                         reason=f"its allocation {status.get('job_ids', ['?'])[-1]} ended ({job_state}) before it finished")
    return state


def cancel_point(run_dir: Path) -> None:
    """Cancel one point of a pack: never start it, or end its job step; the others go on."""
    (run_dir / CANCEL_MARKER).touch()
    steps = {(r.get("job"), r.get("step")) for r in rundir.rank_records(run_dir).values()
             if r.get("ended") is None and r.get("job") and r.get("step") is not None}
    for job, step in steps:
        subprocess.run(["scancel", f"{job}.{step}"], capture_output=True, text=True, timeout=60)
    if not steps and rundir.read_status(run_dir).get("state") in ("PENDING", None):
        rundir.update_status(run_dir, state="CANCELLED", ended=time.time(), reason="cancelled with tfrun cancel")


def follow(plans: Sequence[Plan], by_dir: dict[str, str], poll_s: float) -> list[str]:
    """Until every point is final: one sacct per poll for the allocations, the points' own status files."""
    shown, final = "", {}
    view = progress.sweep_view()
    try:
        while len(final) < len(plans):
            info = slurm.query(set(by_dir.values()))
            states = {}
            for plan in plans:
                job_state = slurm.tfrun_state(info.get(by_dir[plan.run_dir], {}).get("State", "PENDING"))
                state = point_state(plan.run_dir, job_state)
                states[plan.run_dir] = state
                if state in rundir.FINAL_STATES:
                    final[plan.run_dir] = state
            shown = slurm.show_sweep(view, plans, states, shown)
            if len(final) < len(plans):
                time.sleep(poll_s)
    finally:
        if view is not None:
            view.close()
    if sys.stderr.isatty() and view is None:
        print(file=sys.stderr)
    return [final[p.run_dir] for p in plans]


def run_packed(plans: Sequence[Plan], sweep_dir: str) -> list[str]:
    """Submit a sweep as packed allocations and, unless compute.wait=false, follow its points."""
    if len(sbatch.parameter_groups(plans)) > 1:
        raise ConfigError.invalid("compute.pack_size", plans[0].compute.get("pack_size"),
                                  "a sweep whose points all ask for the same Slurm resources (this one varies them)")
    groups = packing.packs(plans)
    folder = os.path.join(sweep_dir, sbatch.SUBMITIT_DIR)
    with progress.busy(f"submitting {len(plans)} run(s) packed into {len(groups)} job(s)"):
        for plan in plans:
            slurm._prepare(plan)
            deps.prepare(plan)
        job_ids = submit(groups, folder)
    now = time.time()
    by_dir = {}
    for group, job_id in zip(groups, job_ids):
        for plan in group:
            by_dir[plan.run_dir] = job_id
            rundir.update_status(plan.run_dir, run_id=plan.run_id, state="PENDING", target="slurm", packed=True,
                                 submitit_folder=folder, backend=plan.backend, job_ids=[job_id], submitted=now,
                                 started=None, ended=None, world_size=len(plan.tasks))
    array = sorted({j.split("_")[0] for j in job_ids})
    print(f"tfrun: submitted {len(plans)} run(s) packed into {len(job_ids)} job(s) (array {', '.join(array)}); "
          f"sweep dir {sweep_dir}", file=sys.stderr, flush=True)
    if not plans[0].compute["wait"]:
        slurm._detached(array, sweep_dir)
        return ["PENDING"] * len(plans)
    try:
        return follow(plans, by_dir, plans[0].compute["poll_s"])
    except KeyboardInterrupt:
        slurm._detached(array, sweep_dir)
        return ["DETACHED"] * len(plans)
