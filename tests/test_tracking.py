"""Metrics, run comparison, plots and MLflow (issue 5's tracking side; tuning: tests/test_tuning.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import (
    MlflowServer,
    mlflow_runs,
    popen_tfrun,
    read_json,
    run_dir_from,
    run_tfrun,
    scratch_env,
    stop,
    tfrun_command,
    wait_for,
)

CUSTOM = """
import argparse, tfrun
p = argparse.ArgumentParser(); p.add_argument("--x", type=float, default=0.5); a = p.parse_args()
if a.x > 0.9:
    raise SystemExit("x too large")
tfrun.log_params(x=a.x)
for step in range(3):
    tfrun.log_metric("score", -(a.x - 0.3) ** 2 + step * 0.001, step=step)
"""


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_keras_epochs_are_recorded_without_script_changes(tmp_path: Path) -> None:
    result = run_tfrun(tmp_path, "trainer.epochs=3", timeout=300)
    assert result.returncode == 0, result.stderr
    run_dir = run_dir_from(result.stderr)
    records = metrics(run_dir)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert records[-1]["loss"] < records[0]["loss"]
    assert {"val_accuracy", "val_loss", "accuracy"} <= set(records[-1])
    # TensorBoard's own reader sees scalars (its scalars plugin), step by step, with the recorded values.
    from tensorboard.backend.event_processing.plugin_event_accumulator import (
        EventAccumulator,
    )
    from tensorboard.util.tensor_util import make_ndarray

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    assert {"loss", "val_accuracy"} <= set(events.PluginTagToContent("scalars"))
    loss = events.Tensors("loss")
    assert [e.step for e in loss] == [0, 1, 2]
    assert [round(float(make_ndarray(e.tensor_proto)), 5) for e in loss] == [round(r["loss"], 5) for r in records]
    status = run_tfrun(tmp_path, "status", str(run_dir))
    assert "latest epoch: epoch 3:" in status.stdout and "val_accuracy=" in status.stdout


@pytest.mark.slow
def test_log_metric_from_any_script(tmp_path: Path) -> None:
    (tmp_path / "custom.py").write_text(CUSTOM)
    result = run_tfrun(tmp_path, "entry.script=custom.py", "trainer.x=0.4")
    assert result.returncode == 0, result.stderr
    records = metrics(run_dir_from(result.stderr))
    assert records[0]["params"] == {"x": 0.4}
    assert [(r["name"], r["step"]) for r in records[1:]] == [("score", 0), ("score", 1), ("score", 2)]
    assert abs(records[1]["value"] + 0.01) < 1e-9


@pytest.mark.slow
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


@pytest.mark.slow
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
# Half its epochs with the server up; then it waits (at most 5 min) until the test has stopped
# the server, so that the other half trains without it however slowly the test saw the first.
TIMED_EPOCHS = """
import os, time, numpy as np, tf_keras as keras
class Slow(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        time.sleep(0.05)
    def on_epoch_begin(self, epoch, logs=None):
        deadline = time.time() + 300
        while epoch == 20 and not os.path.exists("server-stopped") and time.time() < deadline:
            time.sleep(0.1)
x = np.random.RandomState(0).rand(256, 8).astype("float32"); y = (x.sum(1) > 4).astype("float32")
model = keras.Sequential([keras.layers.Dense(8, activation="relu", input_shape=(8,)), keras.layers.Dense(1, activation="sigmoid")])
model.compile("adam", "binary_crossentropy", metrics=["accuracy"])
model.fit(x, y, batch_size=32, epochs=40, callbacks=[Slow()], verbose=0)
"""


@pytest.mark.slow
def test_mlflow_server_down_mid_run_then_sync(tmp_path: Path) -> None:
    """The server goes away while the run trains: training keeps its pace, the run
    completes, and ``tfrun sync`` later brings the server up to date."""
    (tmp_path / "timed.py").write_text(TIMED_EPOCHS)
    server = MlflowServer(tmp_path).start()
    proc, _, err = popen_tfrun(
        tmp_path,
        "tracking=mlflow",
        f"tracking.tracking_uri={server.uri}",
        "tracking.experiment=timed",
        "entry.script=timed.py",
    )
    try:

        def live_epochs() -> list[int]:
            runs = [r for r in mlflow_runs(server.uri) if r["experiment"] == "timed"]
            return [step for step, _ in runs[0]["history"].get("loss", [])] if runs else []

        wait_for(lambda: len(live_epochs()) >= 2 or proc.poll() is not None, 180, "epochs in MLflow during the run")
        assert proc.poll() is None, err.read_text()  # seen in MLflow while still training
        server.stop()
        stopped_at = time.time()
        (tmp_path / "server-stopped").touch()
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
    before = [d for d, a, b in zip(lengths, epochs, epochs[1:]) if b["time"] < stopped_at]
    after = [d for d, a, b in zip(lengths, epochs, epochs[1:]) if a["time"] > stopped_at + 1]
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


# --- secrets: in the task, not in MLflow or the logs ---------------------------------------------

TOKEN, PASSWORD, KEY = "tok-5f3a9c1e77", "pw-8d2e41", "k-77aa19"
SECRET_SCRIPT = f"""
import os, tfrun
assert os.environ["API_TOKEN"] == {TOKEN!r}, "the task must get the real value"
assert os.environ["DB_URL"] == "postgresql://bob:{PASSWORD}@db:5432/x"
tfrun.log_metric("m", 1.0)
print("the task has its secrets", flush=True)
"""


def _sqlite_text(path: Path) -> str:
    """Every value of every table of an SQLite file, as text (and its raw bytes)."""
    import sqlite3

    with sqlite3.connect(path) as db:
        tables = [row[0] for row in db.execute("select name from sqlite_master where type='table'")]
        rows = [str(row) for table in tables for row in db.execute(f'select * from "{table}"')]
    return "\n".join(rows) + path.read_bytes().decode("latin-1")


@pytest.mark.slow
def test_secrets_stay_out_of_mlflow_and_the_logs(tmp_path: Path) -> None:
    """Values of secret-looking keys and a URI's password: the task gets them; MLflow's
    params, tags and artifacts and the rank's log show them masked (deps.env not as params)."""
    (tmp_path / "secret.py").write_text(SECRET_SCRIPT)
    result = run_tfrun(
        tmp_path,
        "entry.script=secret.py",
        "tracking=mlflow",
        f"++deps.env.API_TOKEN={TOKEN}",
        f"++deps.env.DB_URL=postgresql://bob:{PASSWORD}@db:5432/x",
        f"++trainer.api_key={KEY}",
        f"++tfrun.tags.db_password={PASSWORD}",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    run_dir = run_dir_from(result.stderr)
    log = (run_dir / "logs/rank0.log").read_text()
    assert "the task has its secrets" in log
    assert "tfrun: set API_TOKEN=*** DB_URL=postgresql://***@db:5432/x" in log, log
    plan = json.loads((run_dir / "plan.json").read_text())  # the plan keeps the real values
    assert plan["tasks"][0]["env"]["API_TOKEN"] == TOKEN and plan["config"]["trainer"]["api_key"] == KEY

    runs = tmp_path / "runs"
    store = _sqlite_text(runs / "mlflow.db")
    artifacts = {
        p.relative_to(runs / "mlartifacts"): p.read_text(errors="replace")
        for p in (runs / "mlartifacts").rglob("*")
        if p.is_file()
    }
    names = {str(p).split("/artifacts/", 1)[-1] for p in artifacts}
    assert {"plan.json", "hydra/config.yaml", "hydra/overrides.yaml", "hydra/hydra.yaml", "logs/rank0.log"} <= names
    for secret in (TOKEN, PASSWORD, KEY):
        assert secret not in store, f"{secret} is in MLflow's database"
        assert [str(p) for p, text in artifacts.items() if secret in text] == [], f"{secret} is in artifacts"
        assert secret not in log
    overrides = next(text for p, text in artifacts.items() if str(p).endswith("hydra/overrides.yaml"))
    assert "++deps.env.API_TOKEN=***" in overrides and "postgresql://***@db:5432/x" in overrides, overrides

    found = _mlflow_runs(f"sqlite:///{runs / 'mlflow.db'}")[0]
    assert not [k for k in found["params"] if k.startswith("deps.env")], found["params"]
    assert found["params"]["trainer.api_key"] == "***" and found["params"]["deps.kind"] == "none"
    assert found["tags"]["db_password"] == "***"


# --- a model is registered once, whoever ends the MLflow run ------------------------------------

REGISTERED = """
import os, pathlib, time
run_dir = pathlib.Path(os.environ["TFRUN_RUN_DIR"])
(pathlib.Path(os.environ["TFRUN_OUTPUT_DIR"]) / "weights.txt").write_text("weights")
(run_dir / "ready").touch()
deadline = time.time() + 300
while not (run_dir / "go").exists():
    if time.time() > deadline:
        raise SystemExit("no go from the test in 300 s")
    time.sleep(0.1)
"""


def _model_versions(uri: str, name: str) -> list[str]:
    code = (
        "import json, mlflow; c = mlflow.MlflowClient(%r, registry_uri=%r)\n"
        "print(json.dumps([v.version for v in c.search_model_versions(\"name='%s'\")]))" % (uri, uri, name)
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return sorted(str(v) for v in json.loads(done.stdout))


@pytest.mark.slow
def test_concurrent_syncs_register_the_model_once(tmp_path: Path) -> None:
    """The server is down when the run ends (neither its task nor its launcher can end the
    MLflow run); once it is back, three ``tfrun sync`` at once end it: one model version."""
    (tmp_path / "registered.py").write_text(REGISTERED)
    server = MlflowServer(tmp_path).start()
    proc, _, err = popen_tfrun(
        tmp_path,
        "tracking=mlflow",
        f"tracking.tracking_uri={server.uri}",
        "tracking.register_model=tiny",
        "entry.script=registered.py",
    )
    try:
        wait_for(lambda: any((tmp_path / "runs").glob("*/ready")) or proc.poll() is not None, 120, "the task")
        run_dir = next((tmp_path / "runs").glob("*/ready")).parent
        wait_for(lambda: (run_dir / "mlflow.json").exists() or proc.poll() is not None, 120, "the MLflow run")
        server.stop()
        (run_dir / "go").touch()
        assert proc.wait(timeout=300) == 0, err.read_text()
    finally:
        stop(proc)
        server.stop()
    assert "registered" not in json.loads((run_dir / "mlflow.json").read_text())
    with server.start():
        syncs = [
            subprocess.Popen(
                [*tfrun_command(), "sync", str(run_dir)],
                cwd=tmp_path,
                env=scratch_env(tmp_path),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(3)
        ]
        outputs = [s.communicate(timeout=300) for s in syncs]
        assert [s.returncode for s in syncs] == [0, 0, 0], outputs
        assert _model_versions(server.uri, "tiny") == ["1"]
    assert json.loads((run_dir / "mlflow.json").read_text())["registered"] == {"name": "tiny", "version": "1"}


def test_the_redactor_masks_secrets_in_data_and_text_and_leaves_the_rest() -> None:
    from tfrun.tracking.redact import MASK, Redactor, shown

    config = {
        "deps": {"env": {"API_TOKEN": "tok-123456", "PASSWORD": "abc", "DEBUG": "1"}},
        "trainer": {"lr": 0.1, "db": "mysql://u:pa55word@h/db", "secrets": {"a": "zzzz"}, "api_key": None},
    }
    redactor = Redactor(config)
    assert redactor.data(config) == {
        "deps": {"env": {"API_TOKEN": MASK, "PASSWORD": MASK, "DEBUG": "1"}},
        "trainer": {"lr": 0.1, "db": f"mysql://{MASK}@h/db", "secrets": {"a": MASK}, "api_key": None},
    }
    # free text: known values (from 4 characters), the config's secret keys' assignments, URIs
    assert redactor.text("- ++deps.env.PASSWORD=abc") == f"- ++deps.env.PASSWORD={MASK}"
    assert redactor.text('  "PASSWORD": "abc",') == f'  "PASSWORD": "{MASK}",'
    assert redactor.text("token tok-123456, password pa55word") == f"token {MASK}, password {MASK}"
    assert redactor.text("see https://bob:x@example.org/a") == f"see https://{MASK}@example.org/a"
    # what only looks like a secret's name in a log stays: metric names, values of other keys
    assert redactor.text("masked_token_accuracy: 0.91 - abc_loss: 0.2") == "masked_token_accuracy: 0.91 - abc_loss: 0.2"
    assert shown("AWS_SECRET_ACCESS_KEY", "x") == MASK and shown("HOME", "/home/u") == "/home/u"


@pytest.mark.slurm
def test_a_sweep_that_was_not_waited_for_has_its_mlflow_parent_closed(tmp_path: Path, job_name: str) -> None:
    """compute.wait=false: the launcher is gone before the points end; `tfrun status SWEEP`
    that sees the last one end closes the sweep's parent run (it stayed RUNNING)."""
    (tmp_path / "quick.py").write_text("import sys\nprint('point', sys.argv[1:])\n")
    launched = run_tfrun(
        tmp_path,
        "-m",
        "compute=slurm",
        "compute.wait=false",
        f"compute.job_name={job_name}",
        "tracking=mlflow",
        "entry.script=quick.py",
        "trainer.x=1,2",
        timeout=300,
    )
    assert launched.returncode == 0, launched.stderr
    sweep = next((tmp_path / "runs").glob("sweep-*"))

    def ended() -> bool:
        shown = run_tfrun(tmp_path, "status", str(sweep))
        assert shown.returncode in (0, 1), shown.stderr
        return all(
            read_json(p / "status.json").get("state") == "COMPLETED"
            for p in sweep.iterdir()
            if p.is_dir() and (p / "plan.json").exists()
        )

    wait_for(ended, 300, "the sweep's points to complete")
    found = _mlflow_runs(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    parents = [r for r in found if r["parent"] is None]
    assert len(parents) == 1 and parents[0]["status"] == "FINISHED", found
    assert sorted(r["status"] for r in found if r["parent"] is not None) == ["FINISHED", "FINISHED"]
