"""Hangs and lost nodes: a stalled rank is found, its stacks shown, named, and the run ended
(or requeued) long before its time limit; a rank that pauses legitimately is left alone.
Real processes, locally and as Slurm jobs on the local cluster's separate hosts."""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import (
    popen_tfrun,
    read_json,
    run_dir_from,
    run_tfrun,
    stop,
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
    result = run_tfrun(tmp_path, f"entry.script={stuck}", f"trainer.how={how}", "backend=horovod",
                       "compute.tasks_per_node=2", f"compute.hang_timeout_s={HANG_S}", timeout=300)
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


# --- on the local cluster's separate hosts -----------------------------------------------------

@pytest.mark.slurm
def test_a_stuck_rank_on_another_node_ends_the_job_and_a_requeue_is_bounded(tmp_path: Path) -> None:
    """Rank 1 on node2 blocks: the job ends within 60 s of it, named; with requeue_on_hang the
    job is requeued once (max_requeues=1) and, stuck again, ends FAILED."""
    stuck = script(tmp_path, "stuck.py", HOROVOD_STUCK)
    result = run_tfrun(tmp_path, "compute=slurm", "compute.nodes=2", f"entry.script={stuck}", "backend=horovod",
                       f"compute.hang_timeout_s={HANG_S}", "compute.requeue_on_hang=true", "compute.max_requeues=1",
                       "compute.poll_s=1", timeout=900)
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
def test_a_node_cut_off_mid_training_is_named_and_the_job_ends_or_resumes(tmp_path: Path, requeue: bool) -> None:
    train = script(tmp_path, "train.py", KERAS_TRAINING)
    proc, _out, err = popen_tfrun(tmp_path, "compute=slurm", "compute.nodes=2", f"entry.script={train}",
                                  "backend=horovod", f"compute.hang_timeout_s={HANG_S}", "compute.poll_s=1",
                                  f"compute.requeue_on_hang={str(requeue).lower()}")
    cut = None
    try:
        wait_for(lambda: "tfrun: submitted job" in err.read_text(), 120, "the job to be submitted")
        run_dir = Path(re.search(r"run dir (\S+)", err.read_text()).group(1))
        wait_for(lambda: epochs_done(run_dir) >= 2, 300, "two epochs trained")
        subprocess.run(["ip", "-n", "tfrun-node2", "link", "set", "eth0", "down"], check=True, timeout=30)
        cut = time.time()
        wait_for(lambda: (read_json(run_dir / "status.json") or {}).get("hang"), HANG_S + 30,
                 "the watchdog to report the lost node")
        named = time.time() - cut
        hang = read_json(run_dir / "status.json")["hang"]
        assert hang["lost_nodes"] == ["node2"] and "node node2 lost" in hang["reason"], hang
        assert "ranks 1 on it" in hang["reason"], hang
        # the last backup on disk: finished epochs held only in memory (spaced backups) are lost
        # with a hang, as with a crash; the first epoch is always written
        backed_up = read_json(run_dir / "checkpoints/backup/state.json")["epoch"]
        subprocess.run(["ip", "-n", "tfrun-node2", "link", "set", "eth0", "up"], check=True, timeout=30)
        cut = None
        code = proc.wait(timeout=600)
    finally:
        if cut is not None:
            subprocess.run(["ip", "-n", "tfrun-node2", "link", "set", "eth0", "up"], timeout=30, check=False)
        stop(proc)
    stderr = err.read_text()
    assert named <= HANG_S + 30, named
    status = read_json(run_dir / "status.json")
    if not requeue:
        assert code == 1 and status["state"] == "FAILED" and "node node2 lost" in status["reason"], status
        return
    assert code == 0, stderr[-3000:]
    assert status["state"] == "COMPLETED", status
    log = (run_dir / "logs/rank0.log").read_text()
    resumed = re.findall(r"tfrun: resumed from the backup of epoch (\d+)", log)
    assert resumed and int(resumed[-1]) == backed_up >= 1, (backed_up, log[-3000:])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r.get("epoch") is not None] == list(range(8))  # each epoch once
