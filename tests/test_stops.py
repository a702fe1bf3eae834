"""Stop requests, for real: synchronous ranks stop at the same batch; a request before the
script runs or while a server serves is a stop; backups fall back and are each rank's own
where each rank trains its own model; several fits in one script keep every epoch.

Local runs of real processes (Horovod over Gloo, MultiWorkerMirroredStrategy, parameter
servers); the Slurm tests use the local cluster (fixtures in tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.helpers import NodePair, popen_tfrun, read_json, run_tfrun, stop, text_of, wait_for
from tests.test_faults import (
    FAST_FIT,
    FIT_SCRIPT,
    JOB_TIMEOUT,
    attempts,
    metric_epochs,
    sacct_state,
    submitted,
    wait_final,
)

pytestmark = pytest.mark.slow

# Under every synchronous backend (tfrun.distributed picks the strategy, optimizer, callbacks):
# ~10 steps an epoch, slowed down so that a stop lands mid-epoch.
SYNC_SCRIPT = """\
import argparse, hashlib, json, os, time
import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits
import tfrun
import tfrun.distributed as dist

print("SCRIPT STARTED", flush=True)
parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=40)
parser.add_argument("--batch_sleep", type=float, default=0.05)
args = parser.parse_args()
ctx = tfrun.context()
strategy = dist.strategy()
tf.keras.utils.set_random_seed(0)
digits = load_digits()
x, y = (digits.data / 16.0).astype("float32"), digits.target.astype("int64")


def make(ictx):
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shard(ictx.num_input_pipelines, ictx.input_pipeline_id)
    return ds.batch(32).repeat()


with strategy.scope():
    model = tf.keras.Sequential([tf.keras.Input(shape=(64,)), tf.keras.layers.Dense(32, activation="relu"),
                                 tf.keras.layers.Dense(10)])
    model.compile(optimizer=dist.optimizer(tf.keras.optimizers.SGD(0.05)),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))


