"""Hangs and lost nodes: a stalled rank is found, its stacks shown, named, and the run ended
(or requeued) long before its time limit; a rank that pauses legitimately, or reports no
steps while it works, is left alone. Real processes, locally and as Slurm jobs on the local
cluster's separate hosts."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import (
    SLURM_STATE,
    NodePair,
    alive,
    node_address,
    popen_tfrun,
    read_json,
    run_dir_from,
    run_tfrun,
    stop,
    text_of,
    wait_for,
)

pytestmark = pytest.mark.slow

# Far above a healthy rank's silence here (steps of 0.2-0.25 s, validation batches of 2 s, a
# heartbeat file written every 2 s: at most ~4 s without news), and every second of it is
# waited for in each test below (twice where a job is requeued).
HANG_S = 10
# Two Horovod ranks allreduce step after step; at step 5 rank 1 stops: blocked in its own
# code (as in a stuck read), or frozen as a whole (SIGSTOP: it can run no handler at all).
# Rank 0 goes on into the next allreduce and waits there.
HOROVOD_STUCK = """\
import argparse, os, signal, time
import horovod.tensorflow as hvd
import tensorflow as tf
import tfrun

p = argparse.ArgumentParser()
p.add_argument("--how", default="blocks")
args = p.parse_args()
hvd.init()
for step in range(1, 100000):
    hvd.allreduce(tf.constant(1.0), op=hvd.Sum)
    tfrun.heartbeat(step)
    if step == 5 and hvd.rank() == 1:
        print("rank 1 stops now", flush=True)
        if args.how == "freezes":
            os.kill(os.getpid(), signal.SIGSTOP)
        else:
            time.sleep(3600)  # stuck_here
    time.sleep(0.2)
"""
# Keras fit whose epoch ends with a 24 s validation (2 s a batch): slow, not stuck (HANG_S is 10).
SLOW_VALIDATION = """\
import time
import numpy as np
import tensorflow as tf

class SlowValidation(tf.keras.callbacks.Callback):
    def on_test_batch_end(self, batch, logs=None):
        time.sleep(2.0)

x = np.random.rand(256, 8).astype("float32")
y = (x.sum(axis=1) > 4).astype("float32")
model = tf.keras.Sequential([tf.keras.Input(shape=(8,)), tf.keras.layers.Dense(1, activation="sigmoid")])
model.compile(optimizer="sgd", loss="binary_crossentropy")
model.fit(x, y, epochs=1, batch_size=64, validation_data=(x[:96], y[:96]), validation_batch_size=8,
          callbacks=[SlowValidation()], verbose=2)
print("FIT DONE", flush=True)
"""


def script(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def hang_of(run_dir: Path) -> dict:
    status = read_json(run_dir / "status.json")
    assert status["state"] == "FAILED" and status.get("hang"), status
    return status


def assert_ended_soon(status: dict, within_s: float) -> None:
    """From the moment the rank stopped making progress to the run's end."""
    hang = status["hang"]
    stopped = hang["detected"] - hang["stalled_s"]
    assert status["ended"] - stopped < within_s, (status["ended"] - stopped, hang)


def stacks_in(log: str) -> list[str]:
    """The frames of the faulthandler dumps in a rank's log."""
    return re.findall(r'^\s+File "(.*)", line \d+ in (\S+)', log, re.MULTILINE)


