"""Real Slurm jobs on the local cluster (``scripts/local-slurm``): no mocks.

Every job gets a job name of its own (``compute.job_name``), so that the queue checks
look only at this test's jobs while other tests use the same cluster, and so that a
failed test can cancel what it left behind. A cluster that is not up fails the tests:
CI starts it before the tests (``scripts/test``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import textwrap
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from tests.helpers import (
    LOCAL_SLURM,
    SLURM_STATE,
    NodePair,
    accounted,
    cancel_jobs_named,
    popen_tfrun,
    read_json,
    run_dir_from,
    run_tfrun,
    text_of,
    wait_for,
)

DIGITS_EPOCHS = 2
JOB_TIMEOUT = 300  # generous: other suites may hold the nodes for a while


# --- Slurm's own view ---------------------------------------------------------------------


def sacct(job: str, fields: str = "JobID,State") -> dict[str, list[str]]:
    """Allocation lines of a job (or of an array: one per element), by JobID."""
    out = subprocess.run(
        ["sacct", "-j", job, "-X", "-n", "-P", "-o", fields], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    rows = [line.split("|") for line in out.splitlines() if line.strip()]
    return {row[0]: row[1:] for row in rows}


def array_accounted(array: str, size: int) -> dict[str, list[str]]:
    """The array's elements as accounting holds them, once slurmdbd has them all, ended: it
    learns of an array's split into elements, and of how they ended, a moment after they end."""
    accounted(array, size)
    return sacct(array)


def sacct_state(job_id: str) -> str:
    """How accounting says a job ended, once it knows."""
    return accounted(job_id).get(job_id, "")


def queued(name: str) -> list[str]:
    """Ids and states of the jobs with this name still in squeue."""
    out = subprocess.run(
        ["squeue", "-h", f"--name={name}", "-o", "%i %T"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    return out.splitlines()


def submitted_job(stderr: str) -> str:
    match = re.search(r"^tfrun: submitted job (\S+); run dir", stderr, re.M)
    assert match, f"tfrun did not print the job id:\n{stderr}"
    return match.group(1)


def submitted_sweep(stderr: str) -> tuple[list[str], Path]:
    match = re.search(r"^tfrun: submitted \d+ run\(s\) as job\(s\) ([\d, ]+); sweep dir (.+)$", stderr, re.M)
    assert match, f"tfrun did not say what it submitted:\n{stderr}"
    return match.group(1).split(", "), Path(match.group(2))


def write_script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def tfrun_status(tmp_path: Path, run: Path | str) -> str:
    result = run_tfrun(tmp_path, "status", str(run), timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


# --- 1 + 8: the digits example on one and on two nodes; runs and logs ----------------


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[int, tuple]]]:
    """The digits example as a 1-node and a 2-node job: (tmp dir, {nodes: (result, run dir, job id)})."""
    tmp = tmp_path_factory.mktemp("digits")
    name = f"tfrun-slurm-{uuid.uuid4().hex[:8]}"
    done = {}
    try:
        for nodes in (1, 2):
            result = run_tfrun(
                tmp,
                "compute=slurm",
                f"compute.nodes={nodes}",
                f"compute.job_name={name}",
                f"trainer.epochs={DIGITS_EPOCHS}",
                timeout=JOB_TIMEOUT,
            )
            assert result.returncode == 0, result.stderr
            done[nodes] = (result, run_dir_from(result.stderr), submitted_job(result.stderr))
        yield tmp, done
    finally:
        cancel_jobs_named(name)


@pytest.mark.slurm
@pytest.mark.parametrize("nodes", [1, 2])
def test_digits_job_completes_on_one_and_two_nodes(digits_runs: tuple, nodes: int) -> None:
    _, done = digits_runs
    result, run_dir, job_id = done[nodes]
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"\d+", job_id), job_id
    assert f"tfrun: job {job_id} COMPLETED" in result.stderr
    status = read_json(run_dir / "status.json")
    assert status["state"] == "COMPLETED" and status["target"] == "slurm"
    assert status["job_ids"] == [job_id]
    assert status["exit_codes"] == {str(r): 0 for r in range(nodes)}
    # One node: either GPU node (another suite may hold one). Two: rank r on the r-th node.
    hosts = [read_json(run_dir / f"ranks/{rank}.json")["host"] for rank in range(nodes)]
    if nodes == 1:
        assert hosts[0] in ("node1", "node2") and status["nodes"] == hosts[0], (hosts, status)
    else:
        assert hosts == ["node1", "node2"] and status["nodes"] == "node[1-2]", (hosts, status)
    for rank in range(nodes):
        log = (run_dir / f"logs/rank{rank}.log").read_text()
        assert f"rank {rank}/{nodes} on {hosts[rank]}" in log, log
        assert f"Epoch {DIGITS_EPOCHS}/{DIGITS_EPOCHS}" in log and "val_accuracy=" in log, log
    assert not (run_dir / f"logs/rank{nodes}.log").exists()
    assert (run_dir / "outputs/model.keras").is_file()
    assert "val_accuracy=" in result.stdout  # rank 0's log is followed on the terminal
    assert sacct_state(job_id) == "COMPLETED"
    assert sacct(job_id, "JobID,NNodes")[job_id] == [str(nodes)]