class Slow(tf.keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        time.sleep(args.batch_sleep)


model.fit(dist.dataset(make), epochs=args.epochs, steps_per_epoch=10, callbacks=[*dist.callbacks(), Slow()],
          verbose=0)
weights = np.concatenate([np.asarray(w).ravel() for w in model.get_weights()])
os.makedirs(ctx.output_dir, exist_ok=True)
with open(os.path.join(ctx.output_dir, f"weights-rank{ctx.rank}.json"), "w") as f:
    json.dump({"sha": hashlib.sha256(weights.tobytes()).hexdigest()}, f)
print(f"rank {ctx.rank} TRAINING DONE", flush=True)
"""

STOP_LINE = re.compile(r"^tfrun: stopping after epoch (\d+), batch (\d+): every rank stops here$", re.M)


def write_script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def run_dir_of(tmp_path: Path) -> Path:
    found = (
        [p for p in (tmp_path / "runs").iterdir() if (p / "plan.json").exists()] if (tmp_path / "runs").exists() else []
    )
    return found[0] if len(found) == 1 else Path("/nonexistent")


def pid_of(run_dir: Path, rank: int) -> int:
    return int(read_json(run_dir / "ranks" / f"{rank}.json")["pid"])


# --- 5: ranks of a synchronous job agree on the batch at which they stop -------------------------


@pytest.mark.parametrize("backend", ["horovod", "mwms"])
def test_a_stop_that_reaches_one_rank_stops_every_rank_at_the_same_batch(tmp_path: Path, backend: str) -> None:
    """SIGUSR2 to rank 1 only (a site's hook, or a signal that reaches one node first); rank 0
    is never signalled. Both stop after the same batch, the chief writes the backup, the run is
    STOPPED (not hung, not failed), and it resumes on both ranks from that backup."""
    write_script(tmp_path, "sync.py", SYNC_SCRIPT)
    proc, out, err = popen_tfrun(tmp_path, "entry.script=sync.py", f"backend={backend}", "compute.tasks_per_node=2")
    try:
        wait_for(lambda: (run_dir_of(tmp_path) / "plan.json").exists(), 120, "the run dir")
        run_dir = run_dir_of(tmp_path)
        wait_for(lambda: len(metric_epochs(run_dir)) >= 3, JOB_TIMEOUT, "three epochs in metrics.jsonl")
        os.kill(pid_of(run_dir, 1), signal.SIGUSR2)
        sent = time.monotonic()
        code = proc.wait(timeout=180)
        took = time.monotonic() - sent
    finally:
        stop(proc)
    assert code != 0 and took < 60, (code, took, err.read_text())
    assert read_json(run_dir / "status.json")["state"] == "STOPPED", err.read_text()
    logs = [text_of(run_dir / f"logs/rank{rank}.log") for rank in (0, 1)]
    assert "tfrun: received SIGUSR2: checkpointing and stopping" in logs[1]
    assert "tfrun: another rank received SIGUSR2: checkpointing and stopping" in logs[0]
    # Rank 0 learnt of it from the vote alone. Once rank 1 has ended stopped, the local target
    # asks every task still running to stop too (a backend without a vote needs it): that
    # request may reach rank 0 while it writes the backup, and it must find it stopping already.
    told = re.findall(r"^tfrun: received SIGUSR2: (.*)$", logs[0], re.M)
    assert set(told) <= {"already stopping"}, logs[0]
    assert not told or logs[0].index("tfrun: received") > logs[0].index("tfrun: another rank received"), logs[0]
    where = [STOP_LINE.findall(log) for log in logs]
    assert len(where[0]) == 1 and where[0] == where[1], where  # the same epoch and batch on both
    epoch = int(where[0][0][0])
    state = read_json(run_dir / "checkpoints/backup/state.json")
    assert state["epoch"] == epoch - 1 >= 3 and (run_dir / "checkpoints/backup" / state["weights"]).is_file()
    assert metric_epochs(run_dir) == list(range(epoch - 1))

    resumed = run_tfrun(tmp_path, "resume", str(run_dir), timeout=JOB_TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr
    for rank in (0, 1):
        log = text_of(run_dir / f"logs/rank{rank}.log")
        assert f"tfrun: resumed from the backup of epoch {epoch - 1}" in log and f"rank {rank} TRAINING DONE" in log
    shas = {rank: read_json(run_dir / f"outputs/weights-rank{rank}.json")["sha"] for rank in (0, 1)}
    assert shas[0] == shas[1], shas
    assert metric_epochs(run_dir) == list(range(40))


# --- 4: a stop before the script runs, or while a server serves, is a stop --------------------------


@pytest.mark.parametrize("when", ["as the tasks start", "while they prepare"])
def test_a_stop_before_the_script_runs_is_a_stop(tmp_path: Path, when: str) -> None:
    """Ctrl-C (SIGUSR2 to every task) while the tasks' interpreters start, or while the
    bootstrap prepares (Horovod's rendezvous and hvd.init): STOPPED, resumable, not killed or
    failed; the script never started, and `tfrun resume` runs it in full."""
    write_script(tmp_path, "sync.py", SYNC_SCRIPT)
    proc, out, err = popen_tfrun(
        tmp_path,
        "entry.script=sync.py",
        "backend=horovod",
        "compute.tasks_per_node=2",
        "trainer.epochs=2",
        "trainer.batch_sleep=0",
    )
    try:
        wait_for(lambda: (run_dir_of(tmp_path) / "plan.json").exists(), 120, "the run dir")
        run_dir = run_dir_of(tmp_path)
        ready = (
            (lambda: (run_dir / "logs/rank1.log").exists())
            if when == "as the tasks start"
            else (lambda: all((run_dir / f"ranks/{r}.json").exists() for r in (0, 1)))
        )
        wait_for(ready, 120, f"the tasks {when}")
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=180)
    finally:
        stop(proc)
    stderr = err.read_text()
    assert code != 0 and "Traceback" not in stderr + out.read_text(), stderr
    assert read_json(run_dir / "status.json")["state"] == "STOPPED", stderr
    assert f"tfrun: continue it with: tfrun resume {run_dir}" in stderr
    for rank in (0, 1):
        log = text_of(run_dir / f"logs/rank{rank}.log")
        assert "SCRIPT STARTED" not in log and "tfrun: stopped on request before the script ran" in log, log
        assert read_json(run_dir / f"ranks/{rank}.json")["exit_code"] == 75
    assert [a["reason"] for a in attempts(run_dir)] == ["stopped"]

    resumed = run_tfrun(tmp_path, "resume", str(run_dir), timeout=JOB_TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr
    assert all("rank %d TRAINING DONE" % r in text_of(run_dir / f"logs/rank{r}.log") for r in (0, 1))


def test_a_stop_that_reaches_a_parameter_server_stops_the_run(tmp_path: Path) -> None:
    """SIGUSR2 to the parameter server alone while it serves: it keeps serving (the chief may
    still need it) and passes the request to the chief, which stops; every task ends
    stopped, none failed."""
    examples = Path(__file__).resolve().parents[1] / "examples"
    proc, out, err = popen_tfrun(
        tmp_path,
        f"entry.script={examples / 'ps_keras' / 'train.py'}",
        "backend=ps",
        "compute.tasks_per_node=4",
        "trainer.epochs=500",
        "trainer.steps_per_epoch=5",
    )
    try:
        wait_for(lambda: (run_dir_of(tmp_path) / "plan.json").exists(), 120, "the run dir")
        run_dir = run_dir_of(tmp_path)
        wait_for(lambda: len(metric_epochs(run_dir)) >= 2, JOB_TIMEOUT, "two epochs in metrics.jsonl")
        os.kill(pid_of(run_dir, 3), signal.SIGUSR2)  # rank 3: the parameter server
        code = proc.wait(timeout=180)
    finally:
        stop(proc)
    stderr = err.read_text()
    assert code != 0, stderr
    assert read_json(run_dir / "status.json")["state"] == "STOPPED", stderr
    assert "tfrun: received SIGUSR2: checkpointing and stopping" in text_of(run_dir / "logs/rank3.log")
    assert "tfrun: received SIGUSR2" in text_of(run_dir / "logs/rank0.log")  # passed on to the chief
    records = {rank: read_json(run_dir / f"ranks/{rank}.json") for rank in range(4)}
    assert {rank: r["exit_code"] for rank, r in records.items()} == {0: 75, 1: 75, 2: 75, 3: 75}, records
    state = read_json(run_dir / "checkpoints/backup/state.json")
    assert state["epoch"] >= 2 and metric_epochs(run_dir) == list(range(state["epoch"]))


# --- 7: a backup that does not load falls back; under backend=none every rank has its own --------


@pytest.mark.parametrize("damage", ["truncated", "not these weights"])
def test_a_backup_that_does_not_load_falls_back_to_the_one_before(tmp_path: Path, damage: str) -> None:
    """The newest backup's weights are damaged after the run stopped (a file cut short; a
    readable file that is not this model's weights): the resume says so, restores the backup
    before it, and the run completes with every epoch recorded once."""
    import h5py

    write_script(tmp_path, "fast.py", FAST_FIT)
    stopped = run_tfrun(
        tmp_path, "entry.script=fast.py", "trainer.epochs=40", "trainer.stop_after=25", timeout=JOB_TIMEOUT
    )
    assert stopped.returncode != 0, stopped.stderr
    run_dir = run_dir_of(tmp_path)
    state = read_json(run_dir / "checkpoints/backup/state.json")
    weights = run_dir / "checkpoints/backup" / state["weights"]
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        weights.unlink()
        with h5py.File(weights, "w") as f:
            f["something"] = [1.0, 2.0]

    resumed = run_tfrun(tmp_path, "resume", str(run_dir), timeout=JOB_TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr
    newest, previous = state["epoch"], state["previous"]["epoch"]  # the one before it was kept
    assert newest >= 25 > previous >= 1, state
    log = text_of(run_dir / "logs/rank0.log")
    assert f"tfrun: warning: the backup of epoch {newest} " in log, log
    assert f"tfrun: resumed from the backup of epoch {previous}" in log and "TRAINING DONE" in log
    assert metric_epochs(run_dir) == list(range(40))
    assert read_json(run_dir / "status.json")["state"] == "COMPLETED"


# Every rank trains a model of its own (its own seed) and records its weights at the start of
# fit and after each epoch; a stop request after epoch 3 of the first attempt, once both ranks
# are there (the launcher passes a rank's stop on to the other).
OWN_MODELS = """\
import json, os, signal, time
import numpy as np
import keras
from sklearn.datasets import load_digits
rank = int(os.environ["TFRUN_RANK"])
run_dir = os.environ["TFRUN_RUN_DIR"]
first = not os.path.exists(os.path.join(run_dir, f"stopped-{rank}"))
digits = load_digits()
x, y = (digits.data / 16.0).astype("float32"), digits.target
keras.utils.set_random_seed(rank)
model = keras.Sequential([keras.Input(shape=(64,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(10)])
model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

def checksum():
    return float(sum(np.abs(w).sum() for w in model.get_weights()))

class Record(keras.callbacks.Callback):
    def record(self, **fields):
        with open(os.path.join(run_dir, f"epochs-rank{rank}.jsonl"), "a") as f:
            f.write(json.dumps(fields) + "\\n")
    def on_train_begin(self, logs=None):
        self.record(begin=True, checksum=checksum())
    def on_train_batch_end(self, batch, logs=None):
        time.sleep(0.05)
    def on_epoch_end(self, epoch, logs=None):
        self.record(epoch=epoch + 1, checksum=checksum())
        if first and epoch + 1 == 3:  # both ranks stop after their third epoch
            open(os.path.join(run_dir, f"stopped-{rank}"), "w").close()
            deadline = time.time() + 300
            while not os.path.exists(os.path.join(run_dir, f"stopped-{1 - rank}")):
                if time.time() > deadline:
                    raise SystemExit("the other rank did not reach its third epoch in 300 s")
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGUSR2)

model.fit(x, y, epochs=6, batch_size=256, verbose=0, callbacks=[Record()])
print(f"rank {rank} TRAINING DONE", flush=True)
"""


def test_backend_none_ranks_resume_each_from_its_own_backup(tmp_path: Path) -> None:
    write_script(tmp_path, "own.py", OWN_MODELS)
    stopped = run_tfrun(tmp_path, "entry.script=own.py", "compute.tasks_per_node=2", timeout=JOB_TIMEOUT)
    assert stopped.returncode != 0, stopped.stderr
    run_dir = run_dir_of(tmp_path)
    assert read_json(run_dir / "status.json")["state"] == "STOPPED"
    resumed = run_tfrun(tmp_path, "resume", str(run_dir), timeout=JOB_TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr
    for rank in (0, 1):
        records = [json.loads(line) for line in (run_dir / f"epochs-rank{rank}.jsonl").read_text().splitlines()]
        begins = [i for i, r in enumerate(records) if r.get("begin")]
        assert len(begins) == 2, records
        stopped_at = records[begins[1] - 1]
        assert stopped_at["epoch"] == 3, records
        # This rank's own weights come back, not the chief's.
        assert records[begins[1]]["checksum"] == pytest.approx(stopped_at["checksum"], rel=1e-6), (rank, records)
        assert [r["epoch"] for r in records[begins[1] + 1 :]] == [4, 5, 6]
        assert "tfrun: resumed from the backup of epoch 3" in text_of(run_dir / f"logs/rank{rank}.log")
    assert read_json(run_dir / "checkpoints/backup/rank1/state.json")["epoch"] == 6  # rank 1's own


# --- 9: several fits in one script keep every epoch ---------------------------------------------

# A head, then fine-tuning (recompiled), then fit(epochs=1) twice; with --stop, a stop request
# at the end of the fine-tuning's first epoch, in the first attempt.
FITS_SCRIPT = """\
import argparse, json, os, signal
import keras
from sklearn.datasets import load_digits
parser = argparse.ArgumentParser()
parser.add_argument("--stop", type=int, default=0)
args = parser.parse_args()
run_dir = os.environ["TFRUN_RUN_DIR"]
first = not os.path.exists(os.path.join(run_dir, "stopped"))
digits = load_digits()
x, y = (digits.data / 16.0).astype("float32"), digits.target
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input(shape=(64,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)])
model.layers[0].trainable = False
model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
head = model.fit(x, y, epochs=3, batch_size=256, verbose=0)
print("head epochs", len(head.history["loss"]), flush=True)


class Stop(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if args.stop and first:
            open(os.path.join(run_dir, "stopped"), "w").close()
            os.kill(os.getpid(), signal.SIGUSR2)


model.layers[0].trainable = True
model.compile(optimizer=keras.optimizers.Adam(1e-4), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
model.fit(x, y, epochs=2, batch_size=256, verbose=0, callbacks=[Stop()])
for _ in range(2):
    model.fit(x, y, epochs=1, batch_size=256, verbose=0)
print("TRAINING DONE", flush=True)
"""


def epoch_records(run_dir: Path) -> list[tuple[int, int]]:
    """(epoch, fit call) of every epoch record of metrics.jsonl, in file order."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["epoch"], r.get("fit", 0)) for r in records if r.get("epoch") is not None]


def test_every_fit_of_a_script_keeps_its_epochs(tmp_path: Path) -> None:
    """3 epochs, then 2, then 1 and 1: seven epoch records, numbered on across the fits."""
    write_script(tmp_path, "fits.py", FITS_SCRIPT)
    result = run_tfrun(tmp_path, "entry.script=fits.py", timeout=JOB_TIMEOUT)
    assert result.returncode == 0, result.stderr
    run_dir = run_dir_of(tmp_path)
    assert epoch_records(run_dir) == [(0, 0), (1, 0), (2, 0), (3, 1), (4, 1), (5, 2), (6, 3)]
    shown = run_tfrun(tmp_path, "status", str(run_dir)).stdout
    assert re.search(r"^  latest epoch: epoch 7: loss=[\d.]+$", shown, re.M), shown  # no "fit=": not a metric
    from tfrun.tracking import compare

    assert [epoch for epoch, _ in compare.epoch_series(run_dir)["loss"]] == list(range(7))


def test_a_resume_in_a_later_fit_skips_the_fits_before_it(tmp_path: Path) -> None:
    """Stopped in the second fit: the resumed attempt does not train the first again (its History
    still has its epochs), restores the second fit's own backup, and every epoch is recorded once."""
    write_script(tmp_path, "fits.py", FITS_SCRIPT)
    stopped = run_tfrun(tmp_path, "entry.script=fits.py", "trainer.stop=1", timeout=JOB_TIMEOUT)
    assert stopped.returncode != 0, stopped.stderr
    run_dir = run_dir_of(tmp_path)
    assert read_json(run_dir / "status.json")["state"] == "STOPPED"
    assert epoch_records(run_dir) == [(0, 0), (1, 0), (2, 0), (3, 1)]
    state = read_json(run_dir / "checkpoints/backup/state.json")
    assert (state["fit"], state["epoch"], state["shift"]) == (1, 1, 3), state

    resumed = run_tfrun(tmp_path, "resume", str(run_dir), timeout=JOB_TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr
    second = text_of(run_dir / "logs/rank0.log").rsplit("tfrun: rank 0/1", 1)[1]
    assert "tfrun: fit call 1 was finished by an earlier attempt: skipped" in second
    assert "head epochs 3" in second  # its History, from the run's records
    assert "tfrun: resumed from the backup of epoch 4" in second and "TRAINING DONE" in second
    assert epoch_records(run_dir) == [(0, 0), (1, 0), (2, 0), (3, 1), (4, 1), (5, 2), (6, 3)]


# --- on Slurm: a stop while the job prepares; SIGTERM without Slurm's answer; a bounded warning ------


def fake_commands(tmp_path: Path, **scripts: str) -> dict[str, str]:
    """A bin dir with these commands in front of the real ones: PATH for tfrun and its jobs (a job
    inherits the submitter's environment)."""
    folder = tmp_path / "fakebin"
    folder.mkdir(exist_ok=True)
    for name, body in scripts.items():
        (folder / name).write_text("#!/bin/sh\n" + textwrap.dedent(body))
        (folder / name).chmod(0o755)
    return {"PATH": f"{folder}:{os.environ['PATH']}"}


def submit_quick(tmp_path: Path, job_name: str, *overrides: str) -> tuple[str, Path]:
    """Submit a 2-epoch Slurm run without following it: (job id, run dir)."""
    result = run_tfrun(
        tmp_path,
        "compute=slurm",
        f"compute.job_name={job_name}",
        "compute.wait=false",
        *overrides,
        "trainer.epochs=2",
        "trainer.batch_sleep=0",
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return submitted(result.stderr)


@pytest.mark.slurm
def test_a_stop_while_a_slurm_job_prepares_is_requeued(tmp_path: Path, job_name: str) -> None:
    """SIGUSR2 to both ranks while the bootstrap prepares (Horovod's rendezvous, hvd.init): the
    attempt stops before the script runs and the job is requeued, as it would be later; the
    second attempt trains in full."""
    write_script(tmp_path, "sync.py", SYNC_SCRIPT)
    job_id, run_dir = submit_quick(
        tmp_path, job_name, "backend=horovod", "compute.tasks_per_node=2", "entry.script=sync.py"
    )
    wait_for(lambda: all((run_dir / f"ranks/{r}.json").exists() for r in (0, 1)), JOB_TIMEOUT, "both ranks to start")
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=60)
    assert wait_final(tmp_path, run_dir) == "COMPLETED", text_of(run_dir / "logs/rank0.log")[-3000:]
    tried = attempts(run_dir)
    assert [(a["reason"], a.get("requeued")) for a in tried] == [("preempted", True), ("completed", None)], tried
    for rank in (0, 1):
        first, second = text_of(run_dir / f"logs/rank{rank}.log").split(f"tfrun: rank {rank}/2 on ", 2)[1:]
        assert "tfrun: stopped on request before the script ran" in first and "SCRIPT STARTED" not in first, first
        assert f"rank {rank} TRAINING DONE" in second
    assert sacct_state(job_id) == "COMPLETED"


def _signal_mask(pid: int, field: str) -> int:
    """A process's signal set from /proc (SigBlk: held, SigCgt: a handler is installed); 0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return int(re.search(rf"^{field}:\s*([0-9a-f]+)$", status, re.M).group(1), 16)


def _task_python(job_id: str) -> int | None:
    """The pid of a Slurm task's interpreter in this job (not srun's: its argv[0] is a python)."""
    needle = f"\0SLURM_JOB_ID={job_id}\0".encode()
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
            if argv and "python" in os.path.basename(argv[0].decode()) and b"submitit.core._submit" in argv:
                if needle in b"\0" + (entry / "environ").read_bytes():
                    return int(entry.name)
        except OSError:
            continue
    return None


@pytest.mark.slurm
def test_a_stop_in_a_slurm_tasks_first_moments_is_held_and_requeued(tmp_path: Path, job_name: str) -> None:
    """Slurm may send the time-limit warning up to a minute early, within the first second of a
    short job. SIGUSR2 as soon as the task's interpreter holds or handles it, before any import:
    it must wait for tfrun's handlers (not kill the task, not be lost to submitit's); the attempt
    stops before the script runs and the job is requeued."""
    write_script(tmp_path, "fit.py", FIT_SCRIPT)
    job_id, run_dir = submit_quick(tmp_path, job_name, "entry.script=fit.py")
    usr2 = 1 << (signal.SIGUSR2 - 1)
    deadline = time.monotonic() + JOB_TIMEOUT
    pid = None
    while pid is None or not (_signal_mask(pid, "SigBlk") | _signal_mask(pid, "SigCgt")) & usr2:
        assert time.monotonic() < deadline, "the task's interpreter did not start"
        pid = _task_python(job_id) if pid is None or not Path(f"/proc/{pid}").exists() else pid
        time.sleep(0.002)
    caught = _signal_mask(pid, "SigCgt") & usr2
    os.kill(pid, signal.SIGUSR2)
    assert wait_final(tmp_path, run_dir) == "COMPLETED", text_of(run_dir / "logs/rank0.log")[-3000:]
    tried = attempts(run_dir)
    assert [(a["reason"], a.get("requeued")) for a in tried] == [("preempted", True), ("completed", None)], tried
    # The held signal is taken as the handlers go in, before the rank's log is opened: what the
    # task printed until then is in submitit's log of the step.
    said = text_of(run_dir / f".submitit/{job_id}_0_log.out")
    assert "tfrun: received SIGUSR2: checkpointing and stopping" in said, said
    first, second = text_of(run_dir / "logs/rank0.log").split("tfrun: rank 0/1 on ", 2)[1:]
    assert "tfrun: stopped on request before the script ran" in first, first
    assert "rank 0 TRAINING DONE" in second, second
    assert sacct_state(job_id) == "COMPLETED"
    assert not caught, "a handler was in place before the stop signals were held: the test came late"


# The tasks' interpreter, slow to start in the job's first step: it waits before Python runs
# (where no handler and no held signal can be), having said so in a file.
SLOW_START = """\
#!/bin/sh
if [ -n "$SLURM_JOB_ID" ] && [ "${{SLURM_RESTART_COUNT:-0}}" = 0 ] && [ -z "$TFRUN_STOP_PENDING" ]; then
    touch "{waiting}.$SLURM_PROCID"
    sleep 120
fi
exec {python} "$@"
"""


@pytest.mark.slurm
def test_a_stop_that_ends_a_slurm_tasks_interpreter_as_it_starts_is_sent_again_and_requeued(
    tmp_path: Path, job_name: str
) -> None:
    """Slurm 24.11 may send a requeued job's time-limit warning within its first second: a
    SIGUSR2 that comes before the task's Python can hold it (the interpreter's own start) kills
    the task. The job's batch shell runs the step again with the stop pending: the task holds
    it from its first line and stops before the script runs, the job is requeued by the one
    rule, and the next attempt trains in full. (Before, the job ended FAILED, nothing requeued.)"""
    write_script(tmp_path, "fit.py", FIT_SCRIPT)
    slow = tmp_path / "slow-start"
    slow.write_text(SLOW_START.format(waiting=tmp_path / "waiting", python=sys.executable))
    slow.chmod(0o755)
    job_id, run_dir = submit_quick(tmp_path, job_name, "entry.script=fit.py", f"entry.python={slow}")
    wait_for(lambda: (tmp_path / "waiting.0").exists(), JOB_TIMEOUT, "the task's interpreter to start")
    # As Slurm's time-limit warning is sent: to the job's steps, not to its batch shell.
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=60)
    assert wait_final(tmp_path, run_dir) == "COMPLETED", text_of(run_dir / f".submitit/{job_id}_0_log.out")[-3000:]
    tried = attempts(run_dir)
    assert [(a["reason"], a.get("requeued")) for a in tried] == [("preempted", True), ("completed", None)], tried
    said = text_of(run_dir / f".submitit/{job_id}_0_log.out")
    assert "tfrun: SIGUSR2 ended the tasks before they could hold it: they run again with it pending" in said, said
    assert "tfrun: received SIGUSR2: checkpointing and stopping" in said, said
    first, second = text_of(run_dir / "logs/rank0.log").split("tfrun: rank 0/1 on ", 2)[1:]
    assert "tfrun: stopped on request before the script ran" in first, first
    assert "rank 0 TRAINING DONE" in second, second
    assert sacct_state(job_id) == "COMPLETED"


@pytest.mark.slurm
def test_a_preemption_slurm_does_not_answer_about_still_saves_the_work(
    tmp_path: Path, job_name: str, preempt_nodes: NodePair
) -> None:
    """`scontrol show` hangs in the job (a controller swamped by a preemption wave): the
    SIGTERM is acted on at once (no Slurm command in the signal handler), rank 0's one query
    gives up after a few seconds, and the work is saved and requeued as for a preemption."""
    env = fake_commands(tmp_path, scontrol='case "$*" in *"show job"*) sleep 60;; esac\nexec /usr/bin/scontrol "$@"\n')
    write_script(tmp_path, "fit.py", FIT_SCRIPT)
    # 20 epochs of ~3 s: long enough for the preempting job to get its node on a busy shared cluster.
    result = run_tfrun(
        tmp_path,
        "compute=slurm",
        f"compute.job_name={job_name}",
        "compute.wait=false",
        f"compute.partition={preempt_nodes.low}",
        f"compute.nodelist={preempt_nodes.first}",
        "entry.script=fit.py",
        "trainer.epochs=20",
        timeout=120,
        **env,
    )
    assert result.returncode == 0, result.stderr
    job_id, run_dir = submitted(result.stderr)
    wait_for(lambda: len(metric_epochs(run_dir)) >= 2, JOB_TIMEOUT, "two epochs in metrics.jsonl")
    preempt_nodes.preempt(preempt_nodes.first, job_name=job_name)
    assert wait_final(tmp_path, run_dir) == "COMPLETED", text_of(run_dir / "logs/rank0.log")[-3000:]
    # Other jobs may preempt this one too, on a shared cluster: every preemption is handled alike.
    parts = text_of(run_dir / "logs/rank0.log").split("tfrun: rank 0/1 on ")[1:]
    tried = attempts(run_dir)
    assert len(parts) == len(tried) >= 2 and tried[-1]["reason"] == "completed", tried
    for part, attempt in zip(parts[:-1], tried[:-1]):
        assert "tfrun: received SIGTERM: checkpointing and stopping" in part, part
        assert f"tfrun: Slurm did not say whether job {job_id} is being preempted: saving the work" in part, part
        assert f"tfrun: preempted: requeueing job {job_id}; it resumes from the backup" in part, part
        assert (attempt["reason"], attempt["requeued_by"], attempt["signal"]) == ("preempted", "tfrun", "SIGTERM")
    stops = [
        (i, int(m))
        for i, part in enumerate(parts[:-1])
        for m in re.findall(r"^tfrun: stopping after epoch (\d+), batch \d+$", part, re.M)
        if int(m) > 1
    ]
    assert stops, parts  # at least one stop came mid-training: the next attempt resumes from its epoch
    for i, epoch in stops:
        assert f"tfrun: resumed from the backup of epoch {epoch - 1}" in parts[i + 1], parts[i + 1]
    assert metric_epochs(run_dir) == list(range(20))


# Never ends by itself, and never listens: a stop request stops it where it is.
FOREVER = """\
import time
print("running", flush=True)
while True:
    time.sleep(1)
"""


@pytest.mark.slurm
def test_a_time_limit_warning_is_bounded_when_squeue_fails(tmp_path: Path, job_name: str) -> None:
    """squeue fails in the job: the warning before the time limit is still a time-out, never an
    unbounded "preempted"; with compute.max_requeues=0 it is not requeued."""
    env = fake_commands(tmp_path, squeue='echo "squeue: error: Slurm controller not responding" >&2\nexit 1\n')
    write_script(tmp_path, "forever.py", FOREVER)
    result = run_tfrun(
        tmp_path,
        "compute=slurm",
        f"compute.job_name={job_name}",
        "compute.wait=false",
        "compute.timeout_min=1",
        "compute.signal_delay_s=45",
        "compute.max_requeues=0",
        "entry.script=forever.py",
        timeout=120,
        **env,
    )
    assert result.returncode == 0, result.stderr
    job_id, run_dir = submitted(result.stderr)
    state = wait_final(tmp_path, run_dir, timeout=300)
    tried = attempts(run_dir)
    assert [(a.get("reason"), a.get("requeued")) for a in tried] == [("timeout", False)], tried
    assert state in ("TIMEOUT", "FAILED"), state
    log = text_of(run_dir / "logs/rank0.log")
    assert "time limit reached after 0 requeue(s) already (compute.max_requeues=0): not requeued" in log, log
