"""Faults, for real (issue 7): preemption and requeue, a rank killed, time limits, the
Slurm controller going away, Ctrl-C; and that checkpoints and metrics stay readable.

Slurm tests run jobs on the local cluster (``scripts/local-slurm``); signals are real
(``scancel --signal``, the time limit, SIGKILL, SIGINT). Every job has a job name of its
own, cancelled afterwards. Training is a small Keras model on scikit-learn's digits,
slowed down by a sleep per batch so that it can be interrupted mid-run. A requeued job
restarts about 12 s after it was requeued here (``AuthInfo=cred_expire=10``).
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    LOCAL_SLURM,
    MlflowServer,
    NodePair,
    accounted,
    alive,
    assert_on_separate_hosts,
    mlflow_runs,
    popen_tfrun,
    read_json,
    run_tfrun,
    slurm_release,
    stop,
    text_of,
    wait_for,
    wait_gone,
)
from tfrun.task import requeue

JOB_TIMEOUT = 600  # generous: the machine is small and other suites share the cluster
EPOCHS = 8

# A Keras fit (Keras 3) slow enough to be interrupted: ~15 batches per epoch, a sleep each.
FIT_SCRIPT = """\
import argparse, os, signal, time
parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=8)
parser.add_argument("--batch_sleep", type=float, default=0.2)
parser.add_argument("--pid_dir", default=None)
parser.add_argument("--kill_rank", type=int, default=-1)   # this rank SIGKILLs itself ...
parser.add_argument("--kill_after", type=float, default=5)  # ... this long into training
parser.add_argument("--stop_delay", type=float, default=0)  # a slow checkpoint on a stop request
parser.add_argument("--stall_after", type=int, default=-1)  # first Slurm attempt: 1 s per batch from this epoch
args = parser.parse_args()
rank = int(os.environ.get("TFRUN_RANK", "0"))
first_attempt = os.environ.get("SLURM_RESTART_COUNT", "0") == "0"
if args.pid_dir:
    with open(os.path.join(args.pid_dir, f"rank{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
if args.stop_delay:
    import tfrun
    tfrun.on_preempt(lambda: time.sleep(args.stop_delay))

import keras
from sklearn.datasets import load_digits

digits = load_digits()
x, y = (digits.data / 16.0).astype("float32"), digits.target
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input(shape=(64,)), keras.layers.Dense(32, activation="relu"),
                          keras.layers.Dense(10, activation="softmax")])
model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")


class Slow(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.began, self.epoch = time.time(), 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        stalled = first_attempt and 0 <= args.stall_after <= self.epoch
        time.sleep(1.0 if stalled else args.batch_sleep)
        if rank == args.kill_rank and time.time() - self.began > args.kill_after:
            with open(os.path.join(args.pid_dir, "killed"), "w") as f:
                f.write(str(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)


model.fit(x, y, epochs=args.epochs, batch_size=128, verbose=2, callbacks=[Slow()])
print(f"rank {rank} TRAINING DONE", flush=True)
"""

# The classic Horovod Keras script (tf.keras is tf_keras: tfrun sets TF_USE_LEGACY_KERAS).
HOROVOD_SCRIPT = """\
import argparse, hashlib, json, os, time
import numpy as np
import tensorflow as tf
import horovod.tensorflow.keras as hvd
from sklearn.datasets import load_digits

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=8)
parser.add_argument("--batch_sleep", type=float, default=0.2)
# From the 6th epoch on, batches take 0.25 s or more until this file exists: a test's job cannot
# end on its own before the test has preempted it, however slow the machine is to show what the
# test checks first. (Until then, and on a machine quick enough, epochs stay short.)
parser.add_argument("--slow_until", default="")
parser.add_argument("--output_dir", default=os.environ.get("TFRUN_OUTPUT_DIR", "outputs"))
args = parser.parse_args()

hvd.init()
tf.keras.utils.set_random_seed(hvd.rank())  # different initial weights: the broadcast must fix them
digits = load_digits()
x = (digits.data / 16.0).astype("float32")[hvd.rank()::hvd.size()]
y = digits.target[hvd.rank()::hvd.size()]
model = tf.keras.Sequential([tf.keras.Input(shape=(64,)), tf.keras.layers.Dense(32, activation="relu"),
                             tf.keras.layers.Dense(10)])
opt = hvd.DistributedOptimizer(tf.keras.optimizers.SGD(0.05 * hvd.size()))
model.compile(optimizer=opt, loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))


def checksum():
    return float(sum(np.abs(w).sum() for w in model.get_weights()))


class Slow(tf.keras.callbacks.Callback):
    # Rank 0 records, in epochs.jsonl, the weights at the start of fit (restored from the
    # backup on a resumed attempt) and at the end of every epoch.

    def record(self, **fields):
        if hvd.rank() == 0:
            with open(os.path.join(os.environ["TFRUN_RUN_DIR"], "epochs.jsonl"), "a") as f:
                f.write(json.dumps(fields) + "\\n")

    def on_train_begin(self, logs=None):
        self.record(begin=True, checksum=checksum())

    def on_epoch_begin(self, epoch, logs=None):
        self.slow = epoch >= 5 and args.slow_until and not os.path.exists(args.slow_until)

    def on_epoch_end(self, epoch, logs=None):
        self.record(epoch=epoch + 1, checksum=checksum())

    def on_train_batch_end(self, batch, logs=None):
        time.sleep(max(args.batch_sleep, 0.25) if self.slow else args.batch_sleep)