@pytest.mark.slurm
def test_runs_lists_jobs_and_logs_prints_a_rank(digits_runs: tuple) -> None:
    tmp, done = digits_runs
    result = run_tfrun(tmp, "runs", timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:6] == ["RUN", "NAME", "STATE", "BACKEND", "COMPUTE", "JOBS"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    for _, run_dir, job_id in done.values():
        row = rows[run_dir.name]
        assert row[2:6] == ["COMPLETED", "none", "slurm", job_id], row
    assert len(rows) == 2

    _, run_dir, _ = done[2]
    rank1 = run_tfrun(tmp, "logs", str(run_dir), "--rank", "1", timeout=60)
    assert rank1.returncode == 0, rank1.stderr
    assert rank1.stdout == (run_dir / "logs/rank1.log").read_text()
    assert "rank 1/2 on node2" in rank1.stdout and "rank 0/2" not in rank1.stdout
    by_id = run_tfrun(tmp, "logs", run_dir.name, "--rank", "0", timeout=60)
    assert by_id.returncode == 0 and by_id.stdout == (run_dir / "logs/rank0.log").read_text()
    missing = run_tfrun(tmp, "logs", str(run_dir), "--rank", "5", timeout=60)
    assert missing.returncode == 2 and missing.stdout == "", missing.stderr  # a rank the run does not have


# --- 2: a sweep is one job array ---------------------------------------------------------

POINT_SCRIPT = """\
import argparse, os, time
parser = argparse.ArgumentParser()
parser.add_argument("--x", type=int, required=True)
parser.add_argument("--sleep", type=float, default=0)
args = parser.parse_args()
time.sleep(args.sleep)
print(f"point x={args.x} job={os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}", flush=True)
"""


@pytest.mark.slurm
def test_sweep_is_one_job_array_with_a_run_dir_per_point(tmp_path: Path, job_name: str) -> None:
    write_script(tmp_path, "point.py", POINT_SCRIPT)
    result = run_tfrun(
        tmp_path,
        "-m",
        "compute=slurm",
        f"compute.job_name={job_name}",
        "entry.script=point.py",
        "trainer.x=10,20,30",
        timeout=JOB_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    arrays, sweep_dir = submitted_sweep(result.stderr)
    assert len(arrays) == 1, f"a 3-point sweep must be one job array: {arrays}"
    array = arrays[0]
    assert sweep_dir.parent == tmp_path / "runs"
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["0", "1", "2"]
    index = read_json(sweep_dir / "sweep.json")
    assert [p["run_dir"] for p in index["points"]] == [str(sweep_dir / str(i)) for i in range(3)]
    assert [p["overrides"][-1] for p in index["points"]] == [f"++trainer.x={x}" for x in (10, 20, 30)]

    for i, x in enumerate((10, 20, 30)):
        run_dir = sweep_dir / str(i)
        status = read_json(run_dir / "status.json")
        assert status["state"] == "COMPLETED" and status["job_ids"] == [f"{array}_{i}"], status
        assert f"point x={x} job={array}_{i}" in (run_dir / "logs/rank0.log").read_text()
    assert array_accounted(array, 3) == {f"{array}_{i}": ["COMPLETED"] for i in range(3)}

    shown = tfrun_status(tmp_path, sweep_dir)
    assert f"sweep {sweep_dir}: 3 run(s)" in shown
    points = [line.split() for line in shown.splitlines()[1:]]
    assert [p[:4] for p in points] == [[str(i), "COMPLETED", "job", f"{array}_{i}"] for i in range(3)], shown


# --- 3: a failing rank ends the job and is named -------------------------------------------

FAILING_SCRIPT = """\
import os, time
if os.environ["TFRUN_RANK"] == "1":
    time.sleep(1)
    raise ValueError("rank one gave up")
print("rank 0 sleeping", flush=True)
time.sleep(300)
"""


@pytest.mark.slurm
def test_failing_rank_fails_the_job_quickly_and_is_reported(tmp_path: Path, job_name: str) -> None:
    write_script(tmp_path, "fail.py", FAILING_SCRIPT)
    start = time.time()
    result = run_tfrun(
        tmp_path,
        "compute=slurm",
        "compute.nodes=2",
        f"compute.job_name={job_name}",
        "entry.script=fail.py",
        timeout=JOB_TIMEOUT,
    )
    ended = time.time()
    assert result.returncode == 1, result.stderr
    run_dir = run_dir_from(result.stderr)
    job_id = submitted_job(result.stderr)
    # Quickly: not rank 0's 300 s. Timed from when the ranks started, so that a queue
    # held by another suite's jobs does not count.
    ranks_started = min(read_json(run_dir / f"ranks/{r}.json")["started"] for r in (0, 1))
    assert ended - ranks_started < 30, f"tfrun returned {ended - ranks_started:.0f} s after the ranks started"
    assert ended - start < 30 + (ranks_started - start)

    status = read_json(run_dir / "status.json")
    assert status["state"] == "FAILED" and status["failed_rank"] == 1 and status["host"] == "node2", status
    assert status["exit_codes"]["1"] == 1
    assert read_json(run_dir / "ranks/0.json")["exit_code"] in (None, 1)  # killed, or stopped by its signal
    assert sacct_state(job_id) == "FAILED"
    assert queued(job_name) == []
    assert "rank 1 on node2 failed" in result.stderr and "ValueError: rank one gave up" in result.stderr

    shown = tfrun_status(tmp_path, run_dir)
    assert shown.startswith(f"run {status['run_id']}: FAILED")
    assert "rank 1: node2" in shown
    assert "rank 1 on node2 failed" in shown
    assert 'raise ValueError("rank one gave up")' in shown and "| ValueError: rank one gave up" in shown


GO_THEN_FAIL = """\
import os, pathlib, time
if os.environ["TFRUN_RANK"] == "1":
    while not pathlib.Path({go!r}).exists():
        time.sleep(0.1)
    raise ValueError("rank one gave up")
time.sleep(300)
"""


@pytest.mark.slurm
def test_a_job_slurm_is_still_ending_on_a_node_is_waited_for(
    tmp_path: Path, job_name: str, network_nodes: NodePair
) -> None:
    """Accounting says a job FAILED the moment its batch step ends; Slurm then ends what is left
    of it on every node (COMPLETING), which a busy or slow node can take seconds to do. tfrun
    returns once the job has left the queue, and says what it waits for."""
    go = tmp_path / "go"
    write_script(tmp_path, "fail.py", GO_THEN_FAIL.format(go=str(go)))
    proc, _, err = popen_tfrun(
        tmp_path,
        "compute=slurm",
        "compute.nodes=2",
        f"compute.partition={network_nodes.partition}",
        f"compute.job_name={job_name}",
        "compute.poll_s=1",
        "entry.script=fail.py",
    )
    slurmd = int((SLURM_STATE / "run" / f"slurmd-{network_nodes.second}.pid").read_text().split()[0])
    try:
        wait_for(lambda: "; run dir " in err.read_text(), 120, "tfrun to submit the job")
        job_id = submitted_job(err.read_text())
        run_dir = Path(err.read_text().split("; run dir ", 1)[1].splitlines()[0])
        wait_for(lambda: (run_dir / "ranks" / "1.json").exists(), JOB_TIMEOUT, "rank 1 to start")
        # The second node's slurmd paused (its job's processes go on): once the job has ended,
        # Slurm waits on that node to end it. Resumed within MessageTimeout (10 s), so that the
        # controller's request to it is answered, not retried later.
        os.kill(slurmd, signal.SIGSTOP)
        try:
            go.touch()
            wait_for(lambda: sacct_state(job_id) == "FAILED", 60, "accounting to say the job FAILED")
            wait_for(
                lambda: proc.poll() is not None or "waiting for Slurm to end job" in err.read_text(),
                8,
                "tfrun to say what it waits for",
            )
            left = queued(job_name)
            assert proc.poll() is None, f"tfrun returned while Slurm was still ending the job: {left}"
            assert left == [f"{job_id} COMPLETING"]
        finally:
            os.kill(slurmd, signal.SIGCONT)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = err.read_text()
    assert code == 1, stderr
    # The nodes Slurm has not yet freed: the paused one, and any its answer holds up.
    waiting = re.search(rf"^tfrun: waiting for Slurm to end job\(s\) {job_id} \(on (\S+)\)$", stderr, re.M)
    assert waiting, stderr
    named = subprocess.run(
        ["scontrol", "show", "hostnames", waiting.group(1)], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    assert network_nodes.second in named, stderr
    assert queued(job_name) == []
    assert f"rank 1 on {network_nodes.second} failed" in stderr and "ValueError: rank one gave up" in stderr


# --- 4: cancel, and Ctrl-C detaches ---------------------------------------------------------

SLEEP_SCRIPT = """\
import time
print("sleeping", flush=True)
time.sleep(300)
"""


def _first_line(text: str) -> str:
    return text.splitlines()[0] if text else ""


@pytest.mark.slurm
def test_no_wait_returns_at_once_and_cancel_ends_the_job(
    tmp_path: Path, job_name: str, preempt_nodes: NodePair
) -> None:
    """In a partition whose jobs can be preempted, a user's cancel (SIGTERM, as a preemption's)
    still ends the job: CANCELLED, not requeued. The task saves its work first, as it would for
    a preemption, and rank 0 asks Slurm which it was. (On nodes of the preemption tests' own:
    elsewhere another test's job could preempt it.)"""
    write_script(tmp_path, "sleep.py", SLEEP_SCRIPT)
    start = time.monotonic()
    result = run_tfrun(
        tmp_path,
        "compute=slurm",
        "compute.wait=false",
        f"compute.job_name={job_name}",
        f"compute.partition={preempt_nodes.low}",
        "entry.script=sleep.py",
        timeout=60,
    )
    took = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    assert took < 15, f"compute.wait=false took {took:.1f} s"
    job_id = submitted_job(result.stderr)
    assert f"tfrun: jobs keep running: {job_id}" in result.stderr
    run_dir = run_dir_from(result.stderr)
    assert queued(job_name) and queued(job_name)[0].split()[0] == job_id

    wait_for(
        lambda: _first_line(tfrun_status(tmp_path, run_dir)).endswith(": RUNNING"),
        JOB_TIMEOUT,
        "tfrun status to say RUNNING",
    )
    wait_for(lambda: "sleeping" in text_of(run_dir / "logs/rank0.log"), 60, "the script to start")

    cancelled = run_tfrun(tmp_path, "cancel", str(run_dir), timeout=60)
    assert cancelled.returncode == 0, cancelled.stderr
    assert f"(job {job_id})" in cancelled.stdout
    assert sacct_state(job_id).startswith("CANCELLED")
    wait_for(lambda: not queued(job_name), 60, "the job to leave the queue")
    shown = tfrun_status(tmp_path, run_dir)
    assert _first_line(shown).endswith(": CANCELLED"), shown
    assert re.search(
        rf"^  rank 0: ({'|'.join(preempt_nodes.nodes)}) pid \d+ killed before it finished$", shown, re.M
    ), shown
    assert read_json(run_dir / "status.json")["state"] == "CANCELLED"
    log = text_of(run_dir / "logs/rank0.log")
    assert re.search(
        rf"^tfrun: Slurm is ending job {job_id} \((CANCELLED|COMPLETING)\), not preempting it: ending now$", log, re.M
    ), log
    attempt = read_json(run_dir / "attempts.json")[f"slurm-{job_id}-0"]
    assert attempt["requeued"] is False and attempt["terminated"] is True and "reason" not in attempt, attempt


@pytest.mark.slurm
def test_ctrl_c_while_following_detaches_and_the_job_keeps_running(tmp_path: Path, job_name: str) -> None:
    write_script(tmp_path, "sleep.py", SLEEP_SCRIPT)
    proc, out, err = popen_tfrun(
        tmp_path,
        "compute=slurm",
        "compute.wait=true",
        "compute.poll_s=0.5",
        f"compute.job_name={job_name}",
        "entry.script=sleep.py",
    )
    try:
        wait_for(
            lambda: re.search(r"job \d+ RUNNING", err.read_text()) and "sleeping" in out.read_text(),
            JOB_TIMEOUT,
            "tfrun to follow the running job",
        )
        job_id = submitted_job(err.read_text())
        # The task interpreter tfrun starts while it composes a run serves local runs only: a
        # run on Slurm lets it go before it is submitted, not when it ends.
        waiting = [cmd for cmd in _children(proc.pid) if "tfrun.bootstrap" in cmd]
        assert not waiting, f"tfrun still holds a task interpreter while it follows a Slurm job: {waiting}"
        proc.send_signal(signal.SIGINT)
        start = time.monotonic()
        code = proc.wait(timeout=30)
        took = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = err.read_text()
    assert code == 0, stderr
    assert took < 10, f"tfrun took {took:.1f} s to detach"
    assert f"tfrun: jobs keep running: {job_id}" in stderr and "DETACHED" in stderr
    assert queued(job_name) == [f"{job_id} RUNNING"]
    run_dir = run_dir_from(stderr)

    cancelled = run_tfrun(tmp_path, "cancel", str(run_dir), timeout=60)
    assert cancelled.returncode == 0, cancelled.stderr
    assert sacct_state(job_id).startswith("CANCELLED")
    assert _first_line(tfrun_status(tmp_path, run_dir)).endswith(": CANCELLED")


def _setup_fails(failing_from: int) -> str:
    """A line of the job's own script (compute.setup) that ends the job before srun starts a
    task, from the attempt whose restart count is ``failing_from`` on (0: every attempt)."""
    line = (
        f"test 0$SLURM_RESTART_COUNT -lt {failing_from} || "
        "{ echo setup broke on attempt $((0$SLURM_RESTART_COUNT + 1)) >&2; exit 3; }"
    )
    return f'compute.setup=["{line}"]'


def _ended_before_tasks(run_dir: Path, job_id: str, attempt: int) -> str:
    log = run_dir / ".submitit" / f"{job_id}_0_log.out"
    return (
        f"the job ended before any of its tasks started; the end of its log ({log}): setup broke on attempt {attempt}"
    )


@pytest.mark.slurm
def test_a_job_its_setup_ends_says_why(tmp_path: Path, job_name: str) -> None:
    """No rank ran, so none is named: the reason is the last line the job wrote."""
    write_script(tmp_path, "hello.py", "print('hello')\n")
    result = run_tfrun(
        tmp_path,
        "compute=slurm",
        f"compute.job_name={job_name}",
        "entry.script=hello.py",
        _setup_fails(0),
        timeout=JOB_TIMEOUT,
    )
    assert result.returncode == 1, result.stderr
    run_dir, job_id = run_dir_from(result.stderr), submitted_job(result.stderr)
    why = _ended_before_tasks(run_dir, job_id, 1)
    status = read_json(run_dir / "status.json")
    assert (status["state"], status["failed_rank"], status["reason"]) == ("FAILED", None, why), status
    assert f"tfrun: {why}\n" in result.stderr
    assert f"  reason: {why}" in tfrun_status(tmp_path, run_dir)
    assert sacct_state(job_id) == "FAILED"


@pytest.mark.slurm
def test_an_attempt_after_a_requeue_is_judged_by_its_own_lines(tmp_path: Path, job_name: str) -> None:
    """The first attempt's rank is killed by the requeue (srun says so in the job's log, and
    its record stays); the second attempt's setup ends the job. The run failed for the second
    attempt's reason, not for the first's."""
    write_script(tmp_path, "sleep.py", SLEEP_SCRIPT)
    proc, out, err = popen_tfrun(
        tmp_path,
        "compute=slurm",
        "compute.poll_s=0.5",
        f"compute.job_name={job_name}",
        "entry.script=sleep.py",
        _setup_fails(1),
    )
    try:
        wait_for(lambda: "sleeping" in out.read_text(), JOB_TIMEOUT, "the first attempt's rank to run")
        job_id = submitted_job(err.read_text())
        subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True, timeout=60)
        code = proc.wait(timeout=JOB_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = err.read_text()
    assert code == 1, stderr
    run_dir = run_dir_from(stderr)
    why = _ended_before_tasks(run_dir, job_id, 2)
    status = read_json(run_dir / "status.json")
    assert (status["state"], status["failed_rank"], status["reason"]) == ("FAILED", None, why), status
    assert f"tfrun: {why}\n" in stderr and "failed: killed by SIGTERM" not in stderr
    assert f"  reason: {why}" in tfrun_status(tmp_path, run_dir)
    log = (run_dir / ".submitit" / f"{job_id}_0_log.out").read_text()
    first, second = f"tfrun: starting attempt {job_id}-0 on ", f"tfrun: starting attempt {job_id}-1 on "
    assert first in log and second in log, log
    # srun's word on the first attempt's rank (killed by the requeue), which was taken for the run's end
    assert re.search(r"^srun: error: \S+: task 0: ", log.split(second)[0], re.M), log
    assert read_json(run_dir / "ranks/0.json")["attempt"] == f"slurm-{job_id}-0"


def _children(pid: int) -> list[str]:
    """The command lines of a process's living children."""
    import psutil

    commands = []
    for child in psutil.Process(pid).children():
        try:
            commands.append(" ".join(child.cmdline()))
        except psutil.Error:  # ended meanwhile, or a zombie
            continue
    return commands


# --- 5: GPUs ---------------------------------------------------------------------------------

GPU_SCRIPT = """\
import os
print("GPUS rank={} local={} cvd={} step_gpus={}".format(
    os.environ["TFRUN_RANK"], os.environ["TFRUN_LOCAL_RANK"],
    os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("SLURM_STEP_GPUS")), flush=True)
"""


@pytest.mark.slurm
@pytest.mark.parametrize(
    "overrides, sbatch_line, why",
    [
        (["compute=slurm_gpu", "compute.tasks_per_node=2"], "#SBATCH --gpus-per-task=1", "bound by the scheduler"),
        (
            ["compute=slurm", "compute.gpus_per_node=2", "compute.tasks_per_node=2"],
            "#SBATCH --gpus-per-node=2",
            "slice of 0,1 for local rank {rank}",
        ),
    ],
    ids=["gpus_per_task", "gpus_per_node"],
)
def test_each_rank_gets_its_own_gpu(
    tmp_path: Path, job_name: str, overrides: list[str], sbatch_line: str, why: str
) -> None:
    write_script(tmp_path, "gpus.py", GPU_SCRIPT)
    result = run_tfrun(
        tmp_path, *overrides, f"compute.job_name={job_name}", "entry.script=gpus.py", timeout=JOB_TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    run_dir = run_dir_from(result.stderr)
    job_id = submitted_job(result.stderr)
    assert sbatch_line in (run_dir / f".submitit/{job_id}_submission.sh").read_text().splitlines()
    for rank in (0, 1):
        log = (run_dir / f"logs/rank{rank}.log").read_text()
        match = re.search(r"^GPUS rank=(\d) local=(\d) cvd=(\S+) step_gpus=(\S+)$", log, re.M)
        assert match, log
        assert match.groups()[:3] == (str(rank), str(rank), str(rank)), log
        assert f"tfrun: CUDA_VISIBLE_DEVICES={rank} ({why.format(rank=rank)})" in log
        if "gpus-per-node" in sbatch_line:
            assert match.group(4) == "0,1", log  # Slurm gave every task the node's two GPUs


# --- 6: what Slurm rejects ------------------------------------------------------------------


@pytest.mark.slurm
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["compute.partition=nope"], "invalid partition"),
        (["compute.timeout_min=120"], "Requested time limit is invalid"),
        (["compute.partition=cpu", "compute.gpus_per_node=1"], "Requested node configuration is not available"),
        (["compute.nodes=0"], None),
        (["compute.nodes=3"], "Node count specification invalid"),
    ],
    ids=["partition", "timeout", "gpus_on_cpu_partition", "zero_nodes", "three_nodes"],
)
def test_bad_slurm_input_exits_2_and_queues_nothing(
    tmp_path: Path, job_name: str, overrides: list[str], message: str | None
) -> None:
    write_script(tmp_path, "hello.py", "print('hello')\n")
    result = run_tfrun(
        tmp_path, "compute=slurm", f"compute.job_name={job_name}", "entry.script=hello.py", *overrides, timeout=120
    )
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("tfrun: error: ")]
    assert len(errors) == 1, result.stderr
    if message is None:  # tfrun's own check, before anything reaches Slurm
        assert errors[0] == "tfrun: error: compute.nodes=0 is not valid: an integer >= 1.", errors
        assert "sbatch" not in result.stderr
        assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.submitit"))
    else:
        assert errors[0].startswith("tfrun: error: Slurm rejected the job: "), errors
        assert message.lower() in errors[0].lower(), errors
        assert result.stderr == errors[0] + "\n", "sbatch's words, said twice"
        statuses = list((tmp_path / "runs").glob("*/status.json"))
        assert len(statuses) == 1
        status = read_json(statuses[0])
        assert status["state"] == "FAILED" and message.lower() in status["reason"].lower(), status
    assert queued(job_name) == []
    # Slurm 24.11 records some submissions it rejects (one that can never run in its partition)
    # in accounting, as FAILED jobs that never started; none may have run.
    recorded = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-S", "now-3600", f"--name={job_name}", "-o", "JobID,State,Start"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    ran = [row for row in recorded.splitlines() if row.split("|")[1:] != ["FAILED", "None"]]
    assert ran == [], f"Slurm accepted a job: {recorded}"


