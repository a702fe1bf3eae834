"""Sweeps packed into few Slurm allocations (compute.pack_size), on the local Slurm."""
from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.helpers import accounted, run_tfrun, slurm_release
from tfrun.task import preempt

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

POINT = '''
import argparse, os, time
p = argparse.ArgumentParser(); p.add_argument("--i", type=int); p.add_argument("--sleep", type=float, default=0)
a = p.parse_args()
open(os.path.join(os.environ["TFRUN_OUTPUT_DIR"], "started"), "a").write(f"{time.time()}\\n")
time.sleep(a.sleep)
if a.i == 13:
    raise SystemExit(3)
print("point", a.i, "done")
'''


def sweep_dir(tmp_path: Path) -> Path:
    return next((tmp_path / "runs").glob("sweep-*"))


def statuses(sweep: Path) -> dict[str, dict]:
    return {p.name: json.loads((p / "status.json").read_text()) for p in sweep.iterdir() if (p / "plan.json").exists()}


def test_forty_points_in_four_jobs_one_failing(tmp_path: Path) -> None:
    (tmp_path / "point.py").write_text(POINT)
    start = time.monotonic()
    result = run_tfrun(tmp_path, "-m", "compute=slurm", "compute.pack_size=10", "compute.poll_s=1",
                       "entry.script=point.py", "trainer.i=range(0,40)", timeout=900)
    assert result.returncode == 1, result.stderr  # one point failed on purpose
    assert "1 sweep point(s) did not complete" in result.stderr and "/13" in result.stderr
    sweep = sweep_dir(tmp_path)
    found = statuses(sweep)
    assert len(found) == 40
    assert sorted(n for n, s in found.items() if s["state"] != "COMPLETED") == ["13"]
    assert found["13"]["state"] == "FAILED" and found["13"]["failed_rank"] == 0
    assert "exit code 3" in found["13"]["reason"]
    array_ids = {s["job_ids"][-1].split("_")[0] for s in found.values()}
    assert len(array_ids) == 1
    array_id = array_ids.pop()
    jobs = accounted(array_id, 4)
    assert sorted(jobs) == [f"{array_id}_{i}" for i in range(4)] and set(jobs.values()) == {"COMPLETED"}, jobs
    # Every point is a complete run of its own.
    for name, status in found.items():
        point = sweep / name
        assert (point / ".hydra" / "config.yaml").exists() and (point / "logs" / "rank0.log").exists()
        assert json.loads((point / "ranks" / "0.json").read_text())["exit_code"] == (3 if name == "13" else 0)
    # `tfrun status` shows points, not allocations.
    shown = run_tfrun(tmp_path, "status", str(sweep))
    assert shown.stdout.count("COMPLETED") == 39 and shown.stdout.count("FAILED") == 1
    print(f"40 packed points: {time.monotonic() - start:.1f} s")


def test_dry_run_shows_the_packing(tmp_path: Path) -> None:
    (tmp_path / "point.py").write_text(POINT)
    result = run_tfrun(tmp_path, "--dry-run=json", "-m", "compute=slurm", "compute.pack_size=4",
                       "entry.script=point.py", "trainer.i=range(0,10)")
    assert result.returncode == 0, result.stderr
    arrays = json.loads(result.stdout)["arrays"]
    assert len(arrays) == 1
    assert [len(job["runs"]) for job in arrays[0]["jobs"]] == [4, 4, 2]
    assert "#SBATCH --array=0-2%3" in arrays[0]["sbatch"]
    assert "#SBATCH --signal=USR2@" in arrays[0]["sbatch"] and "\nsrun " not in arrays[0]["sbatch"]
    assert not (tmp_path / "runs").exists()


def test_points_side_by_side(tmp_path: Path) -> None:
    (tmp_path / "point.py").write_text(POINT)
    # The local nodes have 2 CPUs: 2 single-task points side by side in a 2-task allocation.
    result = run_tfrun(tmp_path, "-m", "compute=slurm", "compute.pack_size=2", "compute.pack_slots=2",
                       "compute.poll_s=1", "entry.script=point.py", "trainer.i=range(0,2)", "trainer.sleep=8",
                       timeout=600)
    assert result.returncode == 0, result.stderr
    sweep = sweep_dir(tmp_path)
    starts = [float((sweep / str(i) / "outputs" / "started").read_text()) for i in range(2)]
    assert abs(starts[1] - starts[0]) < 6, f"points ran one after another: {starts}"
    too_wide = run_tfrun(tmp_path, "-m", "compute=slurm", "compute.pack_size=4", "compute.pack_slots=4",
                         "entry.script=point.py", "trainer.i=range(0,4)")
    assert too_wide.returncode == 2 and "Slurm rejected the job" in too_wide.stderr
    assert "Traceback" not in too_wide.stderr


def test_a_points_step_gets_its_cpus_per_task(tmp_path: Path) -> None:
    """compute.cpus_per_task reaches each point's own job step, on every Slurm release: 22.05's
    srun gives a step one CPU per task unless told (24.11's takes the allocation's)."""
    (tmp_path / "point.py").write_text(POINT)
    result = run_tfrun(tmp_path, "-m", "compute=slurm", "compute.pack_size=2", "compute.cpus_per_task=2",
                       "compute.poll_s=1", "entry.script=point.py", "trainer.i=range(0,2)", timeout=600)
    assert result.returncode == 0, result.stderr
    sweep = sweep_dir(tmp_path)
    for point in ("0", "1"):
        rank = json.loads((sweep / point / "ranks" / "0.json").read_text())
        step = f"{rank['job']}.{rank['step']}"
        out = subprocess.run(["sacct", "-n", "-P", "-j", step, "-o", "JobID,AllocCPUS"], capture_output=True,
                             text=True, timeout=60, check=True).stdout
        cpus = dict(line.split("|") for line in out.splitlines() if "|" in line)
        assert list(cpus.values()) == ["2"], (step, out)


