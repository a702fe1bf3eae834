"""Warm pools (issue 37): sweep points and tuning trials fed to slots held in few Slurm
allocations (or on this machine), each item in a fresh process started from a warm interpreter.
Real Slurm jobs on the local cluster, real processes; every job a test submits has a name of its
own and is cancelled by that name at the end (the cluster is shared: nothing else is touched)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.helpers import NodePair, accounted, popen_tfrun, read_json, run_tfrun, stop, text_of, wait_for

POINT = """
import argparse, os, time
p = argparse.ArgumentParser(); p.add_argument("--i", type=int); p.add_argument("--sleep", type=float, default=0)
a = p.parse_args()
open(os.path.join(os.environ["TFRUN_OUTPUT_DIR"], "started"), "a").write(f"{time.time()}\\n")
open(os.path.join(os.environ["TFRUN_OUTPUT_DIR"], "gpus"), "w").write(os.environ.get("CUDA_VISIBLE_DEVICES", "-"))
time.sleep(a.sleep)
if a.i == 13:
    raise SystemExit(3)
print("point", a.i, "done")
"""
# One trial per mode, one slot: numpy is imported ahead by the slot's warm interpreter, so a
# trial that marks it would leave the mark for the next one if they shared a process.
MODES = """
import argparse, ctypes, os, signal, time
import numpy
from tfrun.tracking.metrics import log_epoch
p = argparse.ArgumentParser(); p.add_argument("--mode"); a = p.parse_args()
out = os.environ["TFRUN_OUTPUT_DIR"]
seen = getattr(numpy, "_marked_by", None)
with open(os.path.join(out, "process.txt"), "w") as f:
    f.write(f"{os.getpid()} {os.getppid()} {seen} {'numpy' in __import__('sys').modules}\\n")
if a.mode == "mark":
    numpy._marked_by = os.getpid()
if a.mode == "crash":
    os.kill(os.getpid(), signal.SIGSEGV)
if a.mode == "exit":
    os._exit(7)
log_epoch(0, {"score": 1.0 if a.mode == "check" else 0.5})
"""
# Epochs of `secs`; the progress so far is kept in the run's outputs, so an attempt that comes
# back after a preemption resumes where the last one stopped.
RESUMING = """
import argparse, json, os, time
from tfrun.tracking.metrics import log_epoch
p = argparse.ArgumentParser(); p.add_argument("--q", type=float); p.add_argument("--epochs", type=int, default=12)
p.add_argument("--secs", type=float, default=1.0); a = p.parse_args()
out = os.environ["TFRUN_OUTPUT_DIR"]
state = os.path.join(out, "progress.json")
done = json.load(open(state))["epochs"] if os.path.exists(state) else 0
with open(os.path.join(out, "starts"), "a") as f:
    f.write(f"{done}\\n")
for e in range(done, a.epochs):
    time.sleep(a.secs)
    log_epoch(e, {"score": a.q * (e + 1) / a.epochs})
    with open(state + ".tmp", "w") as f:
        json.dump({"epochs": e + 1}, f)
    os.replace(state + ".tmp", state)
"""
HOROVOD_SUM = """
import argparse, os
p = argparse.ArgumentParser(); p.add_argument("--i", type=int); a = p.parse_args()
import horovod.tensorflow as hvd
import tensorflow as tf
hvd.init()
total = float(hvd.allreduce(tf.constant(float(hvd.rank() + 1)), op=hvd.Sum))
with open(os.path.join(os.environ["TFRUN_OUTPUT_DIR"], "sum-rank" + os.environ["TFRUN_RANK"]), "w") as f:
    f.write(f"{total} {hvd.size()} {os.getppid()}")