# --- 7: the planned sbatch script is the one submitted ----------------------------------------


@pytest.mark.slurm
def test_dry_run_sbatch_is_the_script_submitit_submits(tmp_path: Path, job_name: str) -> None:
    write_script(tmp_path, "hello.py", "print('hello')\n")
    overrides = [
        "compute=slurm",
        "compute.nodes=2",
        "compute.timeout_min=7",
        f"compute.job_name={job_name}",
        "compute.setup=[hostname]",
        "entry.script=hello.py",
        "trainer.lr=0.5",
    ]
    dry = run_tfrun(tmp_path, "--dry-run", *overrides, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())  # nothing written
    lines = dry.stdout.splitlines()
    dry_run_dir = re.search(r"^  run dir: +(\S+)$", dry.stdout, re.M).group(1)
    start = lines.index("  sbatch script:") + 1
    printed = "\n".join(line[4:] for line in lines[start:] if line.startswith("    ") or not line) + "\n"
    assert printed.startswith("#!/bin/bash\n")
    for expected in ("#SBATCH --nodes=2", "#SBATCH --time=7", f"#SBATCH --job-name={job_name}", "hostname"):
        assert expected in printed.splitlines(), printed

    result = run_tfrun(tmp_path, *overrides, timeout=JOB_TIMEOUT)
    assert result.returncode == 0, result.stderr
    run_dir = run_dir_from(result.stderr)
    job_id = submitted_job(result.stderr)
    submitted = (run_dir / f".submitit/{job_id}_submission.sh").read_text()
    planned = read_json(run_dir / "plan.json")["request"]["sbatch"]
    assert planned == submitted
    assert printed.replace(dry_run_dir, str(run_dir)) == submitted
    assert sacct_state(job_id) == "COMPLETED"