callbacks = [hvd.callbacks.BroadcastGlobalVariablesCallback(0), hvd.callbacks.MetricAverageCallback(), Slow()]
model.fit(x, y, batch_size=64, epochs=args.epochs, callbacks=callbacks, verbose=2 if hvd.rank() == 0 else 0)
weights = np.concatenate([w.ravel() for w in model.get_weights()])
os.makedirs(args.output_dir, exist_ok=True)
with open(os.path.join(args.output_dir, f"weights-rank{hvd.rank()}.json"), "w") as f:
    json.dump({"sha": hashlib.sha256(weights.tobytes()).hexdigest()}, f)
print(f"rank {hvd.rank()} TRAINING DONE", flush=True)
"""

POINT_SCRIPT = """\
import argparse, os, time
parser = argparse.ArgumentParser()
parser.add_argument("--x", type=int, required=True)
parser.add_argument("--sleep", type=float, default=45)
args = parser.parse_args()
print(f"point x={args.x} job={os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}", flush=True)
time.sleep(args.sleep)
print(f"point x={args.x} done", flush=True)
"""


# --- jobs, processes -----------------------------------------------------------------------


def write_script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def sacct_state(job_id: str) -> str:
    """How accounting says a job ended, once it knows."""
    return accounted(job_id).get(job_id, "")


def submitted(stderr: str) -> tuple[str, Path]:
    """(job id, run dir) from tfrun's submission line."""
    match = re.search(r"^tfrun: submitted job (\S+); run dir (.+)$", stderr, re.M)
    assert match, f"tfrun did not print the job id:\n{stderr}"
    return match.group(1), Path(match.group(2))


