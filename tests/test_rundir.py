"""The run directory's files under concurrent writers: no update lost, no half-written file."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import run_tfrun, scratch_env, tfrun_command
from tfrun import rundir
from tfrun.paths import SweepPaths

WRITERS, UPDATES = 8, 200


def _writer(run_dir: str, who: int) -> None:
    for i in range(UPDATES):
        rundir.update_status(run_dir, **{f"field{who}": i, f"seen{who}_{i % 7}": True})


def test_concurrent_status_updates_lose_nothing(tmp_path: Path) -> None:
    """8 processes merge different fields into one status.json, 200 times each."""
    rundir.update_status(tmp_path, state="RUNNING")
    ctx = multiprocessing.get_context("spawn")  # separate interpreters, as the launcher, follower and verbs are
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), who)) for who in range(WRITERS)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    status = rundir.read_status(tmp_path)
    assert status["state"] == "RUNNING"
    for who in range(WRITERS):
        assert status[f"field{who}"] == UPDATES - 1, who
        assert all(status[f"seen{who}_{k}"] for k in range(7)), who


def _version(who: int) -> dict:
    return {"writer": who, "payload": [str(who) * 64] * 4000}  # ~260 kB: a write takes a while


def _save(kind: str, path: str, who: int) -> None:
    """Write one of the writers' versions of ``path`` many times."""
    from tfrun.config.hydra_files import save_yaml

    for _ in range(60):
        if kind == "yaml":
            save_yaml(_version(who), path)
        else:
            rundir.write_atomic(path, json.dumps(_version(who)))


@pytest.mark.parametrize("kind", ["yaml", "bytes"])
def test_a_reader_never_sees_a_part_of_a_file_being_written(tmp_path: Path, kind: str) -> None:
    """The run dir's files (.hydra/*.yaml, JSON records, the ONNX model) while 4 processes
    rewrite one of them: every read is one whole version, and no writer trips over another."""
    path = tmp_path / ("config.yaml" if kind == "yaml" else "record.json")
    _save(kind, str(path), 0)
    whole = {len(path.read_bytes())}  # every version has the same size: a part is shorter
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_save, args=(kind, str(path), who)) for who in range(1, 5)]
    for proc in procs:
        proc.start()
    reads = 0
    while any(p.is_alive() for p in procs):
        size = len(path.read_bytes())
        assert size in whole, f"read {size} bytes of a file whose versions have {whole}"
        reads += 1
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    assert reads > 100, "the reader barely ran while the writers wrote: nothing was checked"
    text = path.read_text()
    assert (yaml.safe_load(text) if kind == "yaml" else json.loads(text))["writer"] in range(1, 5)
    assert not list(tmp_path.glob(".*.tmp")), "temporary files left behind"


def test_cancel_never_signals_a_process_that_reused_the_launchers_pid(tmp_path: Path) -> None:
    """A local run whose launcher died, its pid taken by another process: ``tfrun cancel``
    records the run as cancelled and leaves that process alone."""
    shown = run_tfrun(tmp_path, "--dry-run=json")
    assert shown.returncode == 0, shown.stderr
    run_dir = Path(json.loads(shown.stdout)["run_dir"])
    rundir.write_atomic(run_dir / "plan.json", shown.stdout)
    other = subprocess.Popen(["sleep", "60"])
    try:
        rundir.update_status(
            run_dir,
            state="RUNNING",
            target="local",
            launcher_pid=other.pid,
            launcher_host=rundir.hostname(),
            launcher_started=rundir.process_started(other.pid) - 3600,
        )  # the launcher was older
        result = run_tfrun(tmp_path, "cancel", str(run_dir))
        assert result.returncode == 0, result.stderr
        time.sleep(0.5)
        assert other.poll() is None, "tfrun cancel signalled a process that is not the run's launcher"
        status = rundir.read_status(run_dir)
        assert status["state"] == "CANCELLED" and "had ended" in status["reason"], status
    finally:
        other.kill()
        other.wait()


def test_a_requeue_that_cannot_run_is_reported_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """scontrol missing (or hanging) on a node: the caller gets the reason and carries on."""
    from tfrun.task import preempt

    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol here
    assert "scontrol could not run" in preempt.requeue("123")
    (tmp_path / "scontrol").write_text("#!/bin/sh\nexec /bin/sleep 30\n")
    (tmp_path / "scontrol").chmod(0o755)
    assert "did not answer within 1 s" in preempt.requeue("123", timeout_s=1)