def test_a_preempted_pack_is_requeued_once_and_runs_only_its_unfinished_points(tmp_path: Path) -> None:
    """Preempted in partition "low" (PreemptMode=REQUEUE): the running point stops, the
    allocation is requeued once (by tfrun before Slurm 24.11, by Slurm as it ends from 24.11
    on) and its next attempt runs the points not yet finished."""
    (tmp_path / "point.py").write_text(POINT)
    name = f"tfrun-pack-{uuid.uuid4().hex[:8]}"
    try:
        result = run_tfrun(tmp_path, "-m", "compute=slurm", "compute.pack_size=3", "compute.partition=low",
                           "compute.nodelist=node1", f"compute.job_name={name}", "compute.wait=false",
                           "entry.script=point.py", "trainer.i=range(0,3)", "trainer.sleep=10")
        assert result.returncode == 0, result.stderr
        sweep = sweep_dir(tmp_path)
        deadline = time.monotonic() + 300
        while not (sweep / "0" / "outputs" / "started").exists():
            assert time.monotonic() < deadline, statuses(sweep)
            time.sleep(0.5)
        subprocess.run(["sbatch", "-p", "debug", "--exclusive", "-N1", "-w", "node1", f"--job-name={name}",
                        "-o", "/dev/null", "--wrap", "sleep 2"], check=True, capture_output=True, timeout=60)
        allocation = statuses(sweep)["0"]["job_ids"][-1]
        deadline = time.monotonic() + 600
        while any(s.get("state") not in ("COMPLETED", "FAILED", "CANCELLED") for s in statuses(sweep).values()):
            assert time.monotonic() < deadline, statuses(sweep)
            run_tfrun(tmp_path, "status", str(sweep))
            time.sleep(1)
    finally:
        subprocess.run(["scancel", f"--name={name}"], capture_output=True, timeout=60)
    found = statuses(sweep)
    assert all(s["state"] == "COMPLETED" for s in found.values()), found
    runs = {n: len((sweep / n / "outputs" / "started").read_text().splitlines()) for n in found}
    assert runs == {"0": 2, "1": 1, "2": 1}, runs  # the stopped point again; the others once
    job = subprocess.run(["scontrol", "show", "job", allocation], capture_output=True, text=True, timeout=60).stdout
    assert re.search(r"\bRestarts=1\b", job), job  # requeued once, and not again at its end
    point = json.loads((sweep / "0" / "attempts.json").read_text())
    first = min(point.values(), key=lambda a: a.get("started") or 0)
    assert first["reason"] == "preempted" and first["preempt_mode"] == "REQUEUE", point
    requeued_by = "slurm" if slurm_release() >= preempt.REQUEUES_PREEMPTED_AS_IT_ENDS else "tfrun"
    assert first["requeued_by"] == requeued_by, point


def test_cancel_one_point_leaves_the_others(tmp_path: Path) -> None:
    (tmp_path / "point.py").write_text(POINT)
    result = run_tfrun(tmp_path, "-m", "compute=slurm", "compute.pack_size=3", "compute.wait=false",
                       "entry.script=point.py", "trainer.i=range(0,3)", "trainer.sleep=8")
    assert result.returncode == 0, result.stderr
    sweep = sweep_dir(tmp_path)
    deadline = time.monotonic() + 120
    while statuses(sweep)["0"]["state"] != "RUNNING":
        assert time.monotonic() < deadline, statuses(sweep)
        time.sleep(0.5)
    assert run_tfrun(tmp_path, "cancel", str(sweep / "2")).returncode == 0  # not started yet
    while not (sweep / "0" / "ranks" / "0.json").exists():
        time.sleep(0.2)
    time.sleep(1)
    assert run_tfrun(tmp_path, "cancel", str(sweep / "0")).returncode == 0  # running
    deadline = time.monotonic() + 180
    while any(s["state"] not in ("COMPLETED", "FAILED", "CANCELLED") for s in statuses(sweep).values()):
        assert time.monotonic() < deadline, statuses(sweep)
        run_tfrun(tmp_path, "status", str(sweep))
        time.sleep(1)
    found = statuses(sweep)
    assert (found["0"]["state"], found["1"]["state"], found["2"]["state"]) == ("CANCELLED", "COMPLETED", "CANCELLED")
    assert not (sweep / "2" / "logs" / "rank0.log").exists()


def test_time_limit_reruns_only_unfinished_points(tmp_path: Path) -> None:
    """A 1-minute pack of 6 points of 8 s: the warning comes ~20 s in, the job is requeued
    and its second attempt runs only the points the first did not finish."""
    (tmp_path / "point.py").write_text(POINT)
    result = run_tfrun(tmp_path, "-m", "compute=slurm", "compute.pack_size=6", "compute.timeout_min=1",
                       "compute.signal_delay_s=30", "compute.poll_s=1", "entry.script=point.py",
                       "trainer.i=range(0,6)", "trainer.sleep=8", timeout=900)
    assert result.returncode == 0, result.stderr
    sweep = sweep_dir(tmp_path)
    found = statuses(sweep)
    assert all(s["state"] == "COMPLETED" for s in found.values()), found
    runs_per_point = {n: len((sweep / n / "outputs" / "started").read_text().splitlines()) for n in found}
    requeues = sum(1 for n in found for a in json.loads((sweep / n / "attempts.json").read_text()).values()
                   if a.get("requeued"))
    assert requeues >= 1, "the time limit never came"
    # One point at a time: each requeue interrupted exactly one point, which ran again; no
    # finished point ran twice.
    assert sum(runs_per_point.values()) == len(found) + requeues, (runs_per_point, requeues)