# --- 9: one batched query per poll ------------------------------------------------------------

WRAPPER = """\
#!/bin/sh
echo "$(date +%s.%N) {name} $*" >> {calls}
exec {real} "$@"
"""


@pytest.mark.slurm
def test_state_comes_from_one_batched_query_per_poll(tmp_path: Path, job_name: str) -> None:
    wrappers, calls = tmp_path / "bin", tmp_path / "calls.txt"
    wrappers.mkdir()
    for name in ("sacct", "squeue"):
        real = shutil.which(name)
        assert real, f"{name} not on PATH"
        (wrappers / name).write_text(WRAPPER.format(name=name, calls=calls, real=real))
        (wrappers / name).chmod(0o755)
    write_script(tmp_path, "point.py", POINT_SCRIPT)
    poll_s = 1.0
    start = time.monotonic()
    result = run_tfrun(
        tmp_path,
        "-m",
        "compute=slurm",
        f"compute.poll_s={poll_s}",
        f"compute.job_name={job_name}",
        "entry.script=point.py",
        "trainer.sleep=3",
        "trainer.x=1,2,3,4,5,6",
        timeout=JOB_TIMEOUT,
        PATH=f"{wrappers}{os.pathsep}{os.environ['PATH']}",
    )
    wall = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    arrays, sweep_dir = submitted_sweep(result.stderr)
    assert len(arrays) == 1
    array = arrays[0]
    assert array_accounted(array, 6) == {f"{array}_{i}": ["COMPLETED"] for i in range(6)}

    recorded = [line.split()[1:] for line in calls.read_text().splitlines()] if calls.exists() else []
    sacct_calls = [args for args in recorded if args[0] == "sacct"]
    squeue_calls = [args for args in recorded if args[0] == "squeue"]
    # The 6 jobs run 3 s each on 4 cores: several polls happen, and each covers all 6 jobs.
    assert len(sacct_calls) >= 3, recorded
    for args in sacct_calls:
        assert args[args.index("-j") + 1] == array, args
    # One sacct per poll; and one squeue in the polls where sacct does not list some array
    # elements yet (pending ones), for all of those at once.
    limit = wall / poll_s + 3
    assert len(sacct_calls) <= limit, f"{len(sacct_calls)} sacct calls in {wall:.1f} s at poll_s={poll_s}"
    assert len(squeue_calls) <= len(sacct_calls), f"{len(squeue_calls)} squeue calls for {len(sacct_calls)} polls"
    for args in squeue_calls:
        assert args[args.index("-j") + 1] == array, args