"""
TUNE = ("-m", "hydra/sweeper=tfrun", "tfrun.objective=score")


def sweep_dir(tmp_path: Path) -> Path:
    found = sorted((tmp_path / "runs").glob("sweep-*"))
    assert len(found) == 1, found
    return found[0]


def statuses(sweep: Path) -> dict[str, dict]:
    return {
        p.name: json.loads((p / "status.json").read_text())
        for p in sweep.iterdir()
        if (p / "plan.json").exists() and (p / "status.json").exists()
    }


def allocations(sweep: Path) -> list[str]:
    return read_json(sweep / "pool" / "allocations.json")


def stopped_while_running(sweep: Path, points: list[str]) -> int:
    """Each point of a sweep run by the POINT script ran to completion once: each script start
    (``outputs/started``) lies in an attempt of its point, at most one in each; every attempt
    but the point's last was interrupted (requeued, or put back in the queue), and its last
    completed, with one start. How many attempts were stopped while their script ran: a stop
    may also come between an item's start and its script's, an attempt with no start in it."""
    stopped = 0
    for n in points:
        starts = [float(t) for t in (sweep / n / "outputs" / "started").read_text().split()]
        attempts = sorted(read_json(sweep / n / "attempts.json").values(), key=lambda a: a["started"])
        within = [[t for t in starts if a["started"] <= t <= a["ended"]] for a in attempts]
        assert sum(map(len, within)) == len(starts) and all(len(w) <= 1 for w in within), (n, starts, attempts)
        assert [bool(a.get("requeued")) for a in attempts] == [True] * (len(attempts) - 1) + [False], (n, attempts)
        assert attempts[-1]["reason"] == "completed" and len(within[-1]) == 1, (n, starts, attempts)
        stopped += sum(1 for w in within[:-1] if w)
    return stopped


def trials(sweep: Path) -> dict[int, dict]:
    """Trial number -> its point in sweep.json, with its status: none yet ({}) for a trial the
    study has recorded and not yet handed to the pool (a point is recorded, PENDING in
    sweep.json, before its run's status is first written; tfrun's readers take it so too)."""
    return {
        p["trial"]: {**p, "status": status_of(Path(p["run_dir"]))} for p in read_json(sweep / "sweep.json")["points"]
    }


def status_of(run_dir: Path) -> dict:
    path = run_dir / "status.json"
    return read_json(path) if path.exists() else {}


def final_tells(sweep: Path) -> dict[int, list[int]]:
    """Trial id -> the final states written to the study's journal for it (Optuna's op 6:
    1 COMPLETE, 2 PRUNED, 3 FAIL): a trial told twice would have two."""
    told: dict[int, list[int]] = {}
    for line in (sweep / "study.journal").read_text().splitlines():
        op = json.loads(line)
        if op.get("op_code") == 6 and op.get("state") in (1, 2, 3):
            told.setdefault(op["trial_id"], []).append(op["state"])
    return told


def job_state(job: str) -> str:
    out = subprocess.run(
        ["sacct", "-j", job, "-X", "-n", "-P", "-o", "State"], capture_output=True, text=True, timeout=60
    ).stdout.split()
    return out[0] if out else ""


def queued_jobs(name: str) -> list[str]:
    return subprocess.run(
        ["squeue", "-h", f"--name={name}", "-o", "%i"], capture_output=True, text=True, timeout=60
    ).stdout.split()


# --- packed sweeps: a pool of compute.pack_size points per allocation ------------------------


@pytest.mark.slurm
@pytest.mark.slow
def test_forty_points_in_four_allocations_one_failing(tmp_path: Path, job_name: str) -> None:
    (tmp_path / "point.py").write_text(POINT)
    result = run_tfrun(
        tmp_path,
        "-m",
        "compute=slurm",
        "compute.pack_size=10",
        "compute.poll_s=1",
        f"compute.job_name={job_name}",
        "entry.script=point.py",
        "trainer.i=range(0,40)",
        timeout=600,
    )
    assert result.returncode == 1, result.stderr  # one point failed on purpose
    assert "1 sweep point(s) did not complete" in result.stderr and "/13" in result.stderr
    sweep = sweep_dir(tmp_path)
    found = statuses(sweep)
    assert len(found) == 40
    assert sorted(n for n, s in found.items() if s["state"] != "COMPLETED") == ["13"]
    assert found["13"]["state"] == "FAILED" and found["13"]["failed_rank"] == 0
    assert "exit code 3" in found["13"]["reason"]
    jobs = allocations(sweep)
    assert len(jobs) == 4 and len({j.split("_")[0] for j in jobs}) == 1, jobs  # one array of ceil(40/10)
    array = jobs[0].split("_")[0]
    assert set(accounted(array, 4).values()) == {"COMPLETED"}
    # A slot is one job step for the allocation's life, not one per point.
    steps = subprocess.run(
        ["sacct", "-j", array, "-n", "-P", "-o", "JobID"], capture_output=True, text=True, timeout=60
    ).stdout.split()
    assert len([s for s in steps if s.split(".")[-1].isdigit()]) <= 4, steps
    for point_name, status in found.items():
        point = sweep / point_name
        assert (point / ".hydra" / "config.yaml").exists() and (point / "logs" / "rank0.log").exists()
        assert json.loads((point / "ranks" / "0.json").read_text())["exit_code"] == (3 if point_name == "13" else 0)
        assert status["allocation"] in jobs
    shown = run_tfrun(tmp_path, "status", str(sweep))
    assert shown.stdout.count("COMPLETED") == 39 and shown.stdout.count("FAILED") == 1


def test_dry_run_shows_the_pool(tmp_path: Path) -> None:
    (tmp_path / "point.py").write_text(POINT)
    result = run_tfrun(
        tmp_path,
        "--dry-run=json",
        "-m",
        "compute=slurm",
        "compute.pack_size=4",
        "compute.pack_slots=2",
        "entry.script=point.py",
        "trainer.i=range(0,10)",
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["arrays"] == [] and found["pool"]["pool"]["allocations"] == 3 and found["pool"]["pool"]["slots"] == 2
    assert (
        "#SBATCH --array=0-2%3" in found["pool"]["sbatch"] and "#SBATCH --ntasks-per-node=2" in found["pool"]["sbatch"]
    )
    assert "\nsrun " not in found["pool"]["sbatch"] and "#SBATCH --signal=USR2@" in found["pool"]["sbatch"]
    assert found["pool"]["slot_step"].startswith("srun --exact --nodes=1 --ntasks=1 ")
    assert "-m tfrun.targets.pool.agent" in found["pool"]["slot_step"]
    text = run_tfrun(
        tmp_path,
        "--dry-run",
        "-m",
        "compute=slurm",
        "compute.pack_size=4",
        "compute.pack_slots=2",
        "entry.script=point.py",
        "trainer.i=range(0,10)",
    ).stdout
    assert "pool: 3 Slurm allocation(s) of 2 slot(s)" in text and "each slot:  srun --exact" in text
    assert not (tmp_path / "runs").exists()


@pytest.mark.slurm
@pytest.mark.slow
def test_points_side_by_side(tmp_path: Path, job_name: str) -> None:
    (tmp_path / "point.py").write_text(POINT)
    # The local nodes have 2 CPUs and 2 GPUs: 2 single-task points side by side in a 2-task
    # allocation, each slot with a GPU of its own.
    result = run_tfrun(
        tmp_path,
        "-m",
        "compute=slurm",
        "compute.pack_size=2",
        "compute.pack_slots=2",
        "compute.gpus_per_node=1",
        "compute.poll_s=1",
        f"compute.job_name={job_name}",
        "entry.script=point.py",
        "trainer.i=range(0,2)",
        "trainer.sleep=8",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    sweep = sweep_dir(tmp_path)
    starts = [float((sweep / str(i) / "outputs" / "started").read_text()) for i in range(2)]
    assert abs(starts[1] - starts[0]) < 6, f"points ran one after another: {starts}"
    gpus = sorted((sweep / str(i) / "outputs" / "gpus").read_text() for i in range(2))
    assert gpus == ["0", "1"], gpus
    too_wide = run_tfrun(
        tmp_path,
        "-m",
        "compute=slurm",
        "compute.pack_size=4",
        "compute.pack_slots=4",
        f"compute.job_name={job_name}",
        "entry.script=point.py",
        "trainer.i=range(0,4)",
    )
    assert too_wide.returncode == 2 and "Slurm rejected the job" in too_wide.stderr, too_wide.stderr
    assert "compute.pack_slots" in too_wide.stderr and "Traceback" not in too_wide.stderr
    assert queued_jobs(job_name) == []


@pytest.mark.slurm
@pytest.mark.slow
def test_a_slots_step_gets_its_cpus_per_task(tmp_path: Path, job_name: str) -> None:
    """compute.cpus_per_task reaches each slot's own job step, on every Slurm release: 22.05's
    srun gives an --exact step one CPU per task unless told (24.11's takes the allocation's)."""
    (tmp_path / "point.py").write_text(POINT)
    result = run_tfrun(
        tmp_path,
        "-m",
        "compute=slurm",
        "compute.pack_size=2",
        "compute.cpus_per_task=2",
        "compute.poll_s=1",
        f"compute.job_name={job_name}",
        "entry.script=point.py",
        "trainer.i=range(0,2)",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    sweep = sweep_dir(tmp_path)
    for point in ("0", "1"):
        rank = read_json(sweep / point / "ranks" / "0.json")
        step = f"{rank['job']}.{rank['step']}"
        out = subprocess.run(
            ["sacct", "-n", "-P", "-j", step, "-o", "JobID,AllocCPUS"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        cpus = dict(line.split("|") for line in out.splitlines() if "|" in line)
        assert list(cpus.values()) == ["2"], (step, out)


@pytest.mark.slurm
@pytest.mark.slow
def test_a_preempted_pack_is_requeued_once_and_runs_only_its_unfinished_points(
    tmp_path: Path, job_name: str, preempt_nodes: NodePair
) -> None:
    """Preempted in a partition like "low" (PreemptMode=REQUEUE): the running point stops, the
    allocation is requeued once (by tfrun before Slurm 24.11, by Slurm as it ends from 24.11
    on: requeued by both, it would be requeued again at its next end) and its next attempt
    runs the points not yet finished."""
    (tmp_path / "point.py").write_text(POINT)
    try:
        result = run_tfrun(
            tmp_path,
            "-m",
            "compute=slurm",
            "compute.pack_size=3",
            f"compute.partition={preempt_nodes.low}",
            f"compute.nodelist={preempt_nodes.first}",
            f"compute.job_name={job_name}",
            "compute.wait=false",
            "entry.script=point.py",
            "trainer.i=range(0,3)",
            "trainer.sleep=10",
        )
        assert result.returncode == 0, result.stderr
        sweep = sweep_dir(tmp_path)
        wait_for(lambda: (sweep / "0" / "outputs" / "started").exists(), 300, "the first point to start")
        preempt_nodes.preempt(preempt_nodes.first, job_name=job_name)
        allocation = allocations(sweep)[0]

        def ended() -> bool:
            run_tfrun(tmp_path, "status", str(sweep))
            return all(s.get("state") in ("COMPLETED", "FAILED", "CANCELLED") for s in statuses(sweep).values())

        wait_for(ended, 600, "every point to end")
    finally:
        subprocess.run(["scancel", f"--name={job_name}"], capture_output=True, timeout=60)
    found = statuses(sweep)
    assert all(s["state"] == "COMPLETED" for s in found.values()), found
    runs = {n: len((sweep / n / "outputs" / "started").read_text().splitlines()) for n in found}
    assert runs == {"0": 2, "1": 1, "2": 1}, runs  # the stopped point again; the others once
    job = subprocess.run(["scontrol", "show", "job", allocation], capture_output=True, text=True, timeout=60).stdout
    assert re.search(r"\bRestarts=1\b", job), job  # requeued once, and not again at its end


@pytest.mark.slurm
@pytest.mark.slow
def test_cancel_of_a_point_after_its_allocation_was_requeued_ends_that_point(
    tmp_path: Path, job_name: str, preempt_nodes: NodePair
) -> None:
    """Point 1 runs when the allocation is preempted and requeued; in the next attempt it runs
    again (as another job step than before) and is cancelled: it ends CANCELLED and the point
    after it runs all the same. A cancel names the point, never a job step of another attempt."""
    (tmp_path / "point.py").write_text(POINT)
    try:
        result = run_tfrun(
            tmp_path,
            "-m",
            "compute=slurm",
            "compute.pack_size=3",
            f"compute.partition={preempt_nodes.low}",
            f"compute.nodelist={preempt_nodes.first}",
            f"compute.job_name={job_name}",
            "compute.wait=false",
            "entry.script=point.py",
            "trainer.i=range(0,3)",
            "trainer.sleep=12",
        )
        assert result.returncode == 0, result.stderr
        sweep = sweep_dir(tmp_path)
        wait_for(lambda: (sweep / "1" / "outputs" / "started").exists(), 300, "the second point to start")
        preempt_nodes.preempt(preempt_nodes.first, job_name=job_name)

        def again() -> bool:
            started = sweep / "1" / "outputs" / "started"
            return len(started.read_text().splitlines()) >= 2 and statuses(sweep)["1"].get("state") == "RUNNING"

        wait_for(again, 300, "the second point to run again in the requeued allocation")
        assert run_tfrun(tmp_path, "cancel", str(sweep / "1")).returncode == 0
        wait_for(
            lambda: all(s.get("state") in ("COMPLETED", "FAILED", "CANCELLED") for s in statuses(sweep).values()),
            300,
            "every point to end",
        )
    finally:
        subprocess.run(["scancel", f"--name={job_name}"], capture_output=True, timeout=60)
    found = statuses(sweep)
    assert [found[n]["state"] for n in ("0", "1", "2")] == ["COMPLETED", "CANCELLED", "COMPLETED"], found
    assert found["1"]["ended"] < found["2"]["ended"]


@pytest.mark.slurm
@pytest.mark.slow
def test_cancel_one_point_leaves_the_others(tmp_path: Path, job_name: str) -> None:
    (tmp_path / "point.py").write_text(POINT)
    result = run_tfrun(
        tmp_path,
        "-m",
        "compute=slurm",
        "compute.pack_size=3",
        "compute.wait=false",
        f"compute.job_name={job_name}",
        "entry.script=point.py",
        "trainer.i=range(0,3)",
        "trainer.sleep=8",
    )
    assert result.returncode == 0, result.stderr
    sweep = sweep_dir(tmp_path)
    wait_for(lambda: statuses(sweep).get("0", {}).get("state") == "RUNNING", 120, "the first point to run")
    assert run_tfrun(tmp_path, "cancel", str(sweep / "2")).returncode == 0  # not started yet
    wait_for(lambda: (sweep / "0" / "outputs" / "started").exists(), 60, "the first point's script to start")
    assert run_tfrun(tmp_path, "cancel", str(sweep / "0")).returncode == 0  # running
    wait_for(
        lambda: all(s["state"] in ("COMPLETED", "FAILED", "CANCELLED") for s in statuses(sweep).values()),
        180,
        "every point to end",
    )
    found = statuses(sweep)
    assert (found["0"]["state"], found["1"]["state"], found["2"]["state"]) == ("CANCELLED", "COMPLETED", "CANCELLED")
    assert not (sweep / "2" / "logs" / "rank0.log").exists()
    # The cancelled point's process ended in its slot, which then ran the next point.
    assert found["1"]["slot"] == found["0"]["slot"] and found["1"]["started"] < found["0"]["ended"] + 5


@pytest.mark.slurm
@pytest.mark.slow
def test_time_limit_reruns_only_unfinished_points(tmp_path: Path, job_name: str) -> None:
    """A 1-minute allocation for 6 points of 12 s, one slot: the warning comes before the
    points are done, the running point stops and goes back to the queue, the allocation is
    requeued, and its next attempt runs only the points not finished. (Slurm checks time
    limits about every 30 s, so a warning asked for 30 s before the limit may come up to a
    minute early, or only as the limit nears: max_requeues is raised so that each attempt's
    early warning is one more requeue, and the points' 72 s of work outlast the allocation,
    wherever the warning falls.)"""
    (tmp_path / "point.py").write_text(POINT)
    result = run_tfrun(
        tmp_path,
        "-m",
        "compute=slurm",
        "compute.pack_size=6",
        "compute.timeout_min=1",
        "compute.signal_delay_s=30",
        "compute.max_requeues=10",
        "compute.poll_s=1",
        f"compute.job_name={job_name}",
        "entry.script=point.py",
        "trainer.i=range(0,6)",
        "trainer.sleep=12",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    sweep = sweep_dir(tmp_path)
    found = statuses(sweep)
    assert all(s["state"] == "COMPLETED" for s in found.values()), found
    requeues = sum(1 for n in found for a in read_json(sweep / n / "attempts.json").values() if a.get("requeued"))
    assert requeues >= 1, "the time limit never came"
    assert len(allocations(sweep)) == 1  # the same allocation, requeued
    # One point at a time: a requeue stops the running point, which runs again; no finished
    # point runs twice.
    assert stopped_while_running(sweep, list(found)) >= 1, "no point was stopped while it ran"


@pytest.mark.slurm
@pytest.mark.slow
def test_an_allocation_out_of_requeues_is_followed_by_another(tmp_path: Path, job_name: str) -> None:
    """compute.max_requeues=0: the allocation that gets the time-limit warning is not requeued;
    the points it held go back to the queue and the follower starts another allocation for them.
    The points' 72 s of work outlast the 1-minute allocation, wherever the warning falls (see
    test_time_limit_reruns_only_unfinished_points)."""
    (tmp_path / "point.py").write_text(POINT)
    result = run_tfrun(
        tmp_path,
        "-m",
        "compute=slurm",
        "compute.pack_size=6",
        "compute.timeout_min=1",
        "compute.signal_delay_s=30",
        "compute.max_requeues=0",
        "compute.poll_s=1",
        f"compute.job_name={job_name}",
        "entry.script=point.py",
        "trainer.i=range(0,6)",
        "trainer.sleep=12",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    sweep = sweep_dir(tmp_path)
    found = statuses(sweep)
    assert all(s["state"] == "COMPLETED" for s in found.values()), found
    jobs = allocations(sweep)
    assert len(jobs) >= 2, jobs
    first = read_json(sweep / "pool" / "allocations" / f"{jobs[0]}.json")
    assert first["why"] == "timeout" and first["state"] == "ended", first
    assert "pool: started allocation(s)" in result.stderr, result.stderr
    stopped_while_running(sweep, list(found))  # no finished point ran again


def test_an_item_put_back_at_a_time_limit_waits_for_the_follower_not_failed(tmp_path: Path) -> None:
    """The moment between an allocation's coordinator ending at its time limit (its unfinished
    item back in the queue, itself "ended") and Slurm ending the job: the pool's follower starts
    another allocation for the item, so a refresh meanwhile (the follower's own, or ``tfrun
    status``) must leave it waiting. Once the follower is gone (a detached sweep), the refresh
    settles it as its allocation ended."""
    from tfrun import rundir
    from tfrun.plan.pools import PoolSpec
    from tfrun.targets.pool import refresh_items
    from tfrun.targets.pool.store import PoolStore

    store = PoolStore(tmp_path / "pool")
    store.create(
        PoolSpec(
            target="slurm",
            allocations=1,
            slots=1,
            nodes=1,
            tasks_per_node=1,
            backend="none",
            python=[sys.executable],
            warm="fork",
            preload=[],
            env={},
            idle_timeout_s=60.0,
            compute={},
        )
    )
    run_dir = tmp_path / "point"
    run_dir.mkdir()
    rundir.update_status(run_dir, state="PENDING", target="slurm")
    store.feed([str(run_dir)])
    store.close()
    store.add_allocations(["901"])
    item = store.claim("901")
    assert item is not None
    store.release(item)  # what the coordinator does at the time-limit warning, before it ends
    store.write_state("901", state="ended", why="timeout")
    sacct = {"901": {"State": "RUNNING"}}

    def refreshed() -> dict:
        status = rundir.read_status(run_dir)
        refresh_items([(run_dir, status)], sacct)
        return rundir.read_status(run_dir)

    store.follow()  # this process follows the pool, as a sweep's tfrun does
    assert refreshed()["state"] == "PENDING" and store.queued() == [item.id]
    # a follower that has exited (on this host: its process is gone) starts nothing more
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from tfrun.targets.pool.store import PoolStore; PoolStore(sys.argv[1]).follow()",
            str(store.path),
        ],
        check=True,
        timeout=60,
    )
    after = refreshed()
    assert after["state"] == "FAILED" and "901 ended (RUNNING) before it ran" in after["reason"], after
    assert store.queued() == []


# --- tuning studies in a pool -----------------------------------------------------------------


@pytest.mark.slurm
@pytest.mark.slow
def test_trials_start_fresh_in_one_warm_slot_that_survives_a_crash_and_os_exit(tmp_path: Path, job_name: str) -> None:
    """One slot, four trials in the order written: the first marks a module its slot imported
    ahead, the next segfaults, the next calls os._exit, the last looks for the mark. Each ran in
    its own process forked by the same agent, so the mark is not seen and the slot lives on."""
    (tmp_path / "modes.py").write_text(MODES)
    result = run_tfrun(
        tmp_path,
        *TUNE,
        "compute=slurm",
        f"compute.job_name={job_name}",
        "entry.script=modes.py",
        "hydra.sweeper.sampler=grid",
        "hydra.sweeper.max_parallel=1",
        "trainer.mode=choice(mark,crash,exit,check)",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = sweep_dir(tmp_path)
    found = trials(sweep)
    states = [found[n]["status"]["state"] for n in range(4)]
    assert states == ["COMPLETED", "FAILED", "FAILED", "COMPLETED"], found
    assert found[1]["status"]["reason"] == "killed by SIGSEGV", found[1]["status"]
    assert found[2]["status"]["reason"] == "exit code 7" and found[2]["status"]["exit_codes"] == {"0": 7}
    seen = [(Path(found[n]["run_dir"]) / "outputs" / "process.txt").read_text().split() for n in range(4)]
    pids, parents = [s[0] for s in seen], {s[1] for s in seen}
    assert len(set(pids)) == 4 and len(parents) == 1, seen  # four processes, one agent: the same slot
    assert seen[3][2] == "None" and seen[0][3] == "True", seen  # numpy was there, the mark was not
    job = found[0]["status"]["allocation"]
    assert allocations(sweep) == [job]  # one allocation for the study
    assert final_tells(sweep) == {0: [1], 1: [3], 2: [3], 3: [1]}
    # Its work done, the pool's allocation ends at once rather than holding its node.
    accounted(job)
    end = subprocess.run(
        ["sacct", "-j", job, "-X", "-n", "-P", "-o", "End"], capture_output=True, text=True, timeout=60
    ).stdout.strip()
    assert time.mktime(time.strptime(end, "%Y-%m-%dT%H:%M:%S")) - found[3]["status"]["ended"] < 10, end


@pytest.mark.slurm
@pytest.mark.slow
def test_a_preempted_pool_resumes_its_trials_none_lost_none_told_twice(
    tmp_path: Path, job_name: str, preempt_nodes: NodePair
) -> None:
    """A study of four 12-epoch trials in a partition like low, two at a time. Mid-way, a job of
    a higher tier takes the pool's node: the running trials stop, go back to the queue, the
    allocation is requeued, and when it runs again they resume where they stopped. Every trial
    completes and is told to the study once."""
    (tmp_path / "resuming.py").write_text(RESUMING)
    proc, _, err = popen_tfrun(
        tmp_path,
        *TUNE,
        "compute=slurm",
        f"compute.partition={preempt_nodes.low}",
        f"compute.job_name={job_name}",
        "compute.poll_s=0.5",
        "entry.script=resuming.py",
        "hydra.sweeper.sampler=grid",
        "hydra.sweeper.max_parallel=2",
        "trainer.q=choice(0.6,0.7,0.8,0.9)",
    )
    try:

        def two_mid_way() -> bool:
            runs = list((tmp_path / "runs").glob("sweep-*/[0-9]/outputs/progress.json"))
            return len([p for p in runs if read_json(p)["epochs"] >= 3]) >= 2

        wait_for(two_mid_way, 180, f"two trials mid-way:\n{text_of(err)}")
        sweep = sweep_dir(tmp_path)
        job = allocations(sweep)[0]
        node = subprocess.run(
            ["squeue", "-h", "-j", job, "-o", "%N"], capture_output=True, text=True, timeout=60
        ).stdout.strip()
        assert node, f"the pool's allocation {job} is not running"
        subprocess.run(
            [
                "sbatch",
                "-p",
                preempt_nodes.partition,
                "-w",
                node,
                "-n",
                "2",
                f"--job-name={job_name}-preemptor",
                "-o",
                "/dev/null",
                "--wrap",
                "sleep 2",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        proc.wait(timeout=300)
    finally:
        stop(proc)
    assert proc.returncode == 0, text_of(err)[-3000:]
    found = trials(sweep)
    assert sorted(found) == [0, 1, 2, 3] and all(t["status"]["state"] == "COMPLETED" for t in found.values()), found
    assert final_tells(sweep) == {n: [1] for n in range(4)}
    resumed = [t for t in found.values() if len((Path(t["run_dir"]) / "outputs/starts").read_text().split()) > 1]
    assert resumed, "no trial was interrupted"
    for trial in resumed:
        starts = [int(s) for s in (Path(trial["run_dir"]) / "outputs/starts").read_text().split()]
        assert starts[0] == 0 and starts[-1] > 0, starts  # it went on from its progress, not from the start
        attempts = read_json(Path(trial["run_dir"]) / "attempts.json").values()
        assert any(a.get("reason") == "preempted" and a.get("requeued") for a in attempts), attempts
        epochs = [
            json.loads(line)["epoch"]
            for line in (Path(trial["run_dir"]) / "metrics.jsonl").read_text().splitlines()
            if "epoch" in json.loads(line)
        ]
        assert sorted(set(epochs)) == list(range(12)), epochs
    assert allocations(sweep) == [job]  # requeued, not replaced


@pytest.mark.slurm
@pytest.mark.slow
def test_tune_resume_reattaches_to_the_running_pool(tmp_path: Path, job_name: str) -> None:
    """The follower is killed while the pool runs two trials; `tfrun tune resume` follows them
    in the same allocation and feeds it the rest: nothing runs twice, no new allocation."""
    (tmp_path / "resuming.py").write_text(RESUMING)
    proc, _, err = popen_tfrun(
        tmp_path,
        *TUNE,
        "compute=slurm",
        f"compute.job_name={job_name}",
        "compute.poll_s=0.5",
        "entry.script=resuming.py",
        "hydra.sweeper.sampler=grid",
        "trainer.epochs=6",
        "trainer.q=choice(0.6,0.7,0.8,0.9)",
    )
    try:
        wait_for(
            lambda: len(list((tmp_path / "runs").glob("sweep-*/[0-9]/outputs/progress.json"))) >= 2,
            180,
            f"two trials running:\n{text_of(err)}",
        )
    finally:
        proc.kill()  # SIGKILL: no chance to tidy up
        proc.wait()
    sweep = sweep_dir(tmp_path)
    job = allocations(sweep)[0]
    result = run_tfrun(tmp_path, "tune", "resume", sweep.name, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming the study" in result.stderr and "following it again" in result.stderr, result.stderr
    found = trials(sweep)
    assert sorted(found) == [0, 1, 2, 3] and all(t["status"]["state"] == "COMPLETED" for t in found.values()), found
    assert allocations(sweep) == [job] and {t["status"]["allocation"] for t in found.values()} == {job}
    assert all((Path(t["run_dir"]) / "outputs/starts").read_text().split() == ["0"] for t in found.values())
    assert final_tells(sweep) == {n: [1] for n in range(4)}


@pytest.mark.slurm
@pytest.mark.slow
def test_cancel_one_trial_then_the_study(tmp_path: Path, job_name: str) -> None:
    """`tfrun cancel` of one trial ends that trial's processes only (its slot takes the next
    trial); `tfrun cancel` of the study ends its pool's allocation and every trial left."""
    (tmp_path / "resuming.py").write_text(RESUMING)
    proc, _, err = popen_tfrun(
        tmp_path,
        *TUNE,
        "compute=slurm",
        f"compute.job_name={job_name}",
        "compute.poll_s=0.5",
        "entry.script=resuming.py",
        "hydra.sweeper.sampler=grid",
        "trainer.epochs=60",
        "trainer.q=choice(0.6,0.7,0.8,0.9)",
    )
    try:
        wait_for(
            lambda: len(list((tmp_path / "runs").glob("sweep-*/[0-9]/outputs/progress.json"))) >= 2,
            180,
            f"two trials running:\n{text_of(err)}",
        )
        sweep = sweep_dir(tmp_path)
        job = allocations(sweep)[0]
        assert run_tfrun(tmp_path, "cancel", str(sweep / "0")).returncode == 0
        wait_for(
            lambda: trials(sweep).get(2, {}).get("status", {}).get("state") == "RUNNING",
            60,
            f"the next trial in the freed slot:\n{text_of(err)}",
        )
        found = trials(sweep)
        assert found[0]["status"]["state"] == "CANCELLED" and found[1]["status"]["state"] == "RUNNING", found
        assert found[2]["status"]["slot"] == found[0]["status"]["slot"] and found[2]["status"]["allocation"] == job
        cancelled = run_tfrun(tmp_path, "cancel", str(sweep))
        assert cancelled.returncode == 0, cancelled.stderr
        proc.wait(timeout=60)  # the follower ends: its pool was stopped
    finally:
        stop(proc)
    assert accounted(job.split("_")[0])[job].startswith("CANCELLED")
    found = trials(sweep)
    assert {found[n]["status"]["state"] for n in (1, 2)} == {"CANCELLED"}, found
    assert allocations(sweep) == [job] and 3 not in found  # nothing was started after the study was cancelled
    wait_for(lambda: queued_jobs(job_name) == [], 60, "the pool's allocation to leave the queue")