@pytest.mark.parametrize("how", ["blocks", "freezes"])
def test_a_local_horovod_rank_that_stops_is_found_named_and_ended(tmp_path: Path, how: str) -> None:
    stuck = script(tmp_path, "stuck.py", HOROVOD_STUCK)
    result = run_tfrun(
        tmp_path,
        f"entry.script={stuck}",
        f"trainer.how={how}",
        "backend=horovod",
        "compute.tasks_per_node=2",
        f"compute.hang_timeout_s={HANG_S}",
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    run_dir = run_dir_from(result.stderr)
    status = hang_of(run_dir)
    assert status["failed_rank"] == 1 and status["hang"]["rank"] == 1, status
    assert "rank 1 on" in status["reason"] and "made no progress" in status["reason"], status["reason"]
    assert "ranks waiting: 0 on" in status["reason"], status["reason"]
    assert f"rank 1 on {status['host']} failed: hang: rank 1" in result.stderr
    assert_ended_soon(status, within_s=60)
    logs = {r: (run_dir / f"logs/rank{r}.log").read_text() for r in (0, 1)}
    # rank 0 waits in the next allreduce: its stacks say so
    assert any("allreduce" in func for _, func in stacks_in(logs[0])), logs[0][-3000:]
    if how == "blocks":
        assert status["hang"]["step"] == 5
        assert any(path.endswith("stuck.py") for path, _ in stacks_in(logs[1])), logs[1][-3000:]
    else:  # a frozen process answers no signal: py-spy reads its stacks from outside
        assert "rank 1's stacks from py-spy" in logs[1] and "stuck.py" in logs[1].split("py-spy")[-1], logs[1][-3000:]


def test_a_long_validation_is_not_a_hang(tmp_path: Path) -> None:
    slow = script(tmp_path, "slow.py", SLOW_VALIDATION)
    result = run_tfrun(tmp_path, f"entry.script={slow}", f"compute.hang_timeout_s={HANG_S}", timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FIT DONE" in result.stdout
    run_dir = run_dir_from(result.stderr)
    status = read_json(run_dir / "status.json")
    assert status["state"] == "COMPLETED" and not status.get("hang"), status


# A script that never calls tfrun: it waits for a child process that computes, computes itself,
# each for far longer than the hang timeout, then blocks in a read nobody will ever answer.
SILENT_THEN_BLOCKED = """\
import os, subprocess, sys, time

def compute(seconds):
    end = time.time() + seconds
    while time.time() < end:
        sum(i * i for i in range(10000))

subprocess.run([sys.executable, "-c", "import time\\nend = time.time() + 20\\nwhile time.time() < end: pass"], check=True)
compute(20)
fifo = os.path.join(os.environ["TFRUN_OUTPUT_DIR"], "nobody-writes-here")
os.mkfifo(fifo)
with open(os.path.join(os.environ["TFRUN_OUTPUT_DIR"], "blocked-at"), "w") as f:
    f.write(str(time.time()))
print("reading", flush=True)
open(fifo).read()  # blocked_here
"""


def kill_tasks(run_dir: Path) -> None:
    """Whatever a run left running (a tree whose watchdog did not end it)."""
    for record in (run_dir / "ranks").glob("*.json"):
        pid = read_json(record).get("pid")
        if pid and alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_script_that_reports_no_steps_is_judged_by_what_it_does(tmp_path: Path) -> None:
    """40 s of work with no step, no output, no tfrun call (8 s timeout) is no hang; the read
    that then blocks is one, found within the timeout and named with its stack."""
    silent = script(tmp_path, "silent.py", SILENT_THEN_BLOCKED)
    proc, _out, err = popen_tfrun(tmp_path, f"entry.script={silent}", "compute.hang_timeout_s=8")
    try:
        wait_for(
            lambda: list(tmp_path.glob("runs/*/outputs/blocked-at")) or proc.poll() is not None,
            240,
            "the script to block",
        )
        assert proc.poll() is None, text_of(err)[-3000:]  # the work before was no hang
        run_dir = next(tmp_path.glob("runs/*/outputs/blocked-at")).parents[1]
        blocked = float((run_dir / "outputs/blocked-at").read_text())
        wait_for(lambda: proc.poll() is not None, 60, "the watchdog to end the blocked run")
    finally:
        stop(proc)
        for found in tmp_path.glob("runs/*/ranks"):
            kill_tasks(found.parent)
    status = hang_of(run_dir)
    assert status["failed_rank"] == 0, status
    assert "rank 0 on" in status["reason"] and "since its script last used CPU" in status["reason"], status
    assert status["hang"]["detected"] - blocked < 8 + 15, (status["hang"], blocked)
    log = (run_dir / "logs/rank0.log").read_text()
    assert any(path.endswith("silent.py") for path, _ in stacks_in(log)), log[-3000:]


# py-spy as on a busy node, where a dump of a training rank takes many seconds of CPU: the real
# one, started late. It leaves a file as it starts.
SLOW_PY_SPY = """\
#!/bin/sh
touch "{started}"
sleep {delay}
exec "{real}" "$@"
"""


def test_a_hang_is_on_record_before_py_spy_has_read_the_stacks(tmp_path: Path) -> None:
    """The rank that stopped, and why, are in status.json while py-spy still reads the stacks:
    the user learns of the hang without waiting for it. Its stacks still reach the rank's log."""
    real = Path(sys.executable).parent / "py-spy"
    assert real.exists(), f"py-spy (a test dependency) is not installed beside {sys.executable}"
    slow = tmp_path / "slow-bin"
    slow.mkdir()
    started = tmp_path / "py-spy-started"
    (slow / "py-spy").write_text(SLOW_PY_SPY.format(started=started, delay=20, real=real))
    (slow / "py-spy").chmod(0o755)
    blocked = script(
        tmp_path, "blocked.py", "import time\nprint('blocking', flush=True)\ntime.sleep(3600)  # blocked_here\n"
    )
    proc, _out, err = popen_tfrun(
        tmp_path, f"entry.script={blocked}", "compute.hang_timeout_s=5", PATH=f"{slow}:{os.environ['PATH']}"
    )
    try:
        wait_for(lambda: started.exists() or proc.poll() is not None, 180, "the watchdog to start py-spy")
        assert proc.poll() is None, text_of(err)[-3000:]
        (run_dir,) = [found.parent for found in tmp_path.glob("runs/*/status.json")]
        status = read_json(run_dir / "status.json")
        assert status.get("hang") and status.get("failed_rank") == 0, status
        assert "rank 0 on" in status["reason"] and "made no progress" in status["reason"], status
        assert proc.wait(timeout=120) == 1, text_of(err)[-3000:]
    finally:
        stop(proc)
        for found in tmp_path.glob("runs/*/ranks"):
            kill_tasks(found.parent)
    assert hang_of(run_dir)["hang"]["rank"] == 0
    log = (run_dir / "logs/rank0.log").read_text()
    assert "rank 0's stacks from py-spy" in log and "blocked.py" in log.split("py-spy")[-1], log[-3000:]


# A MultiWorkerMirroredStrategy custom loop (strategy.run in a tf.function) that never calls
# tfrun; at step 20 rank 1 blocks in its own code and rank 0 waits in the next step's collective.
MWMS_TAPE = """\
import os, time
import numpy as np
import tensorflow as tf

strategy = tf.distribute.MultiWorkerMirroredStrategy()
with strategy.scope():
    w = tf.Variable(tf.random.normal([16, 2], stddev=0.1))
    opt = tf.keras.optimizers.SGD(0.1)
x = np.random.rand(512, 16).astype("float32")
y = (x.sum(axis=1) > 8).astype("int64")
batches = iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((x, y)).batch(64).repeat()))

@tf.function
def train_step(batch):
    def step(inputs):
        xb, yb = inputs
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=yb, logits=xb @ w))
        opt.apply_gradients(zip(tape.gradient(loss, [w]), [w]))
        return loss
    return strategy.reduce("MEAN", strategy.run(step, args=(batch,)), axis=None)

for i in range(1, 1000):
    train_step(next(batches))
    if i == 20 and os.environ["TFRUN_RANK"] == "1":
        with open(os.path.join(os.environ["TFRUN_OUTPUT_DIR"], "blocked-at"), "w") as f:
            f.write(str(time.time()))
        time.sleep(3600)  # blocked_here
    time.sleep(0.2)
"""


def test_a_multiworker_loop_that_never_calls_tfrun_is_found_when_a_rank_blocks(tmp_path: Path) -> None:
    """The waiting rank's collective and TensorFlow's own threads use no CPU to speak of: the run
    is found within the timeout (10 s) and a little more, the blocked rank named."""
    tape = script(tmp_path, "mwms_tape.py", MWMS_TAPE)
    result = run_tfrun(
        tmp_path,
        f"entry.script={tape}",
        "backend=mwms",
        "compute.tasks_per_node=2",
        "compute.hang_timeout_s=10",
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    run_dir = run_dir_from(result.stderr)
    status = hang_of(run_dir)
    assert status["failed_rank"] == 1 and "since its script last used CPU" in status["reason"], status
    blocked = float((run_dir / "outputs/blocked-at").read_text())
    assert status["hang"]["detected"] - blocked < 10 + 10, (status["hang"], blocked)


# Keras beyond fit's batches: a validation-less fit, a slow evaluate of its own (2 s a batch), then
# 20 s of computing with no step at all; the hang timeout is 8 s.
KERAS_BEYOND_FIT = """\
import time
import numpy as np
import tensorflow as tf

class SlowBatches(tf.keras.callbacks.Callback):
    def on_test_batch_end(self, batch, logs=None):
        time.sleep(2.0)

x = np.random.rand(256, 8).astype("float32")
y = (x.sum(axis=1) > 4).astype("float32")
model = tf.keras.Sequential([tf.keras.Input(shape=(8,)), tf.keras.layers.Dense(1, activation="sigmoid")])
model.compile(optimizer="sgd", loss="binary_crossentropy")
model.fit(x, y, epochs=1, batch_size=64, verbose=2)
model.evaluate(x[:96], y[:96], batch_size=8, callbacks=[SlowBatches()], verbose=0)
end = time.time() + 20
while time.time() < end:
    np.linalg.svd(np.random.rand(200, 200))
print("ALL DONE", flush=True)
"""


def test_keras_evaluate_and_work_after_fit_are_not_a_hang(tmp_path: Path) -> None:
    beyond = script(tmp_path, "beyond.py", KERAS_BEYOND_FIT)
    result = run_tfrun(tmp_path, f"entry.script={beyond}", "compute.hang_timeout_s=8", timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ALL DONE" in result.stdout
    status = read_json(run_dir_from(result.stderr) / "status.json")
    assert status["state"] == "COMPLETED" and not status.get("hang"), status


# Busy in Python on its main thread, for longer than the hang timeout: no steps, no TensorFlow.
BUSY_IN_PYTHON = """\
import argparse, time
parser = argparse.ArgumentParser()
parser.add_argument("--seconds", type=float, default=14)
args = parser.parse_args()
end, n = time.time() + args.seconds, 0
while time.time() < end:
    n += sum(i * i for i in range(1000))
print("BUSY DONE", flush=True)
"""


def test_a_local_sweeps_point_busy_in_python_is_not_a_hang(tmp_path: Path) -> None:
    """A sweep's points run in processes forked from a warm one, whose main thread Python 3.11
    names by the parent's id: the script's CPU went unseen, and every point busy for longer
    than the hang timeout without steps was ended as hung."""
    busy = script(tmp_path, "busy.py", BUSY_IN_PYTHON)
    result = run_tfrun(
        tmp_path, "-m", f"entry.script={busy}", "trainer.seconds=14", "compute.hang_timeout_s=6", timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "BUSY DONE" in result.stdout
    (status,) = [read_json(p) for p in (tmp_path / "runs").glob("sweep-*/0/status.json")]
    assert status["state"] == "COMPLETED" and not status.get("hang"), status
    assert status["pool_item"], status  # run as a pool's item, forked


# Parameter-server training whose epochs (12 s: its chief waits 0.4 s after every batch) are far
# longer than the hang timeout (6 s), with an evaluator that waits for the chief's end all that
# time without using any CPU (blocked in a read of a pipe the chief opens last).
PS_LONG_EPOCHS = """\
import os, time
import numpy as np
import tensorflow as tf

pipe = os.path.join(os.environ["TFRUN_OUTPUT_DIR"], "chief-ended")
try:
    os.mkfifo(pipe)
except FileExistsError:
    pass
if os.environ["TFRUN_ROLE"] == "evaluator":
    open(pipe).read()
    print("EVALUATOR DONE", flush=True)
    raise SystemExit(0)

strategy = tf.distribute.ParameterServerStrategy(tf.distribute.cluster_resolver.TFConfigClusterResolver())
x = np.random.rand(512, 8).astype("float32")
y = (x.sum(axis=1) > 4).astype("float32")

def dataset_fn(ctx):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(32).repeat()

class SlowChief(tf.keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self._supports_tf_logs = True  # what ParameterServerStrategy asks of a batch callback

    def on_train_batch_end(self, batch, logs=None):
        time.sleep(0.4)

with strategy.scope():
    model = tf.keras.Sequential([tf.keras.Input(shape=(8,)), tf.keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer="sgd", loss="binary_crossentropy")
model.fit(tf.keras.utils.experimental.DatasetCreator(dataset_fn), epochs=2, steps_per_epoch=30,
          callbacks=[SlowChief()], verbose=2)
open(pipe, "w").close()
print("PS DONE", flush=True)
"""


def test_a_parameter_server_chief_with_long_epochs_and_its_evaluator_are_not_a_hang(tmp_path: Path) -> None:
    train = script(tmp_path, "ps_long.py", PS_LONG_EPOCHS)
    result = run_tfrun(
        tmp_path,
        f"entry.script={train}",
        "backend=ps",
        "backend.worker_count=1",
        "backend.evaluator=true",
        "compute.tasks_per_node=4",
        "compute.hang_timeout_s=6",
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "PS DONE" in result.stdout and "EVALUATOR DONE" in result.stdout, result.stdout[-3000:]
    run_dir = run_dir_from(result.stderr)
    status = read_json(run_dir / "status.json")
    assert status["state"] == "COMPLETED" and not status.get("hang"), status
    # the evaluator is the last task (chief, worker, parameter server, evaluator): said once
    note = "rank 3: not watched for hangs, a parameter-server evaluator is not judged while training goes on"
    assert (run_dir / "logs/rank3.log").read_text().count(note) == 1
    shown = run_tfrun(tmp_path, "status", str(run_dir), timeout=120).stdout
    assert f"watchdog: {note}" in shown, shown


# --- on the local cluster's separate hosts -----------------------------------------------------


@pytest.mark.slurm
def test_a_stuck_rank_on_another_node_ends_the_job_and_a_requeue_is_bounded(tmp_path: Path, job_name: str) -> None:
    """Rank 1 on node2 blocks: the job ends within 60 s of it, named; with requeue_on_hang the
    job is requeued once (max_requeues=1) and, stuck again, ends FAILED."""
    stuck = script(tmp_path, "stuck.py", HOROVOD_STUCK)
    result = run_tfrun(
        tmp_path,
        "compute=slurm",
        f"compute.job_name={job_name}",
        "compute.nodes=2",
        f"entry.script={stuck}",
        "backend=horovod",
        f"compute.hang_timeout_s={HANG_S}",
        "compute.requeue_on_hang=true",
        "compute.max_requeues=1",
        "compute.poll_s=1",
        timeout=900,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    run_dir = run_dir_from(result.stderr)
    status = hang_of(run_dir)
    assert (status["failed_rank"], status["hang"]["host"], status["hang"]["step"]) == (1, "node2", 5), status
    assert "rank 1 on node2 made no progress since step 5" in status["reason"]
    tried = sorted(read_json(run_dir / "attempts.json").values(), key=lambda a: a.get("started") or 0)
    assert [(a["reason"], a["requeued"]) for a in tried] == [("hang", True), ("hang", False)], tried
    assert_ended_soon(status, within_s=60)
    logs = {r: (run_dir / f"logs/rank{r}.log").read_text() for r in (0, 1)}
    assert any("allreduce" in func for _, func in stacks_in(logs[0]))
    assert any(path.endswith("stuck.py") for path, _ in stacks_in(logs[1]))
    shown = run_tfrun(tmp_path, "status", str(run_dir), timeout=120).stdout
    assert "rank 1 on node2 made no progress since step 5" in shown, shown


# Keras training with backups, slow enough to cut a node's link in the middle of it (after
# epoch 2 of 8, ~2 s each: 6 epochs left to train after a requeue).
KERAS_TRAINING = """\
import json, os, time
import numpy as np
import tensorflow as tf
import horovod.tensorflow.keras as hvd

hvd.init()
x = np.random.RandomState(0).rand(512, 8).astype("float32")
y = (x.sum(axis=1) > 4).astype("float32")
model = tf.keras.Sequential([tf.keras.Input(shape=(8,)), tf.keras.layers.Dense(1, activation="sigmoid")])
model.compile(optimizer=hvd.DistributedOptimizer(tf.keras.optimizers.SGD(0.1)), loss="binary_crossentropy")

class Slow(tf.keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        time.sleep(0.25)

model.fit(x, y, epochs=8, batch_size=64, callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0), Slow()],
          verbose=2 if hvd.rank() == 0 else 0)
print("rank", hvd.rank(), "TRAINING DONE", flush=True)
"""


def epochs_done(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return sum(1 for line in path.read_text().splitlines() if '"epoch"' in line) if path.exists() else 0


@pytest.mark.slurm
@pytest.mark.parametrize("requeue", [False, True], ids=["ends", "requeues"])
def test_a_node_cut_off_mid_training_is_named_and_the_job_ends_or_resumes(
    tmp_path: Path, requeue: bool, job_name: str, network_nodes: NodePair
) -> None:
    """On nodes of the network tests' own: the second one's link is cut (every job there would lose it)."""
    train = script(tmp_path, "train.py", KERAS_TRAINING)
    lost = network_nodes.second
    link = ["ip", "-n", f"tfrun-{lost}", "link", "set", "eth0"]
    proc, _out, err = popen_tfrun(
        tmp_path,
        "compute=slurm",
        f"compute.partition={network_nodes.partition}",
        f"compute.job_name={job_name}",
        "compute.nodes=2",
        f"entry.script={train}",
        "backend=horovod",
        f"compute.hang_timeout_s={HANG_S}",
        "compute.poll_s=1",
        f"compute.requeue_on_hang={str(requeue).lower()}",
    )
    cut = None
    try:
        wait_for(lambda: "tfrun: submitted job" in err.read_text(), 120, "the job to be submitted")
        run_dir = Path(re.search(r"run dir (\S+)", err.read_text()).group(1))
        wait_for(lambda: epochs_done(run_dir) >= 2, 300, "two epochs trained")
        subprocess.run([*link, "down"], check=True, timeout=30)
        cut = time.time()
        wait_for(
            lambda: (read_json(run_dir / "status.json") or {}).get("hang"),
            HANG_S + 30,
            "the watchdog to report the lost node",
        )
        named = time.time() - cut
        hang = read_json(run_dir / "status.json")["hang"]
        assert hang["lost_nodes"] == [lost] and f"node {lost} lost" in hang["reason"], hang
        assert "ranks 1 on it" in hang["reason"], hang
        # the last backup on disk: finished epochs held only in memory (spaced backups) are lost
        # with a hang, as with a crash; the first epoch is always written
        backed_up = read_json(run_dir / "checkpoints/backup/state.json")["epoch"]
        subprocess.run([*link, "up"], check=True, timeout=30)
        cut = None
        code = proc.wait(timeout=600)
    finally:
        if cut is not None:
            subprocess.run([*link, "up"], timeout=30, check=False)
        stop(proc)
    stderr = err.read_text()
    assert named <= HANG_S + 30, named
    status = read_json(run_dir / "status.json")
    if not requeue:
        assert code == 1 and status["state"] == "FAILED" and f"node {lost} lost" in status["reason"], status
        return
    assert code == 0, stderr[-3000:]
    assert status["state"] == "COMPLETED", status
    log = (run_dir / "logs/rank0.log").read_text()
    resumed = re.findall(r"tfrun: resumed from the backup of epoch (\d+)", log)
    # The backup on disk when the hang was named, or a later one: the link is up again before
    # the requeue's SIGTERM may come, and then the ranks agree on a batch to stop at and save it.
    # Either way nothing on disk is lost, and each epoch is recorded once (below).
    assert resumed and int(resumed[-1]) >= backed_up >= 1, (backed_up, log[-3000:])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r.get("epoch") is not None] == list(range(8))  # each epoch once


# A custom loop as Horovod's TF2 examples write it (DistributedGradientTape in a tf.function) that
# never imports tfrun: 300 steps of ~0.25 s, far past the hang timeout (20 s). With --block_rank,
# that rank stops at step 40, blocked in its own code; the others wait in the next allreduce.
HOROVOD_TAPE = """\
import argparse, os, time
import numpy as np
import tensorflow as tf
import horovod.tensorflow as hvd

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=300)
p.add_argument("--block_rank", type=int, default=-1)
args = p.parse_args()
hvd.init()
x = np.random.RandomState(hvd.rank()).rand(512, 16).astype("float32")
y = (x.sum(axis=1) > 8).astype("int64")
data = iter(tf.data.Dataset.from_tensor_slices((x, y)).shuffle(512).batch(32).repeat())
w = tf.Variable(tf.random.normal([16, 2], stddev=0.1))
opt = tf.optimizers.SGD(0.1)

@tf.function
def step(xb, yb, first):
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=yb, logits=xb @ w))
    tape = hvd.DistributedGradientTape(tape)
    opt.apply_gradients(zip(tape.gradient(loss, [w]), [w]))
    if first:
        hvd.broadcast_variables([w], root_rank=0)
    return loss

started = time.time()
for i in range(1, args.steps + 1):
    loss = step(*next(data), i == 1)
    if i == 40 and hvd.rank() == args.block_rank:
        with open(os.path.join(os.environ["TFRUN_OUTPUT_DIR"], "blocked-at"), "w") as f:
            f.write(str(time.time()))
        time.sleep(3600)  # blocked_here
    time.sleep(0.2)
print(f"rank {hvd.rank()}: {args.steps} steps in {time.time() - started:.0f} s, loss {float(loss):.3f}", flush=True)
"""
TAPE_HANG_S = 20
# What slurmd logs, as an error, for a connection that sends it no message.
SLURMD_EMPTY_CONNECTION = b"Zero Bytes were transmitted or received"


@pytest.mark.slurm
@pytest.mark.parametrize("blocked", [False, True], ids=["healthy", "blocked"])
def test_a_horovod_loop_that_never_calls_tfrun_runs_on_two_nodes_and_a_blocked_rank_is_found(
    tmp_path: Path, blocked: bool, job_name: str
) -> None:
    """Healthy, it runs far past the hang timeout and completes, its nodes probed through their
    ranks' ports, and the slurmds' logs gain no error for it; with rank 1 blocked, the job ends
    within the timeout and a little more, rank 1 on node2 named, its stack in its log."""
    tape = script(tmp_path, "tape.py", HOROVOD_TAPE)
    slurmd_logs = [SLURM_STATE / "log" / f"slurmd-{node}.log" for node in ("node1", "node2")]
    logged = [log.stat().st_size for log in slurmd_logs]
    result = run_tfrun(
        tmp_path,
        "compute=slurm",
        f"compute.job_name={job_name}",
        "compute.nodes=2",
        f"entry.script={tape}",
        "backend=horovod",
        f"compute.hang_timeout_s={TAPE_HANG_S}",
        "compute.poll_s=1",
        *(["trainer.block_rank=1"] if blocked else []),
        timeout=600,
    )
    run_dir = run_dir_from(result.stderr)
    watch_log = (run_dir / "logs/watchdog.log").read_text()
    for log, size in zip(slurmd_logs, logged):
        added = log.read_bytes()[size:]
        assert SLURMD_EMPTY_CONNECTION not in added, f"{log}:\n{added[-2000:].decode(errors='replace')}"
    for node in ("node1", "node2"):
        probed = rf"lost-node probe: node {node} at {re.escape(node_address(node))}, rank \d on port \d+"
        assert re.search(probed, watch_log), watch_log
    if not blocked:
        assert result.returncode == 0, result.stderr[-3000:]
        status = read_json(run_dir / "status.json")
        assert status["state"] == "COMPLETED" and not status.get("hang"), status
        logs = [(run_dir / f"logs/rank{r}.log").read_text() for r in (0, 1)]
        took = [float(t) for log in logs for t in re.findall(r"rank \d: 300 steps in (\d+) s", log)]
        assert len(took) == 2 and min(took) > 3 * TAPE_HANG_S, took
        return
    assert result.returncode == 1, result.stderr[-3000:]
    status = hang_of(run_dir)
    assert (status["failed_rank"], status["hang"]["host"]) == (1, "node2"), status
    assert "rank 1 on node2 made no progress since its script last used CPU" in status["reason"], status
    assert "ranks waiting: 0 on node1" in status["reason"], status
    blocked_at = float((run_dir / "outputs/blocked-at").read_text())
    assert status["ended"] - blocked_at < TAPE_HANG_S + 60, (status["ended"] - blocked_at, status["hang"])
    log = (run_dir / "logs/rank1.log").read_text()
    assert any(path.endswith("tape.py") for path, _ in stacks_in(log)), log[-3000:]


@pytest.mark.slurm
def test_a_requeue_slurm_refuses_ends_the_run_as_the_hang(tmp_path: Path, job_name: str) -> None:
    """The job may not be requeued (Requeue=0, set while it runs): the watchdog's requeue fails,
    the attempt says so, and the run ends FAILED with the hang's rank and reason."""
    stuck = script(tmp_path, "stuck.py", HOROVOD_STUCK)
    proc, _out, err = popen_tfrun(
        tmp_path,
        "compute=slurm",
        f"compute.job_name={job_name}",
        "compute.nodes=2",
        f"entry.script={stuck}",
        "backend=horovod",
        f"compute.hang_timeout_s={HANG_S}",
        "compute.requeue_on_hang=true",
        "compute.poll_s=1",
    )
    try:
        wait_for(lambda: "tfrun: submitted job" in text_of(err), 120, "the job to be submitted")
        job = re.search(r"submitted job (\d+)", text_of(err)).group(1)
        run_dir = Path(re.search(r"run dir (\S+)", text_of(err)).group(1))
        wait_for(lambda: (read_json(run_dir / "status.json") or {}).get("state") == "RUNNING", 300, "the job to run")
        subprocess.run(["scontrol", "update", f"JobId={job}", "Requeue=0"], check=True, timeout=30)
        code = proc.wait(timeout=600)
    finally:
        stop(proc)
    assert code == 1, text_of(err)[-3000:]
    status = read_json(run_dir / "status.json")
    assert status["state"] == "FAILED" and status["failed_rank"] == 1, status
    assert status["reason"].startswith("hang: rank 1 on node2 made no progress since step 5"), status["reason"]
    assert "not requeued: " in status["reason"] and "disabled" in status["reason"], status["reason"]
    tried = list(read_json(run_dir / "attempts.json").values())
    assert len(tried) == 1 and tried[0]["reason"] == "hang" and tried[0]["requeued"] is False, tried
    assert "disabled" in tried[0]["requeue_failed"], tried
    shown = run_tfrun(tmp_path, "status", str(run_dir), timeout=120).stdout
    assert "not requeued:" in shown and "rank 1" in shown, shown


# Rank 0 finds the watchdog its bootstrap started (a child of its own), writes down its pid and
# the job step it runs in, then kills itself with SIGKILL: it records no end, and the watchdog
# loses its parent. In a pool (``--i``), item 1 meanwhile, in the same allocation, waits for
# item 0's watchdog to end, and writes down after how long (or that it did not).
RANK0_KILLED = """\
import argparse, os, signal, time
from pathlib import Path

p = argparse.ArgumentParser(); p.add_argument("--i", type=int, default=0); a = p.parse_args()
out = Path(os.environ["TFRUN_OUTPUT_DIR"])

def watchdog(pid):
    try:
        return b"tfrun.task.watchdog" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\\0")
    except OSError:
        return False

def parent(pid):
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None

def until(predicate, seconds):
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.2)
    return predicate()

if a.i == 0:
    mine = lambda: [e.name for e in Path("/proc").iterdir() if watchdog(e.name) and parent(e.name) == os.getpid()]
    found = until(mine, 120)
    (out / "step").write_text(os.environ.get("SLURM_STEP_ID", "-"))
    (out / "watchdog.pid").write_text(found[0] if found else "")
    os.kill(os.getpid(), signal.SIGKILL)
else:
    other = out.parents[1] / "0" / "outputs" / "watchdog.pid"
    if until(lambda: other.exists() and other.read_text(), 120):
        began = time.monotonic()
        gone = until(lambda: not watchdog(other.read_text()), 30)
        (out / "watched").write_text(f"gone after {time.monotonic() - began:.1f} s" if gone else "still running")
"""


def watchdogs_of(run_dir: Path) -> list[int]:
    """The live watchdog processes of a run dir (this machine's: every node of the local cluster's)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "tfrun.task.watchdog" in args and str(run_dir) in args and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


@pytest.mark.slurm
def test_the_watchdog_of_a_job_whose_rank_0_is_killed_ends_with_the_job(tmp_path: Path, job_name: str) -> None:
    """Rank 0 dies by SIGKILL, recording no end: its job ends, and so does its watchdog (its
    hang timeout far away), soon after, though no rank said it ended and Slurm does not kill it."""
    killed = script(tmp_path, "killed.py", RANK0_KILLED)
    result = run_tfrun(
        tmp_path,
        "compute=slurm",
        f"compute.job_name={job_name}",
        f"entry.script={killed}",
        "compute.hang_timeout_s=3600",
        "compute.poll_s=1",
        timeout=600,
    )
    run_dir = run_dir_from(result.stderr)
    try:
        assert result.returncode == 1, result.stderr[-3000:]
        status = read_json(run_dir / "status.json")
        assert status["state"] == "FAILED" and "SIGKILL" in status["reason"], status
        pid = (run_dir / "outputs/watchdog.pid").read_text()
        assert pid, "rank 0 found no watchdog of its own"
        deadline = time.monotonic() + 30
        while watchdogs_of(run_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not watchdogs_of(run_dir), (
            f"the watchdog (pid {pid}) still runs 30 s after its job ended:\n"
            + text_of(run_dir / "logs/watchdog.log")[-2000:]
        )
    finally:
        for left in watchdogs_of(run_dir):
            os.kill(left, signal.SIGKILL)


@pytest.mark.slurm
def test_a_pool_items_watchdog_ends_with_its_item_not_with_its_allocation(tmp_path: Path, job_name: str) -> None:
    """Two items side by side in one allocation, each in a slot (a job step that lives as long as
    the allocation): item 0's rank 0 dies by SIGKILL; its watchdog ends while item 1 still runs."""
    killed = script(tmp_path, "killed.py", RANK0_KILLED)
    result = run_tfrun(
        tmp_path,
        "-m",
        "compute=slurm",
        "compute.pack_size=2",
        "compute.pack_slots=2",
        "compute.gpus_per_node=1",
        "compute.poll_s=1",
        f"compute.job_name={job_name}",
        f"entry.script={killed}",
        "compute.hang_timeout_s=3600",
        "trainer.i=range(0,2)",
        timeout=600,
    )
    sweep = next((tmp_path / "runs").glob("sweep-*"))
    try:
        assert result.returncode == 1, result.stderr[-3000:]
        status = read_json(sweep / "0" / "status.json")
        assert status["state"] == "FAILED" and "SIGKILL" in status["reason"], status
        assert (sweep / "0" / "outputs" / "watchdog.pid").read_text(), "item 0 found no watchdog of its own"
        assert (sweep / "0" / "outputs" / "step").read_text().isdigit()  # its slot's step, not a step of its own
        watched = text_of(sweep / "1" / "outputs" / "watched")
        assert watched.startswith("gone after"), watched or read_json(sweep / "1" / "status.json")
        assert read_json(sweep / "1" / "status.json")["state"] == "COMPLETED"
    finally:
        for left in watchdogs_of(sweep / "0") + watchdogs_of(sweep / "1"):
            os.kill(left, signal.SIGKILL)