def job_processes(job_id: str) -> list[int]:
    """Live processes (not zombies) whose environment says they belong to this Slurm job."""
    needle = f"\0SLURM_JOB_ID={job_id}\0".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = b"\0" + (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in env and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def first_line_of_status(tmp_path: Path, run: Path | str) -> str:
    result = run_tfrun(tmp_path, "status", str(run), timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[0] if result.stdout else ""


def wait_final(tmp_path: Path, run_dir: Path, timeout: float = JOB_TIMEOUT) -> str:
    """Poll ``tfrun status`` until the run is in a final state; that state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = first_line_of_status(tmp_path, run_dir).rsplit(": ", 1)[-1]
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "STOPPED"):
            return state
        time.sleep(3)
    pytest.fail(f"{run_dir} did not end within {timeout} s")


def attempts(run_dir: Path) -> list[dict[str, Any]]:
    return sorted(read_json(run_dir / "attempts.json").values(), key=lambda a: a["started"])


# --- 7: atomic writes: checked during every run and after it -----------------------------------


def metric_epochs(run_dir: Path) -> list[int]:
    """The epochs of metrics.jsonl, in file order; every line must be complete JSON."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines()]  # raises on a torn line
    return [r["epoch"] for r in records if r.get("epoch") is not None]


def backup_problem(run_dir: Path) -> str | None:
    """What is wrong with the backup right now (None: absent, or state.json names a weights file that exists)."""
    backup = run_dir / "checkpoints" / "backup"
    state_path = backup / "state.json"
    if not state_path.exists():
        return None
    state = json.loads(state_path.read_text())  # raises on a torn file
    if (backup / state["weights"]).is_file():
        return None
    # The chief may have committed a newer epoch (and removed this one) since we read it.
    again = json.loads(state_path.read_text())
    if again != state:
        return None
    return f"state.json names {state['weights']}, which does not exist ({sorted(p.name for p in backup.iterdir())})"


class FileWatch:
    """Reads the run's backup and metrics every 50 ms while a test runs; records anything torn."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.problems, self.reads = run_dir, [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                metric_epochs(self.run_dir)
                problem = backup_problem(self.run_dir)
                if problem:
                    self.problems.append(problem)
            except (json.JSONDecodeError, KeyError) as exc:
                self.problems.append(f"unreadable: {exc!r}")
            except FileNotFoundError:
                pass  # a file replaced between listing and reading: not torn
            self.reads += 1
            time.sleep(0.05)

    def __enter__(self) -> "FileWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def check(self, backup_required: bool = True) -> None:
        assert self.reads > 10, "the watcher hardly ran"
        assert not self.problems, self.problems[:5]
        assert_files_consistent(self.run_dir, backup_required)


def assert_files_consistent(run_dir: Path, backup_required: bool = True) -> None:
    """After a run: the backup's state names an existing weights file; metrics lines all parse."""
    if backup_required:
        assert (run_dir / "checkpoints/backup/state.json").is_file(), "no backup was written"
    assert backup_problem(run_dir) is None, backup_problem(run_dir)
    metric_epochs(run_dir)
    leftovers = [p.name for p in (run_dir / "checkpoints/backup").glob("tmp-*")]
    assert not leftovers, f"unfinished temp files left in the backup: {leftovers}"


def _wait_for_job(err: Path) -> tuple[str, Path]:
    wait_for(lambda: "tfrun: submitted job" in err.read_text(), 120, "tfrun to submit the job")
    return submitted(err.read_text())


# --- 1: a stopped Keras job is requeued and trains every epoch exactly once ---------------------


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_keras_job_is_requeued_and_completes(tmp_path: Path, job_name: str) -> None:
    write_script(tmp_path, "fit.py", FIT_SCRIPT)
    proc, out, err = popen_tfrun(
        tmp_path,
        "compute=slurm",
        f"compute.job_name={job_name}",
        "compute.poll_s=1",
        "entry.script=fit.py",
        f"trainer.epochs={EPOCHS}",
    )
    try:
        job_id, run_dir = _wait_for_job(err)
        with FileWatch(run_dir) as watch:
            wait_for(lambda: len(metric_epochs(run_dir)) >= 2, JOB_TIMEOUT, "two epochs in metrics.jsonl")
            # To the batch shell too (issue 22): it passes the request on and goes on, not FAILED.
            subprocess.run(["scancel", "--full", "--signal=USR2", job_id], check=True, timeout=60)
            code = proc.wait(timeout=JOB_TIMEOUT)
    finally:
        stop(proc)
    stderr = err.read_text()
    assert code == 0, stderr
    assert f"tfrun: job {job_id} COMPLETED" in stderr and "FAILED" not in stderr
    assert metric_epochs(run_dir) == list(range(EPOCHS))
    tried = attempts(run_dir)
    assert [a["reason"] for a in tried] == ["preempted", "completed"], tried
    assert tried[0]["requeued"] is True and tried[0]["job_id"] == tried[1]["job_id"] == job_id, tried
    log = (run_dir / "logs/rank0.log").read_text()
    assert (
        "tfrun: received SIGUSR2" in log
        and f"tfrun: preempted: requeueing job {job_id}; it resumes from the backup" in log
    )
    resumed = re.findall(r"tfrun: resumed from the backup of epoch (\d+)", log)
    assert len(resumed) == 1 and 2 <= int(resumed[0]) < EPOCHS, log
    assert f"Epoch {int(resumed[0]) + 1}/{EPOCHS}" in log.split("resumed from the backup")[1]
    status = read_json(run_dir / "status.json")
    assert status["state"] == "COMPLETED" and status["job_ids"] == [job_id], status  # the same job, the same run
    assert sacct_state(job_id) == "COMPLETED"
    watch.check()


# --- 2: Horovod on 2 nodes, preempted by a higher-priority job (issue 22) -------------------------


def _mlflow_epochs(uri: str, experiment: str) -> list[int]:
    runs = [r for r in mlflow_runs(uri) if r["experiment"] == experiment]
    return [step for step, _ in runs[0]["history"].get("loss", [])] if runs else []


def epoch_records(run_dir: Path) -> list[list[dict[str, Any]]]:
    """epochs.jsonl split into attempts (each begins with its fit's first record)."""
    attempts_seen: list[list[dict[str, Any]]] = []
    for line in text_of(run_dir / "epochs.jsonl").splitlines():
        record = json.loads(line)
        if record.get("begin"):
            attempts_seen.append([])
        attempts_seen[-1].append(record)
    return attempts_seen


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_horovod_job_is_requeued_and_every_rank_resumes_from_the_last_epoch(
    tmp_path: Path, job_name: str, preempt_nodes: NodePair
) -> None:
    epochs = 40  # short epochs (~0.5 s): the backup budget keeps some of them in memory only
    write_script(tmp_path, "hvd_fit.py", HOROVOD_SCRIPT)
    # tracking=mlflow with a real server, on the bridge's address so that the nodes reach it.
    server = MlflowServer(tmp_path, host=socket.gethostbyname("tfctl")).start()
    proc, out, err = popen_tfrun(
        tmp_path,
        "compute=slurm",
        f"compute.job_name={job_name}",
        "compute.poll_s=1",
        f"compute.partition={preempt_nodes.low}",
        "backend=horovod",
        "compute.nodes=2",
        "entry.script=hvd_fit.py",
        f"trainer.epochs={epochs}",
        "trainer.batch_sleep=0.02",
        f"trainer.slow_until={tmp_path / 'preempted'}",
        "tracking=mlflow",
        f"tracking.tracking_uri={server.uri}",
        "tracking.experiment=hvd",
    )
    try:
        job_id, run_dir = _wait_for_job(err)
        with FileWatch(run_dir) as watch:
            wait_for(lambda: len(metric_epochs(run_dir)) >= 3, JOB_TIMEOUT, "three epochs in metrics.jsonl")
            # Already in MLflow while the job trains: sent from inside the job, not at its end.
            wait_for(lambda: _mlflow_epochs(server.uri, "hvd"), 60, "epochs in MLflow while the job runs")
            assert proc.poll() is None and not metric_epochs(run_dir)[-1] == epochs - 1
            preempt_nodes.preempt_and_release(preempt_nodes.first, job_name=job_name, release=tmp_path / "preempted")
            wait_for(
                lambda: proc.poll() is not None or first_line_of_status(tmp_path, run_dir).endswith(": PREEMPTED"),
                120,
                "tfrun status to say PREEMPTED",
            )
            code = proc.wait(timeout=JOB_TIMEOUT)
        runs = [r for r in mlflow_runs(server.uri) if r["experiment"] == "hvd"]
    finally:
        stop(proc)
        server.stop()
    stderr = err.read_text()
    assert code == 0, stderr
    shown = re.findall(rf"^tfrun: job {job_id} (\w+)$", stderr, re.M)
    assert shown[-4:] == ["RUNNING", "PREEMPTED", "RUNNING", "COMPLETED"], stderr
    # One MLflow run across both attempts, each epoch once, ended as the run did.
    assert len(runs) == 1 and runs[0]["status"] == "FINISHED", runs
    assert [step for step, _ in runs[0]["history"]["loss"]] == list(range(epochs))
    assert runs[0]["tags"]["tfrun.slurm_job_id"] == job_id and runs[0]["tags"]["tfrun.attempt"] == f"slurm-{job_id}-1"
    log = (run_dir / "logs/rank0.log").read_text()
    assert (
        f"tfrun: job {job_id} is being preempted (partition {preempt_nodes.low}, PreemptMode=REQUEUE; "
        "20 s of grace time)"
    ) in log
    assert "tfrun: received SIGTERM: checkpointing and stopping" in log
    for rank in (0, 1):
        # Slurm signals the second node a little later than the first: rank 1's SIGTERM may find the job
        # requeued already (rank 0 needs a batch end to stop), and then it just ends.
        log = (run_dir / f"logs/rank{rank}.log").read_text()
        assert "tfrun: received SIGTERM" in log, f"rank {rank}:\n{log}"
        assert f"rank {rank} TRAINING DONE" in log
    first, second = epoch_records(run_dir)
    stopped_at = first[-1]["epoch"]  # the last epoch the first attempt finished
    log = (run_dir / "logs/rank0.log").read_text()
    tried = attempts(run_dir)
    if slurm_release() >= requeue.REQUEUES_PREEMPTED_AS_IT_ENDS:
        # Slurm requeues the job as its tasks end: tfrun leaves it to Slurm (requeued by tfrun
        # too, Slurm would requeue it once more after the next attempt).
        assert f"tfrun: preempted: job {job_id} ends now and Slurm requeues it (PreemptMode=REQUEUE" in log
        assert "requeueing" not in log and tried[0]["requeued_by"] == "slurm", tried
    else:
        assert f"tfrun: preempted: requeueing job {job_id}; it resumes from the backup" in log
        assert tried[0]["requeued_by"] == "tfrun", tried
    assert re.findall(r"tfrun: resumed from the backup of epoch (\d+)", log) == [str(stopped_at)], log
    assert 3 <= stopped_at < epochs
    # The restored weights are exactly those of that epoch, and training went on from the next one.
    assert second[0]["checksum"] == pytest.approx(first[-1]["checksum"], rel=1e-6)
    assert [r["epoch"] for r in second[1:]] == list(range(stopped_at + 1, epochs + 1))
    shas = {r: read_json(run_dir / f"outputs/weights-rank{r}.json")["sha"] for r in (0, 1)}
    assert shas[0] == shas[1], f"the ranks ended with different weights: {shas}"
    assert metric_epochs(run_dir) == list(range(epochs))
    assert [a["reason"] for a in tried] == ["preempted", "completed"], tried
    assert tried[0]["signal"] == "SIGTERM" and tried[0]["grace_s"] == 20, tried
    assert tried[0]["partition"] == preempt_nodes.low, tried
    assert tried[0]["requeued"] is True and requeue.release(tried[0]["slurm_version"]) == slurm_release(), tried
    assert read_json(run_dir / "status.json")["job_ids"] == [job_id]
    assert accounted(job_id).get(job_id) == "COMPLETED"
    # Both attempts met across the two hosts: rank 0's rendezvous at the first node's own address each time.
    assert len(list((run_dir / "rendezvous").glob("*/horovod.json"))) == 2
    assert_on_separate_hosts(run_dir, preempt_nodes.nodes)
    watch.check()


# A script that saves its own progress every second and never listens for a stop request;
# with --slow_backup its stop callback outlasts any grace time.
PROGRESS_SCRIPT = """\
import argparse, json, os, time
parser = argparse.ArgumentParser()
parser.add_argument("--slow_backup", type=int, default=0)
# 25 epochs, and then on until this file exists: a test's job cannot end on its own before the
# test has preempted it, however slow the machine is to start the test's other jobs.
parser.add_argument("--go_on_until", default="")
args = parser.parse_args()
path = os.path.join(os.environ["TFRUN_RUN_DIR"], "progress.json")
done = json.load(open(path))["epochs"] if os.path.exists(path) else 0
print(f"attempt {os.environ.get('SLURM_RESTART_COUNT', '0')} starts at epoch {done}", flush=True)
if args.slow_backup:
    import tfrun
    tfrun.on_preempt(lambda: time.sleep(300))
epoch = done
while epoch < 25 or (args.go_on_until and not os.path.exists(args.go_on_until)):
    time.sleep(1)
    epoch += 1
    with open(path + ".tmp", "w") as f:
        json.dump({"epochs": epoch}, f)
    os.replace(path + ".tmp", path)
    print(f"epoch {epoch} saved", flush=True)
"""


@pytest.mark.slurm
@pytest.mark.slow
def test_preemption_where_slurm_cancels_and_past_the_grace_time(
    tmp_path: Path, job_name: str, preempt_nodes: NodePair
) -> None:
    """Three jobs preempted by one job that needs both nodes. In "scavenge" (Slurm cancels
    preempted jobs): a Keras fit with epochs shorter than its backup budget is requeued by
    tfrun and resumes from its last finished epoch, held in memory until the SIGTERM; with
    compute.requeue_on_preempt=false, a script that does not listen stops at once and the run
    ends STOPPED, resumable. In "low" (Slurm requeues them), a script whose backup outlasts
    the grace time is killed and Slurm requeues it, once: it starts again from its last
    save, losing only the epoch in progress."""
    write_script(tmp_path, "progress.py", PROGRESS_SCRIPT)
    write_script(tmp_path, "fast.py", FAST_FIT)
    nodes = preempt_nodes
    common = ["compute=slurm", f"compute.job_name={job_name}", "compute.poll_s=1"]
    preempted = tmp_path / "preempted"
    keras_proc, _, keras_err = popen_tfrun(
        tmp_path,
        *common,
        f"compute.partition={nodes.scavenge}",
        f"compute.nodelist={nodes.second}",
        "entry.script=fast.py",
        "trainer.epochs=120",
        "trainer.stop_after=0",
        "trainer.batch_sleep=0.025",
        name="keras",
    )
    cancelled_proc, _, cancelled_err = popen_tfrun(
        tmp_path,
        *common,
        f"compute.partition={nodes.scavenge}",
        f"compute.nodelist={nodes.first}",
        "compute.requeue_on_preempt=false",
        "entry.script=progress.py",
        f"trainer.go_on_until={preempted}",
        name="scavenge",
    )
    slow_proc, _, slow_err = popen_tfrun(
        tmp_path,
        *common,
        f"compute.partition={nodes.low}",
        f"compute.nodelist={nodes.first}",
        "entry.script=progress.py",
        "trainer.slow_backup=1",
        f"trainer.go_on_until={preempted}",
        name="low",
    )
    procs = (keras_proc, cancelled_proc, slow_proc)
    try:
        keras_job, keras_dir = _wait_for_job(keras_err)
        cancelled_job, cancelled_dir = _wait_for_job(cancelled_err)
        slow_job, slow_dir = _wait_for_job(slow_err)
        for run_dir in (cancelled_dir, slow_dir):
            wait_for(lambda: "epoch 3 saved" in text_of(run_dir / "logs/rank0.log"), JOB_TIMEOUT, "three epochs")
        wait_for(lambda: len(metric_epochs(keras_dir)) >= 10, JOB_TIMEOUT, "ten epochs of the Keras fit")
        nodes.preempt_and_release(nodes.first, nodes.second, job_name=job_name, release=preempted)
        assert cancelled_proc.wait(timeout=JOB_TIMEOUT) != 0  # not completed
        assert slow_proc.wait(timeout=JOB_TIMEOUT) == 0, slow_err.read_text()
        assert keras_proc.wait(timeout=JOB_TIMEOUT) == 0, keras_err.read_text()
    finally:
        for proc in procs:
            stop(proc)

    # Cancelled by Slurm, requeued by tfrun: the last finished epoch, held in memory, was
    # written at the SIGTERM; the weights go on from exactly there.
    records = [json.loads(line) for line in (keras_dir / "epochs.jsonl").read_text().splitlines()]
    begins = [i for i, r in enumerate(records) if r.get("begin")]
    assert len(begins) == 2, records[:3]
    first = [r for r in records[: begins[1]] if "epoch" in r]
    assert len({r["backed_up"] for r in first}) < len(first) // 2, "epochs this short should not all be saved"
    last = first[-1]["epoch"]
    log = (keras_dir / "logs/rank0.log").read_text()
    assert f"tfrun: job {keras_job} is being preempted (partition {nodes.scavenge}, PreemptMode=CANCEL" in log
    assert f"tfrun: resumed from the backup of epoch {last}" in log and "TRAINING DONE" in log
    assert records[begins[1]]["checksum"] == pytest.approx(first[-1]["checksum"], rel=1e-6)
    assert [r["epoch"] for r in records[begins[1] :] if "epoch" in r] == list(range(last + 1, 121))
    assert metric_epochs(keras_dir) == list(range(120))
    tried = attempts(keras_dir)
    assert [a["reason"] for a in tried] == ["preempted", "completed"], tried
    assert tried[0]["requeued_by"] == "tfrun" and tried[0]["preempt_mode"] == "CANCEL", tried
    assert f"tfrun: job {keras_job} PREEMPTED" in keras_err.read_text()

    # Cancelled by Slurm, not requeued: STOPPED, saying why and how to continue.
    stderr = cancelled_err.read_text()
    assert "tfrun: run " in stderr and " STOPPED in " in stderr, stderr
    why = f"partition {nodes.scavenge} ends preempted jobs (PreemptMode=CANCEL) and compute.requeue_on_preempt=false"
    assert f"tfrun: preempted; not requeued ({why})" in stderr
    assert f"tfrun: continue it with: tfrun resume {cancelled_dir}" in stderr
    log = (cancelled_dir / "logs/rank0.log").read_text()
    assert "tfrun: received SIGTERM" in log and "stopped on request" in log  # at once: it does not listen
    (tried,) = attempts(cancelled_dir)
    assert tried["reason"] == "preempted" and tried["requeued"] is False and tried["why_not_requeued"] == why, tried
    assert tried["preempt_mode"] == "CANCEL" and tried["signal"] == "SIGTERM", tried
    assert first_line_of_status(tmp_path, cancelled_dir).endswith(": STOPPED")

    # Past the grace time: killed, requeued by Slurm itself (once), resumed from the last save.
    log = (slow_dir / "logs/rank0.log").read_text()
    first_part, second_part = log.split("attempt 1 starts at epoch ")
    saved = [int(n) for n in re.findall(r"^epoch (\d+) saved$", first_part, re.M)]
    assert second_part.startswith(f"{saved[-1]}\n"), log
    # Slurm's second SIGTERM, when the grace time is over: the task ends at once.
    assert "tfrun: received SIGTERM again: Slurm is ending the task; ending now" in first_part
    assert "requeueing" not in first_part  # tfrun never got to requeue it: Slurm did
    restarts = re.findall(
        r"^Restarts=(\d+)$",
        subprocess.run(["scontrol", "show", "job", slow_job], capture_output=True, text=True).stdout.replace(" ", "\n"),
        re.M,
    )
    if slurm_release() >= requeue.REQUEUES_PREEMPTED_AS_IT_ENDS:
        # Slurm requeued it at the end of the grace time, then once more when that attempt
        # completed: that third start ends at once.
        assert restarts == ["2"], restarts
        assert f"tfrun: job {slow_job} started again after its attempt slurm-{slow_job}-1 completed the run" in log
    else:
        assert restarts == ["1"], restarts
    tried = attempts(slow_dir)
    assert [a["reason"] for a in tried] == ["preempted", "completed"], tried
    assert "epoch 25 saved" in log


# --- 3: a rank killed with SIGKILL ends the job within 30 s, named, and nothing is left --------------


@pytest.mark.slurm
@pytest.mark.slow
def test_rank_killed_by_sigkill_fails_the_job_quickly_and_leaves_nothing(tmp_path: Path, job_name: str) -> None:
    write_script(tmp_path, "fit.py", FIT_SCRIPT)
    pids = tmp_path / "pids"
    pids.mkdir()
    result = run_tfrun(
        tmp_path,
        "compute=slurm",
        "compute.nodes=2",
        f"compute.job_name={job_name}",
        "compute.poll_s=1",
        "entry.script=fit.py",
        "trainer.epochs=100",
        f"trainer.pid_dir={pids}",
        "trainer.kill_rank=1",
        "trainer.kill_after=5",
        timeout=JOB_TIMEOUT,
    )
    returned = time.time()
    assert result.returncode == 1, result.stderr
    job_id, run_dir = submitted(result.stderr)
    killed = float((pids / "killed").read_text())
    assert returned - killed < 30, f"tfrun reported the failure {returned - killed:.0f} s after the kill"
    assert "Epoch 1/100" in (run_dir / "logs/rank0.log").read_text()  # rank 0 was training

    status = read_json(run_dir / "status.json")
    assert status["state"] == "FAILED" and status["failed_rank"] == 1, status
    assert "SIGKILL" in status["reason"] and status["host"] == "node2", status
    assert "rank 1 on node2 failed: killed by SIGKILL" in result.stderr
    assert sacct_state(job_id) == "FAILED"
    shown = run_tfrun(tmp_path, "status", str(run_dir), timeout=120).stdout
    assert shown.startswith(f"run {status['run_id']}: FAILED"), shown
    assert "rank 1 on node2 failed: killed by SIGKILL" in shown, shown

    task_pids = [int((pids / f"rank{r}.pid").read_text()) for r in (0, 1)]
    assert wait_gone(task_pids, timeout=15) == [], "a rank of the failed job is still running"
    wait_for(lambda: not job_processes(job_id), 30, f"every process of job {job_id} to end")
    assert_files_consistent(run_dir, backup_required=False)  # killed mid-epoch: whatever was written is whole


# --- 4: time limits: requeued as a time-out; bounded by compute.max_requeues ----------------------


@pytest.mark.slurm
@pytest.mark.slow
def test_time_limit_requeues_and_max_requeues_bounds_it(tmp_path: Path, job_name: str) -> None:
    """Both runs at once (to halve the wait): timeout_min=1 with the warning 45 s before it.

    Slurm checks time limits about every 30 s, so the warning comes 15-45 s into an
    attempt (in practice ~30 s after a requeued job restarts), of which TensorFlow's
    start takes 8-25 s on this loaded machine: too little and too variable a window to
    make "more than one attempt, but not too many" a matter of training speed. So
    ``finishes`` trains at ~2 s an epoch but stalls (1 s a batch) from its third epoch
    on in its first Slurm attempt only (``SLURM_RESTART_COUNT=0``): that attempt always
    hits the time limit, later ones train at full speed from the backup until done.
    ``bounded``: training far too long, max_requeues=1: the first time-out is requeued,
    the second is not.
    """
    write_script(tmp_path, "fit.py", FIT_SCRIPT)
    common = [
        "compute=slurm",
        f"compute.job_name={job_name}",
        "compute.wait=false",
        "compute.timeout_min=1",
        "compute.signal_delay_s=45",
        "entry.script=fit.py",
    ]
    runs = {}
    for name, extra in (
        (
            "finishes",
            [
                f"trainer.epochs={EPOCHS}",
                "compute.max_requeues=10",
                "trainer.batch_sleep=0.05",
                "trainer.stall_after=2",
            ],
        ),
        ("bounded", ["trainer.epochs=200", "compute.max_requeues=1", "trainer.batch_sleep=0.3"]),
    ):
        result = run_tfrun(tmp_path, *common, *extra, timeout=120)
        assert result.returncode == 0, result.stderr
        runs[name] = submitted(result.stderr)
    watches = {name: FileWatch(run_dir).__enter__() for name, (_, run_dir) in runs.items()}
    try:
        states = {name: wait_final(tmp_path, run_dir, timeout=900) for name, (_, run_dir) in runs.items()}
    finally:
        for watch in watches.values():
            watch.__exit__()

    job_id, run_dir = runs["finishes"]
    assert states["finishes"] == "COMPLETED", (run_dir / "logs/rank0.log").read_text()[-3000:]
    tried = attempts(run_dir)
    assert [a["reason"] for a in tried[:-1]] == ["timeout"] * (len(tried) - 1) and len(tried) >= 2, tried
    assert all(a["requeued"] is True for a in tried[:-1]) and tried[-1]["reason"] == "completed", tried
    assert metric_epochs(run_dir) == list(range(EPOCHS))
    assert read_json(run_dir / "status.json")["job_ids"] == [job_id]
    watches["finishes"].check()

    job_id, run_dir = runs["bounded"]
    assert states["bounded"] in ("TIMEOUT", "FAILED"), states
    tried = attempts(run_dir)
    assert [(a["reason"], a["requeued"]) for a in tried] == [("timeout", True), ("timeout", False)], tried
    log = (run_dir / "logs/rank0.log").read_text()
    assert "time limit reached after 1 requeue(s) already (compute.max_requeues=1): not requeued" in log
    assert sacct_state(job_id) in ("TIMEOUT", "FAILED")
    epochs = metric_epochs(run_dir)
    assert epochs == list(range(len(epochs))), epochs  # what was trained (maybe nothing), once each
    watches["bounded"].check(backup_required=bool(epochs))


# --- 5: the controller reconfigured and restarted under a running sweep ------------------------------


def _sweep_rows(tmp_path: Path, sweep_dir: Path) -> list[list[str]]:
    result = run_tfrun(tmp_path, "status", str(sweep_dir), timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"sweep {sweep_dir}: 3 run(s)"), result.stdout
    return [line.split() for line in result.stdout.splitlines()[1:]]


def _queue_states(array: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-j", array, "-o", "%T"], capture_output=True, text=True, timeout=60)
    return out.stdout.split() if out.returncode == 0 else []


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.alone
def test_sweep_status_survives_reconfigure_and_controller_restart(tmp_path: Path, job_name: str) -> None:
    write_script(tmp_path, "point.py", POINT_SCRIPT)
    result = run_tfrun(
        tmp_path,
        "-m",
        "compute=slurm",
        f"compute.job_name={job_name}",
        "compute.wait=false",
        "entry.script=point.py",
        "trainer.sleep=40",
        "trainer.x=1,2,3",
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    match = re.search(r"^tfrun: submitted 3 run\(s\) as job\(s\) (\d+); sweep dir (.+)$", result.stderr, re.M)
    assert match, result.stderr
    array, sweep_dir = match.group(1), Path(match.group(2))
    jobs = [f"{array}_{i}" for i in range(3)]

    def running() -> bool:
        return all(
            "point x=" in (sweep_dir / str(i) / "logs/rank0.log").read_text()
            if (sweep_dir / str(i) / "logs/rank0.log").exists()
            else False
            for i in range(3)
        )

    wait_for(running, JOB_TIMEOUT, "every point to start")
    # sacct learns of a start from slurmdbd a moment after the script printed its line.
    wait_for(
        lambda: (
            [row[:4] for row in _sweep_rows(tmp_path, sweep_dir)]
            == [[str(i), "RUNNING", "job", jobs[i]] for i in range(3)]
        ),
        30,
        "tfrun status to say RUNNING for every point",
    )

    reconfigured = subprocess.run(["scontrol", "reconfigure"], capture_output=True, text=True, timeout=120)
    assert reconfigured.returncode == 0, reconfigured.stderr
    # The controller has read its configuration again once it answers for the jobs, still running.
    wait_for(lambda: _queue_states(array) == ["RUNNING"] * 3, 60, "the controller to answer after the reconfigure")
    assert [row[:4] for row in _sweep_rows(tmp_path, sweep_dir)] == [
        [str(i), "RUNNING", "job", jobs[i]] for i in range(3)
    ]

    pid_file = Path("/var/lib/tfrun-slurm/run/slurmctld.pid")
    before = pid_file.read_text().strip()
    restarted = subprocess.run([str(LOCAL_SLURM), "restart-controller"], capture_output=True, text=True, timeout=180)
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert pid_file.read_text().strip() != before, "slurmctld was not restarted"
    rows = _sweep_rows(tmp_path, sweep_dir)
    assert [row[:4] for row in rows] == [[str(i), row[1], "job", jobs[i]] for i, row in enumerate(rows)], rows
    assert all(row[1] in ("RUNNING", "COMPLETED") for row in rows), rows

    for i in range(3):
        assert wait_final(tmp_path, sweep_dir / str(i)) == "COMPLETED"
    assert [row[:4] for row in _sweep_rows(tmp_path, sweep_dir)] == [
        [str(i), "COMPLETED", "job", jobs[i]] for i in range(3)
    ]
    for i, x in enumerate((1, 2, 3)):
        status = read_json(sweep_dir / str(i) / "status.json")
        assert status["job_ids"] == [jobs[i]], status  # not resubmitted, not renumbered
        assert f"point x={x} done" in (sweep_dir / str(i) / "logs/rank0.log").read_text()
        assert sacct_state(jobs[i]) == "COMPLETED"


# --- 6: Ctrl-C locally: a clean, resumable stop; twice: cancelled -------------------------------------


def _local_run_dir(tmp_path: Path) -> Path:
    found = (
        [p for p in (tmp_path / "runs").iterdir() if (p / "plan.json").exists()] if (tmp_path / "runs").exists() else []
    )
    return found[0] if len(found) == 1 else Path("/nonexistent")


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_resume_completes(tmp_path: Path) -> None:
    write_script(tmp_path, "fit.py", FIT_SCRIPT)
    # ~1.5 s epochs (0.1 s a batch): the Ctrl-C still lands mid-fit, after epoch 2 of 8.
    proc, out, err = popen_tfrun(tmp_path, "entry.script=fit.py", f"trainer.epochs={EPOCHS}", "trainer.batch_sleep=0.1")
    try:
        wait_for(lambda: (_local_run_dir(tmp_path) / "plan.json").exists(), 120, "the run dir")
        run_dir = _local_run_dir(tmp_path)
        with FileWatch(run_dir) as watch:
            wait_for(lambda: len(metric_epochs(run_dir)) >= 2, JOB_TIMEOUT, "two epochs in metrics.jsonl")
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=180)
    finally:
        stop(proc)
    stderr = err.read_text()
    assert code != 0, stderr
    assert "Traceback" not in stderr + out.read_text()
    assert f"tfrun: continue it with: tfrun resume {run_dir}" in stderr
    status = read_json(run_dir / "status.json")
    assert status["state"] == "STOPPED", status
    state = read_json(run_dir / "checkpoints/backup/state.json")
    assert state["epoch"] >= 2 and (run_dir / "checkpoints/backup" / state["weights"]).is_file()
    assert attempts(run_dir)[-1]["reason"] == "stopped"
    watch.check()
    stopped_at = state["epoch"]
    assert metric_epochs(run_dir) == list(range(stopped_at))

    with FileWatch(run_dir) as watch:
        resumed = run_tfrun(tmp_path, "resume", run_dir.name, timeout=JOB_TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr
    assert read_json(run_dir / "status.json")["state"] == "COMPLETED"
    log = (run_dir / "logs/rank0.log").read_text()
    assert f"tfrun: resumed from the backup of epoch {stopped_at}" in log and "rank 0 TRAINING DONE" in log
    assert metric_epochs(run_dir) == list(range(EPOCHS))
    assert [a["reason"] for a in attempts(run_dir)] == ["stopped", "completed"]
    watch.check()


@pytest.mark.slow
def test_second_ctrl_c_during_the_stop_cancels(tmp_path: Path) -> None:
    """The script's checkpoint on a stop request takes 60 s (``tfrun.on_preempt``): a second
    Ctrl-C does not wait for it."""
    write_script(tmp_path, "fit.py", FIT_SCRIPT)
    proc, out, err = popen_tfrun(tmp_path, "entry.script=fit.py", "trainer.epochs=100", "trainer.stop_delay=60")
    try:
        wait_for(lambda: (_local_run_dir(tmp_path) / "plan.json").exists(), 120, "the run dir")
        run_dir = _local_run_dir(tmp_path)
        wait_for(lambda: len(metric_epochs(run_dir)) >= 1, JOB_TIMEOUT, "an epoch in metrics.jsonl")
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: "tfrun: stopping" in out.read_text(), 30, "tfrun to ask the task to stop")
        wait_for(lambda: "checkpointing and stopping" in out.read_text(), 30, "the task to get the request")
        assert proc.poll() is None
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
        took = time.monotonic() - sent
    finally:
        stop(proc)
    stderr = err.read_text()
    assert code != 0 and took < 15, (code, took, stderr)
    assert read_json(run_dir / "status.json")["state"] == "CANCELLED"
    assert "CANCELLED" in stderr
    pid = read_json(run_dir / "ranks/0.json")["pid"]
    assert wait_gone([pid], timeout=10) == [], "the task survived the second Ctrl-C"
    assert_files_consistent(run_dir)


# --- 8: short epochs: backups spaced within their time budget, the last epoch written on a stop ---

FAST_FIT = """\
import argparse, json, os, signal, time
import numpy as np
import keras
from sklearn.datasets import load_digits

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=60)
parser.add_argument("--stop_after", type=int, default=25)  # first attempt: a stop request after this epoch
parser.add_argument("--batch_sleep", type=float, default=0)  # slower epochs, still shorter than a save budget
args = parser.parse_args()
run_dir = os.environ["TFRUN_RUN_DIR"]
first_attempt = not os.path.exists(os.path.join(run_dir, "first-attempt-done"))
digits = load_digits()
x, y = (digits.data / 16.0).astype("float32"), digits.target
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input(shape=(64,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)])
model.compile(optimizer=keras.optimizers.Adam(0.003),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

def checksum():
    return float(sum(np.abs(w).sum() for w in model.get_weights()))

class Record(keras.callbacks.Callback):
    def record(self, **fields):
        with open(os.path.join(run_dir, "epochs.jsonl"), "a") as f:
            f.write(json.dumps(fields) + "\\n")

    def on_train_begin(self, logs=None):
        self.record(begin=True, checksum=checksum())

    def on_train_batch_end(self, batch, logs=None):
        time.sleep(args.batch_sleep)

    def on_epoch_end(self, epoch, logs=None):
        try:  # what the backup holds when this epoch ends (tfrun's own callback runs after this one)
            backed_up = json.load(open(os.path.join(run_dir, "checkpoints/backup/state.json")))["epoch"]
        except FileNotFoundError:
            backed_up = None
        self.record(epoch=epoch + 1, checksum=checksum(), backed_up=backed_up)
        if first_attempt and epoch + 1 == args.stop_after:
            open(os.path.join(run_dir, "first-attempt-done"), "w").close()
            os.kill(os.getpid(), signal.SIGUSR2)  # what Slurm's warning or Ctrl-C sends

model.fit(x, y, epochs=args.epochs, batch_size=512, verbose=0, callbacks=[Record()])
print("TRAINING DONE", flush=True)
"""


@pytest.mark.slow
def test_short_epochs_are_backed_up_within_budget_and_resume_exactly(tmp_path: Path) -> None:
    write_script(tmp_path, "fast.py", FAST_FIT)
    stopped = run_tfrun(
        tmp_path, "entry.script=fast.py", "trainer.epochs=60", "trainer.stop_after=25", timeout=JOB_TIMEOUT
    )
    assert stopped.returncode != 0, stopped.stderr
    run_dir = _local_run_dir(tmp_path)
    assert read_json(run_dir / "status.json")["state"] == "STOPPED"
    first = [json.loads(line) for line in (run_dir / "epochs.jsonl").read_text().splitlines()]
    epochs = [r for r in first if "epoch" in r]
    # Epochs of a few ms against a save of ~10 ms: far fewer saves than epochs ...
    saves = {r["backed_up"] for r in epochs if r["backed_up"] is not None}
    assert len(saves) <= len(epochs) // 3, saves
    # ... yet the stop request wrote the last finished epoch, and metrics match it.
    state = read_json(run_dir / "checkpoints/backup/state.json")
    last = epochs[-1]["epoch"]
    assert state["epoch"] == last >= 25, (state, last)
    assert metric_epochs(run_dir) == list(range(last))
    assert_files_consistent(run_dir)

    resumed = run_tfrun(tmp_path, "resume", run_dir.name, timeout=JOB_TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr
    log = (run_dir / "logs/rank0.log").read_text()
    assert f"tfrun: resumed from the backup of epoch {last}" in log and "TRAINING DONE" in log
    records = [json.loads(line) for line in (run_dir / "epochs.jsonl").read_text().splitlines()]
    begins = [i for i, r in enumerate(records) if r.get("begin")]
    assert len(begins) == 2
    # The resumed weights are exactly those of the last finished epoch (held in memory, then written).
    assert records[begins[1]]["checksum"] == pytest.approx(epochs[-1]["checksum"], rel=1e-6)
    assert [r["epoch"] for r in records[begins[1] :] if "epoch" in r] == list(range(last + 1, 61))
    assert metric_epochs(run_dir) == list(range(60))
    assert read_json(run_dir / "checkpoints/backup/state.json")["epoch"] == 60  # written when fit ended