@pytest.mark.slurm
@pytest.mark.slow
def test_an_idle_pool_ends_itself(tmp_path: Path, job_name: str) -> None:
    """The follower is killed: the pool finishes its trials, then, with nothing fed for
    hydra.sweeper.pool.idle_timeout_s, ends its allocation instead of holding it."""
    (tmp_path / "resuming.py").write_text(RESUMING)
    proc, _, err = popen_tfrun(
        tmp_path,
        *TUNE,
        "compute=slurm",
        f"compute.job_name={job_name}",
        "hydra.sweeper.pool.idle_timeout_s=5",
        "entry.script=resuming.py",
        "hydra.sweeper.sampler=grid",
        "trainer.epochs=4",
        "trainer.q=choice(0.6,0.7,0.8,0.9)",
    )
    try:
        wait_for(
            lambda: len(list((tmp_path / "runs").glob("sweep-*/[0-9]/outputs/starts"))) >= 2,
            180,
            f"two trials running:\n{text_of(err)}",
        )
    finally:
        proc.kill()
        proc.wait()
    sweep = sweep_dir(tmp_path)
    job = allocations(sweep)[0]
    state = accounted(job.split("_")[0], timeout=120)[job]
    assert state == "COMPLETED", state
    record = read_json(sweep / "pool" / "allocations" / f"{job}.json")
    assert record["why"] == "idle", record
    last = max(t["status"]["ended"] for t in trials(sweep).values() if t["status"].get("ended"))
    assert 5 <= record["ended"] - last < 15, (record, last)