def test_a_requeued_job_shows_preempted_while_accounting_says_pending(tmp_path: Path) -> None:
    """The follower's view of a preempted job: PREEMPTED until it runs again, even when its new
    attempt is recorded before sacct stops saying PENDING."""
    from tfrun.targets import slurm

    rundir.update_attempt(tmp_path, "attempt-1", started=1.0, ended=2.0, reason="preempted", requeued=True)
    assert slurm.shown_state(tmp_path, "PENDING") == "PREEMPTED"
    rundir.update_attempt(tmp_path, "attempt-2", started=3.0, ended=None)  # started again already
    assert slurm.shown_state(tmp_path, "PENDING") == "PREEMPTED"
    assert slurm.shown_state(tmp_path, "RUNNING") == "RUNNING"
    rundir.update_attempt(tmp_path, "attempt-2", ended=4.0, reason="completed")
    assert slurm.shown_state(tmp_path, "PENDING") == "PENDING"
    rundir.update_attempt(tmp_path, "attempt-3", started=5.0, ended=6.0, reason="preempted", requeued=False)
    assert slurm.shown_state(tmp_path, "PENDING") == "PENDING"  # not requeued: not coming back


# --- the sweep's index: every writer under its lock --------------------------------------------

POINTS_PER_WRITER = 40


def _sweep_writer(sweep_dir: str, who: int) -> None:
    """A launcher adding its points one by one and recording each one's objective, as a
    tuning sweeper's batches and a study's trials do."""
    from types import SimpleNamespace

    from tfrun.runner.sweeps import record_objective, record_points

    for i in range(POINTS_PER_WRITER):
        plan = SimpleNamespace(run_id=f"{who}-{i}", run_dir=f"{sweep_dir}/{who}-{i}")
        record_points(Path(sweep_dir), [plan], [[f"trainer.x={i}"]])  # type: ignore[list-item]
        record_objective(Path(sweep_dir), plan, "score", float(who * 1000 + i))  # type: ignore[arg-type]