# --- the scheduler's bad days --------------------------------------------------------------------

SLEEPER = """\
import time
time.sleep(20)
print("SLEPT", flush=True)
"""


def _running(name: str) -> list[str]:
    """Ids of the running jobs (array elements) with this name."""
    return [line.split()[0] for line in queued(name) if line.endswith(" RUNNING")]


def _stop_slurmdbd() -> None:
    pid = int((SLURM_STATE / "run" / "slurmdbd.pid").read_text().split()[0])
    os.kill(pid, signal.SIGTERM)
    wait_for(
        lambda: not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2],
        30,
        "slurmdbd to stop",
    )
    assert subprocess.run(["sacct", "-n", "-j", "1"], capture_output=True, timeout=60).returncode != 0


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.alone
def test_states_stay_right_without_accounting(tmp_path: Path, job_name: str) -> None:
    """slurmdbd stops while a sweep runs: sacct fails, and tfrun follows the jobs through
    squeue and scontrol until they complete; no live job is taken for gone."""
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    proc, out, err = popen_tfrun(
        tmp_path,
        "-m",
        "compute=slurm",
        f"compute.job_name={job_name}",
        "compute.poll_s=1",
        "entry.script=sleeper.py",
        "trainer.x=1,2",
    )
    try:
        wait_for(lambda: "submitted 2 run(s)" in err.read_text(), 120, "tfrun to submit the sweep")
        # A job paused with SIGSTOP (paused first, so that it cannot end before the pause is
        # seen): the queue says STOPPED (Slurm's word, not tfrun's final one) for a few of
        # tfrun's polls, then it goes on.
        wait_for(lambda: _running(job_name), JOB_TIMEOUT, "a point's job to run")
        paused = _running(job_name)[0]
        subprocess.run(["scancel", "--signal=STOP", paused], check=True, timeout=60)
        wait_for(lambda: f"{paused} STOPPED" in queued(job_name), 30, "the queue to say STOPPED")
        _stop_slurmdbd()
        time.sleep(4)  # the pause without accounting: four of tfrun's polls (compute.poll_s=1) see it
        subprocess.run(["scancel", "--signal=CONT", paused], check=True, timeout=60)
        code = proc.wait(timeout=JOB_TIMEOUT)
        stderr = err.read_text()
        assert code == 0, stderr
        assert "Slurm accounting (sacct) does not answer" in stderr and stderr.count("does not answer") == 1
        sweep = next((tmp_path / "runs").glob("sweep-*"))
        for point in ("0", "1"):
            assert read_json(sweep / point / "status.json")["state"] == "COMPLETED"
            assert "SLEPT" in (sweep / point / "logs" / "rank0.log").read_text()
        shown = run_tfrun(tmp_path, "status", str(sweep), timeout=120)
        assert shown.returncode == 0 and shown.stdout.count("COMPLETED") == 2, shown.stdout + shown.stderr
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run([str(LOCAL_SLURM), "start"], capture_output=True, timeout=300)  # slurmdbd back