@pytest.mark.slurm
@pytest.mark.slow
def test_two_rank_horovod_items_take_a_slot_of_their_shape(tmp_path: Path, job_name: str) -> None:
    """Items of 2 Horovod ranks: the slot is a 2-task job step whose agents both imported
    TensorFlow ahead; each item's ranks meet (size 2, sum 3) in processes of those agents."""
    (tmp_path / "hsum.py").write_text(HOROVOD_SUM)
    result = run_tfrun(
        tmp_path,
        "-m",
        "compute=slurm",
        "backend=horovod",
        "compute.tasks_per_node=2",
        "compute.pack_size=2",
        "compute.poll_s=1",
        f"compute.job_name={job_name}",
        "entry.script=hsum.py",
        "trainer.i=range(0,2)",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = sweep_dir(tmp_path)
    sums = [(sweep / str(i) / "outputs" / f"sum-rank{r}").read_text().split() for i in range(2) for r in range(2)]
    assert all(s[:2] == ["3.0", "2"] for s in sums), sums
    assert len({s[2] for s in sums}) == 2, sums  # two agents, one per rank, for both items
    log = text_of(next((sweep / "pool" / ".submitit").glob("*_log.out")))
    assert "slot 0 warm in" in log and "(tensorflow, tf_keras" in log, log


BAD = {
    "too big for the partition": (
        ["compute=slurm", "hydra.sweeper.max_parallel=8"],
        "the pool's allocation (8 slot(s) of 1 node(s) x 1 task(s)",
    ),
    "slots that do not divide": (
        ["compute=slurm", "hydra.sweeper.max_parallel=4", "hydra.sweeper.pool.allocations=3"],
        "hydra.sweeper.pool.allocations=3 does not divide hydra.sweeper.max_parallel=4",
    ),
    "slots that do not add up": (
        ["compute=slurm", "hydra.sweeper.max_parallel=4", "hydra.sweeper.pool.slots=3"],
        "the pool must have exactly max_parallel slots",
    ),
    "pack settings in a study": (
        ["compute=slurm", "compute.pack_size=4"],
        "compute.pack_size=4 packs the points of a grid sweep",
    ),
    "an unknown pool key": (
        ["compute=slurm", "+hydra.sweeper.pool.size=4"],
        "hydra.sweeper.pool.size=4 is not valid: a key of hydra.sweeper.pool",
    ),
    "several local allocations": (
        ["hydra.sweeper.pool.allocations=2"],
        "hydra.sweeper.pool.allocations=2 is not valid: 1 with compute=local",
    ),
}


@pytest.mark.slurm
def test_bad_pool_input_is_one_paragraph_exit_2_and_nothing_submitted(tmp_path: Path, job_name: str) -> None:
    (tmp_path / "point.py").write_text(POINT)
    for what, (args, expected) in BAD.items():
        owned = [f"compute.job_name={job_name}"] if "compute=slurm" in args else []
        result = run_tfrun(tmp_path, *TUNE, "entry.script=point.py", "trainer.i=choice(1,2)", *args, *owned)
        assert result.returncode == 2, (what, result.stderr)
        assert result.stderr.startswith("tfrun: error: ") and expected in result.stderr, (what, result.stderr)
        assert result.stderr.strip().count("\n") == 0, (what, result.stderr)
        assert not list((tmp_path / "runs").glob("*")), what
    varied = run_tfrun(
        tmp_path,
        "-m",
        "compute=slurm",
        "compute.pack_size=2",
        f"compute.job_name={job_name}",
        "entry.script=point.py",
        "trainer.i=1",
        "compute.tasks_per_node=1,2",
    )
    assert varied.returncode == 2 and "compute.tasks_per_node is 2" in varied.stderr, varied.stderr
    assert varied.stderr.strip().count("\n") == 0, varied.stderr
    assert queued_jobs(job_name) == [] and job_state(job_name) == ""


def test_dry_run_shows_the_study_pool_without_tensorflow(tmp_path: Path) -> None:
    (tmp_path / "tfscript.py").write_text("import tensorflow as tf\nfrom tfrun.tracking.metrics import log_epoch\n")
    code = (
        "import sys\nfrom tfrun.cli.main import main\n"
        "try:\n    main(['--dry-run', '-m', 'hydra/sweeper=tfrun', 'tfrun.objective=score', 'compute=slurm',"
        " 'hydra.sweeper.max_parallel=4', 'hydra.sweeper.pool.allocations=2', 'entry.script=tfscript.py',"
        " 'trainer.lr=choice(0.1,0.2)'])\nexcept SystemExit as exc:\n"
        "    assert not exc.code, exc.code\nprint('TENSORFLOW', 'tensorflow' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "TFRUN_RUNS_DIR": str(tmp_path / "runs")},
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "TENSORFLOW False" in out
    for line in (
        "pool: 2 Slurm allocation(s) of 2 slot(s); a slot is 1 node(s) x 1 task(s)",
        "warm:       tensorflow, keras imported ahead",
        "each slot:  srun --exact",
        "#SBATCH --ntasks-per-node=2",
        "#SBATCH --array=0-1%2",
    ):
        assert line in out, out
    assert not (tmp_path / "runs").exists()


# --- the local machine ------------------------------------------------------------------------


def test_a_local_sweep_runs_its_points_warm_one_after_another(tmp_path: Path) -> None:
    """A local sweep is a pool of one slot: every point a fresh process of the same warm agent
    (numpy imported ahead), its output shown as it comes; a crash or os._exit does not stop it."""
    (tmp_path / "modes.py").write_text(MODES)
    result = run_tfrun(tmp_path, "-m", "entry.script=modes.py", "trainer.mode=mark,crash,exit,check", timeout=180)
    assert result.returncode == 1, result.stderr  # two points failed on purpose
    sweep = sweep_dir(tmp_path)
    found = statuses(sweep)
    assert [found[str(i)]["state"] for i in range(4)] == ["COMPLETED", "FAILED", "FAILED", "COMPLETED"], found
    assert found["1"]["reason"] == "killed by SIGSEGV" and found["2"]["reason"] == "exit code 7"
    seen = [(sweep / str(i) / "outputs" / "process.txt").read_text().split() for i in range(4)]
    assert len({s[0] for s in seen}) == 4 and len({s[1] for s in seen}) == 1, seen
    assert seen[3][2] == "None" and seen[0][3] == "True", seen
    assert "tfrun: run sweep-" in result.stderr and result.stderr.count("tfrun: sweep point ") == 4
    assert "rank 0/1 on" in result.stdout  # each point's log, shown as it ran
    assert read_json(sweep / "pool" / "pool.json")["preload"] == ["numpy"]


# --- a busy cluster (scripts/busy-slurm) ------------------------------------------------------

BUSY = Path(__file__).resolve().parents[1] / "scripts" / "busy-slurm"


@pytest.fixture
def busy_cpu(tmp_path: Path, job_name: str) -> Iterator[float]:
    """Partition cpu made busy by another account's jobs (names of this test's own), 8 s each."""
    env = {**__import__("os").environ, "TFRUN_SLURM_DIR": str(tmp_path / "busy-state")}
    hold = 8.0
    command = [str(BUSY), "start", "--partition", "cpu", "--hold-s", str(hold), "--name", f"{job_name}-busy-"]
    started = subprocess.run(command, capture_output=True, text=True, timeout=200, env=env)
    assert started.returncode == 0, started.stderr
    try:
        yield hold
    finally:
        subprocess.run([str(BUSY), "stop"], capture_output=True, timeout=120, env=env)
        subprocess.run(["scancel", f"--name={job_name}-busy-node3"], capture_output=True, timeout=60)


@pytest.mark.slurm
@pytest.mark.slow
def test_on_a_busy_cluster_a_study_waits_for_its_pool_once(tmp_path: Path, job_name: str, busy_cpu: float) -> None:
    """Every new job waits for its turn (another account's jobs hold the node): the pool's one
    allocation waits, then its slot takes each trial at once, without a queue wait per trial."""
    probe = subprocess.run(
        ["sbatch", "--parsable", "-p", "cpu", f"--job-name={job_name}", "--output=/dev/null", "--wrap", "true"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    (tmp_path / "resuming.py").write_text(RESUMING)
    result = run_tfrun(
        tmp_path,
        *TUNE,
        "compute=slurm",
        "compute.partition=cpu",
        f"compute.job_name={job_name}",
        "compute.poll_s=0.5",
        "entry.script=resuming.py",
        "hydra.sweeper.sampler=grid",
        "hydra.sweeper.max_parallel=1",
        "trainer.epochs=2",
        "trainer.q=choice(0.6,0.7,0.8)",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    def waited(job: str) -> float:
        out = subprocess.run(
            ["sacct", "-j", job, "-X", "-n", "-P", "-o", "Submit,Start", "--noconvert"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.split("|")
        stamp = [time.mktime(time.strptime(t.strip(), "%Y-%m-%dT%H:%M:%S")) for t in out]
        return stamp[1] - stamp[0]

    accounted(probe)
    assert waited(probe) >= busy_cpu, "the cluster was not busy"
    sweep = sweep_dir(tmp_path)
    job = allocations(sweep)
    assert len(job) == 1 and waited(job[0]) >= busy_cpu  # the pool waited for its turn, once
    runs = sorted((t["status"] for t in trials(sweep).values()), key=lambda s: s["started"])
    assert [s["state"] for s in runs] == ["COMPLETED"] * 3
    gaps = [later["started"] - earlier["ended"] for earlier, later in zip(runs, runs[1:])]
    assert all(gap < 3 for gap in gaps), gaps  # each next trial at once, in the allocation already held


def test_an_item_pruned_while_it_waits_never_starts(tmp_path: Path) -> None:
    """The first point prunes the second while it waits in the queue (as a policy does to a trial
    put back in the queue by a preemption): the second is settled PRUNED without a process."""
    (tmp_path / "prune_next.py").write_text(
        "import argparse, json, os\nfrom pathlib import Path\n"
        "p = argparse.ArgumentParser(); p.add_argument('--i', type=int); a = p.parse_args()\n"
        "if a.i == 0:\n"
        "    nxt = Path(os.environ['TFRUN_RUN_DIR']).parent / '1'\n"
        "    (nxt / 'prune.json').write_text(json.dumps({'policy': 'median', 'epoch': 3, 'why': 'behind', 'trial': 1}))\n"
    )
    result = run_tfrun(tmp_path, "-m", "entry.script=prune_next.py", "trainer.i=0,1", timeout=120)
    sweep = sweep_dir(tmp_path)
    found = statuses(sweep)
    assert (found["0"]["state"], found["1"]["state"]) == ("COMPLETED", "PRUNED"), (found, result.stderr)
    assert found["1"]["pruned_epoch"] == 3 and not (sweep / "1" / "ranks").exists(), found["1"]