def test_concurrent_writers_of_a_sweeps_index_lose_no_point(tmp_path: Path) -> None:
    """4 processes add 40 points each to one sweep.json and record their objectives."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_sweep_writer, args=(str(tmp_path), who)) for who in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    points = rundir.read_json(SweepPaths.of(tmp_path).index)["points"]
    assert sorted(p["run_id"] for p in points) == sorted(f"{w}-{i}" for w in range(4) for i in range(POINTS_PER_WRITER))
    for point in points:
        who, i = map(int, point["run_id"].split("-"))
        assert point["objective"] == {"metric": "score", "value": who * 1000 + i}, point


# --- the umask: a run dir shared with a group ---------------------------------------------------

WRITE_UNDER_UMASK = """
import os, sys
from pathlib import Path
os.umask(int(sys.argv[2], 8))
from tfrun import rundir
from tfrun.config.hydra_files import save_yaml
from tfrun.tracking import metrics
folder = Path(sys.argv[1])
rundir.write_atomic(folder / "bytes.bin", b"x")
rundir.write_json(folder / "record.json", {"a": 1})
rundir.update_status(folder, state="RUNNING")
from tfrun.runner.sweeps import record_points
record_points(folder, [], [])
save_yaml({"a": 1}, folder / "config.yaml")
metrics._rewrite(folder / "metrics.jsonl", [{"epoch": 0}])
"""


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_files_written_atomically_follow_the_umask(tmp_path: Path, umask: int) -> None:
    """Every atomically written file (plan, status, records, configs, a rewritten metrics
    file) gets the mode any file of the user gets: 0644 under umask 022, 0664 under 002."""
    done = subprocess.run(
        [sys.executable, "-c", WRITE_UNDER_UMASK, str(tmp_path), oct(umask)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()}
    assert {"bytes.bin", "record.json", "status.json", "sweep.json", "config.yaml", "metrics.jsonl"} <= set(modes)
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


@pytest.mark.slow
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_a_runs_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    """A real run (with MLflow's local store, which keeps state of its own in the run dir and
    beside it): every file it writes has the mode the umask gives, every dir too."""
    (tmp_path / "quick.py").write_text("import tfrun\ntfrun.log_metric('m', 1.0)\n")
    env = scratch_env(tmp_path)
    done = subprocess.run(
        [*tfrun_command(), "entry.script=quick.py", "tracking=mlflow"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: os.umask(umask),
    )
    assert done.returncode == 0, done.stderr
    runs = tmp_path / "runs"
    files = {p: oct(p.stat().st_mode & 0o777) for p in runs.rglob("*") if p.is_file()}
    dirs = {p: oct(p.stat().st_mode & 0o777) for p in runs.rglob("*") if p.is_dir()}
    assert runs / "mlflow.db" in files and any(p.name == "plan.json" for p in files), sorted(files)
    assert {p: m for p, m in files.items() if m != oct(0o666 & ~umask)} == {}
    assert {p: m for p, m in dirs.items() if m != oct(0o777 & ~umask)} == {}


def test_a_preempted_job_is_left_to_slurm_to_requeue_where_slurm_requeues_it_as_it_ends() -> None:
    """PreemptMode=REQUEUE: from Slurm 24.11 on (the release the cluster reported when the task
    asked), Slurm requeues the job as its tasks end, and tfrun must not requeue it too; on 22.05
    a job that ends within its grace time just completes, and tfrun requeues it."""
    from tfrun.task import requeue

    assert requeue.release("24.11.5") == (24, 11) and requeue.release("22.05.8") == (22, 5)
    assert requeue.release(None) is None and requeue.release("unknown") is None
    preempted = {"preempted": True, "preempt_mode": "REQUEUE"}
    assert requeue.requeued_as_it_ends({**preempted, "slurm_version": "24.11.5"})
    assert requeue.requeued_as_it_ends({**preempted, "slurm_version": "25.05.1"})
    assert not requeue.requeued_as_it_ends({**preempted, "slurm_version": "22.05.8"})
    assert not requeue.requeued_as_it_ends({**preempted, "slurm_version": "24.05.4"})
    assert not requeue.requeued_as_it_ends(preempted)  # the release unknown: tfrun requeues, as it always did
    assert not requeue.requeued_as_it_ends({"preempted": True, "preempt_mode": "CANCEL", "slurm_version": "24.11.5"})


def test_a_job_accounting_calls_preempted_is_completed_when_its_last_attempt_completed_the_run(tmp_path: Path) -> None:
    """Slurm 24.11 records a job it preempted, and tfrun then requeued, as PREEMPTED once its
    next attempt completes (PreemptMode=CANCEL): the ranks' own record says the run is done."""
    from tfrun.targets import slurm

    rundir.update_attempt(tmp_path, "slurm-7-0", started=1.0, ended=2.0, reason="preempted", requeued=True)
    assert slurm.shown_state(tmp_path, slurm.tfrun_state("PREEMPTED")) == "STOPPED"
    rundir.update_attempt(tmp_path, "slurm-7-1", started=3.0, ended=None)
    assert slurm.shown_state(tmp_path, "STOPPED") == "STOPPED"  # killed before it could say more
    rundir.update_attempt(tmp_path, "slurm-7-1", ended=4.0, reason="completed")
    assert slurm.shown_state(tmp_path, slurm.tfrun_state("PREEMPTED")) == "COMPLETED"


def test_a_job_started_again_after_it_completed_the_run_has_nothing_left_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slurm 24.11 requeues a job it requeued during a preemption once more when its next
    attempt ends: an attempt of that same job after one that completed the run does nothing."""
    from tfrun.task import stopping

    rundir.update_attempt(tmp_path, "slurm-7-0", started=1.0, ended=2.0, job_id="7", reason="preempted")
    rundir.update_attempt(tmp_path, "slurm-7-1", started=3.0, ended=4.0, job_id="7", reason="completed")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert stopping.completed_earlier(str(tmp_path))["attempt"] == "slurm-7-1"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # that attempt itself
    assert stopping.completed_earlier(str(tmp_path)) is None
    monkeypatch.setenv("SLURM_JOB_ID", "8")  # another job of the run (tfrun resume): it runs
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert stopping.completed_earlier(str(tmp_path)) is None
