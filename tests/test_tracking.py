"""Metrics, run comparison, plots and MLflow (issue 5's tracking side; tuning: tests/test_tuning.py)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.helpers import (MlflowServer, mlflow_runs, popen_tfrun, run_dir_from, run_tfrun,
                           stop, wait_for)

pytestmark = pytest.mark.slow

CUSTOM = '''
import argparse, tfrun
p = argparse.ArgumentParser(); p.add_argument("--x", type=float, default=0.5); a = p.parse_args()
if a.x > 0.9:
    raise SystemExit("x too large")
tfrun.log_params(x=a.x)
for step in range(3):
    tfrun.log_metric("score", -(a.x - 0.3) ** 2 + step * 0.001, step=step)
'''


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_keras_epochs_are_recorded_without_script_changes(tmp_path: Path) -> None:
    result = run_tfrun(tmp_path, "trainer.epochs=3", timeout=300)
    assert result.returncode == 0, result.stderr
    run_dir = run_dir_from(result.stderr)
    records = metrics(run_dir)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert records[-1]["loss"] < records[0]["loss"]
    assert {"val_accuracy", "val_loss", "accuracy"} <= set(records[-1])
    # TensorBoard's own reader sees scalars (its scalars plugin), step by step, with the recorded values.
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    assert {"loss", "val_accuracy"} <= set(events.PluginTagToContent("scalars"))
    loss = events.Tensors("loss")
    assert [e.step for e in loss] == [0, 1, 2]
    assert [round(float(make_ndarray(e.tensor_proto)), 5) for e in loss] == [round(r["loss"], 5) for r in records]
    status = run_tfrun(tmp_path, "status", str(run_dir))
    assert "latest epoch: epoch 3:" in status.stdout and "val_accuracy=" in status.stdout


def test_log_metric_from_any_script(tmp_path: Path) -> None:
    (tmp_path / "custom.py").write_text(CUSTOM)
    result = run_tfrun(tmp_path, "entry.script=custom.py", "trainer.x=0.4")
    assert result.returncode == 0, result.stderr
    records = metrics(run_dir_from(result.stderr))
    assert records[0]["params"] == {"x": 0.4}
    assert [(r["name"], r["step"]) for r in records[1:]] == [("score", 0), ("score", 1), ("score", 2)]
    assert abs(records[1]["value"] + 0.01) < 1e-9


def test_sweep_table_and_plot(tmp_path: Path) -> None:
    result = run_tfrun(tmp_path, "-m", "trainer.lr=0.001,0.02", "trainer.epochs=3", timeout=400)
    assert result.returncode == 0, result.stderr
    sweep = next((tmp_path / "runs").glob("sweep-*"))
    table = run_tfrun(tmp_path, "runs", "--sweep", str(sweep), "--sort", "val_accuracy")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["run", "trainer.lr", "state", "duration"]
    assert "val_accuracy final/best" in lines[0]
    # Sorted by final val_accuracy, best first: the higher learning rate learns more in 3 epochs.
    assert lines[1].split()[1] == "0.02" and lines[2].split()[1] == "0.001"
    assert all("COMPLETED" in line for line in lines[1:])
    plot = run_tfrun(tmp_path, "plot", str(sweep), "--metric", "val_loss")
    assert plot.returncode == 0, plot.stderr
    png = Path(plot.stdout.strip())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    missing = run_tfrun(tmp_path, "plot", str(sweep), "--metric", "nope")
    assert missing.returncode == 1 and "nope" in missing.stderr


def _mlflow_runs(uri: str) -> list:
    found = mlflow_runs(uri)
    for run in found:  # the loss curve's steps, the latest value of each metric
        run["steps"] = [step for step, _ in run["history"].get("loss", [])]
        run["metrics"] = {k: v[-1][1] for k, v in run["history"].items() if v}
    return found


def test_mlflow_local_store_single_run_and_sweep(tmp_path: Path) -> None:
    # MLflow's system metrics too (a run shorter than their sampling interval gets a last sample).
    result = run_tfrun(tmp_path, "tracking=mlflow", "trainer.epochs=2", "tracking.system_metrics=true", timeout=300)
    assert result.returncode == 0, result.stderr
    sweep = run_tfrun(tmp_path, "-m", "tracking=mlflow", "trainer.epochs=1,2", timeout=400)
    assert sweep.returncode == 0, sweep.stderr
    found = _mlflow_runs(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    single = [r for r in found if r["experiment"] == "tfrun"]
    assert len(single) == 1 and single[0]["status"] == "FINISHED"
    assert single[0]["steps"] == [0, 1] and "val_accuracy" in single[0]["metrics"]
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(single[0]["metrics"])
    assert single[0]["params"]["trainer.epochs"] == "2" and single[0]["params"]["compute.target"] == "local"
    assert {"plan.json", "status.json", "logs", "hydra", "model"} <= set(single[0]["artifacts"])
    run_dir = run_dir_from(result.stderr)
    tags = single[0]["tags"]
    assert tags["tfrun.run_dir"] == str(run_dir) and tags["tfrun.state"] == "COMPLETED"
    assert "tfrun.attempt" in tags and "tfrun.host" in tags, tags
    # The attempt's provenance: the example's dir is in this repo, so it has a commit.
    assert len(tags["tfrun.git_commit"]) == 40 and tags["tfrun.hosts"] and tags["tfrun.packages"].isdigit(), tags
    assert "provenance" in single[0]["artifacts"]
    # Opened by the chief task itself, as it started: its log names the MLflow run.
    assert f"MLflow run {single[0]['run_id']}" in (run_dir / "logs/rank0.log").read_text()
    swept = [r for r in found if r["experiment"].startswith("sweep-")]
    parents = [r for r in swept if r["parent"] is None]
    children = [r for r in swept if r["parent"] is not None]
    assert len(parents) == 1 and parents[0]["status"] == "FINISHED"
    assert sorted(c["name"] for c in children) == ["0", "1"]
    assert {c["parent"] for c in children} == {parents[0]["run_id"]}
    assert not list(tmp_path.glob("mlruns")), "artifacts must stay beside the runs, not in the cwd"


# Epochs of a known length (a sleep per batch), so that a slowed epoch shows.
TIMED_EPOCHS = """
import time, numpy as np, tf_keras as keras
class Slow(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        time.sleep(0.05)
x = np.random.RandomState(0).rand(256, 8).astype("float32"); y = (x.sum(1) > 4).astype("float32")
model = keras.Sequential([keras.layers.Dense(8, activation="relu", input_shape=(8,)), keras.layers.Dense(1, activation="sigmoid")])
model.compile("adam", "binary_crossentropy", metrics=["accuracy"])
model.fit(x, y, batch_size=32, epochs=40, callbacks=[Slow()], verbose=0)
"""


def test_mlflow_server_down_mid_run_then_sync(tmp_path: Path) -> None:
    """The server goes away while the run trains: training keeps its pace, the run
    completes, and ``tfrun sync`` later brings the server up to date."""
    (tmp_path / "timed.py").write_text(TIMED_EPOCHS)
    server = MlflowServer(tmp_path).start()
    proc, _, err = popen_tfrun(tmp_path, "tracking=mlflow", f"tracking.tracking_uri={server.uri}",
                               "tracking.experiment=timed", "entry.script=timed.py")
    try:
        def live_epochs() -> list[int]:
            runs = [r for r in mlflow_runs(server.uri) if r["experiment"] == "timed"]
            return [step for step, _ in runs[0]["history"].get("loss", [])] if runs else []

        wait_for(lambda: len(live_epochs()) >= 2 or proc.poll() is not None, 180, "epochs in MLflow during the run")
        assert proc.poll() is None, err.read_text()  # seen in MLflow while still training
        server.stop()
        stopped_at = time.time()
        code = proc.wait(timeout=300)
    finally:
        stop(proc)
        server.stop()
    stderr = err.read_text()
    assert code == 0, stderr
    run_dir = run_dir_from(stderr)
    epochs = [r for r in metrics(run_dir) if r.get("epoch") is not None]
    assert [r["epoch"] for r in epochs] == list(range(40))
    lengths = [b["time"] - a["time"] for a, b in zip(epochs, epochs[1:])]
    before = [d for d, r in zip(lengths, epochs[1:]) if r["time"] < stopped_at]
    after = [d for d, r in zip(lengths, epochs[1:]) if r["time"] > stopped_at + 1]
    assert before and after, (before, after)
    assert max(after) < 2 * max(before) + 1, f"epochs slowed down with MLflow gone: {before} -> {after}"
    log = (run_dir / "logs/rank0.log").read_text()
    assert "MLflow unreachable" in log and f"tfrun sync {run_dir}" in log, log
    assert "could not log run" in stderr  # the launcher's own try at the end, reported, not fatal
    down = run_tfrun(tmp_path, "sync", str(run_dir))
    assert down.returncode == 1 and "MLflow unreachable" in down.stderr and "nothing lost" in down.stderr
    with server.start():  # the same store, the same address
        synced = run_tfrun(tmp_path, "sync", str(run_dir))
        assert synced.returncode == 0, synced.stderr
        assert "ended COMPLETED" in synced.stdout
        runs = [r for r in mlflow_runs(server.uri) if r["experiment"] == "timed"]
    assert len(runs) == 1 and runs[0]["status"] == "FINISHED", runs
    assert [step for step, _ in runs[0]["history"]["loss"]] == list(range(40))
    assert [v for _, v in runs[0]["history"]["loss"]] == pytest.approx([r["loss"] for r in epochs])
    assert "logs" in runs[0]["artifacts"]
