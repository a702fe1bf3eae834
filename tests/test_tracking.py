"""Metrics, run comparison, plots, MLflow and Optuna tuning (issue 5's tracking side)."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import DIGITS, run_dir_from, run_tfrun, scratch_env

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
    code = (
        "import json, mlflow; mlflow.set_tracking_uri(%r); c = mlflow.MlflowClient();"
        "out = [];"
        "[out.append({'experiment': e.name, 'name': r.info.run_name, 'status': r.info.status,"
        " 'parent': r.data.tags.get('mlflow.parentRunId'), 'metrics': r.data.metrics, 'params': r.data.params,"
        " 'steps': [m.step for m in c.get_metric_history(r.info.run_id, 'loss')],"
        " 'artifacts': [a.path for a in c.list_artifacts(r.info.run_id)]})"
        " for e in c.search_experiments() for r in c.search_runs([e.experiment_id])];"
        "print(json.dumps(out))" % uri
    )
    return json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def test_mlflow_local_store_single_run_and_sweep(tmp_path: Path) -> None:
    result = run_tfrun(tmp_path, "tracking=mlflow", "trainer.epochs=2", timeout=300)
    assert result.returncode == 0, result.stderr
    sweep = run_tfrun(tmp_path, "-m", "tracking=mlflow", "trainer.epochs=1,2", timeout=400)
    assert sweep.returncode == 0, sweep.stderr
    found = _mlflow_runs(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    single = [r for r in found if r["experiment"] == "tfrun"]
    assert len(single) == 1 and single[0]["status"] == "FINISHED"
    assert single[0]["steps"] == [0, 1] and "val_accuracy" in single[0]["metrics"]
    assert single[0]["params"]["trainer.epochs"] == "2" and single[0]["params"]["compute.target"] == "local"
    assert {"plan.json", "status.json", "logs", "hydra"} <= set(single[0]["artifacts"])
    swept = [r for r in found if r["experiment"].startswith("sweep-")]
    parents = [r for r in swept if r["parent"] is None]
    children = [r for r in swept if r["parent"] is not None]
    assert len(parents) == 1 and parents[0]["status"] == "FINISHED"
    assert sorted(c["name"] for c in children) == ["0", "1"]
    assert not list(tmp_path.glob("mlruns")), "artifacts must stay beside the runs, not in the cwd"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_mlflow_tracking_server(tmp_path: Path) -> None:
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        uri = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "mlflow server did not start"
                time.sleep(0.5)
        result = run_tfrun(tmp_path, "tracking=mlflow", f"tracking.tracking_uri={uri}",
                           "tracking.experiment=digits", "trainer.epochs=2", timeout=300)
        assert result.returncode == 0, result.stderr
        assert f"logged to MLflow ({uri})" in result.stderr
        found = [r for r in _mlflow_runs(uri) if r["experiment"] == "digits"]
        assert len(found) == 1 and found[0]["steps"] == [0, 1] and "logs" in found[0]["artifacts"]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_optuna_tpe_over_lr_and_batch_size_with_failed_trials(tmp_path: Path) -> None:
    """10 trials on the digits example, 6 of them chosen by TPE; a deliberately failing region is
    told to Optuna as failed."""
    script = tmp_path / "digits_or_fail.py"
    script.write_text(
        "import sys, runpy\n"
        "bs = int(sys.argv[sys.argv.index('--batch_size') + 1])\n"
        "if bs == 128:\n    raise SystemExit('batch size 128 is broken on purpose')\n"
        f"runpy.run_path({str(DIGITS)!r}, run_name='__main__')\n"
    )
    result = run_tfrun(
        tmp_path, "-m", "hydra/sweeper=optuna", "hydra.sweeper.sampler._target_=optuna.samplers.TPESampler",
        "hydra.sweeper.sampler.seed=1", "hydra.sweeper.sampler.n_startup_trials=4", "hydra.sweeper.n_trials=10",
        "hydra.sweeper.direction=maximize",
        "trainer.lr=interval(0.0005,0.05)", "trainer.batch_size=choice(32,64,128)", "trainer.epochs=2",
        f"entry.script={script}", "tfrun.objective=val_accuracy", timeout=1500,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = next((tmp_path / "runs").glob("sweep-*"))
    index = json.loads((sweep / "sweep.json").read_text())["points"]
    assert len(index) == 10
    values = [p["objective"]["value"] for p in index if p["objective"]["value"] is not None]
    failed = [p for p in index if p["objective"]["value"] is None]
    assert failed and all("trainer.batch_size=128" in " ".join(p["overrides"]) for p in failed)
    assert len(values) + len(failed) == 10 and max(values) >= 0.9
    best = max(index, key=lambda p: p["objective"]["value"] or -1)
    assert f"tfrun: best run: {best['run_dir']}" in result.stderr
    assert "Best value" in result.stderr + result.stdout


@pytest.mark.slurm
def test_optuna_trials_run_on_slurm_in_parallel(tmp_path: Path) -> None:
    """n_jobs trials at a time, each batch one Slurm job array; a failing trial does not end the study."""
    (tmp_path / "custom.py").write_text(CUSTOM)
    result = run_tfrun(
        tmp_path, "-m", "hydra/sweeper=optuna", "hydra.sweeper.sampler.seed=3", "hydra.sweeper.n_trials=4",
        "hydra.sweeper.n_jobs=2", "hydra.sweeper.direction=maximize", "trainer.x=interval(0,1)",
        "compute=slurm", "compute.poll_s=1", "entry.script=custom.py", "tfrun.objective=score", timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = next((tmp_path / "runs").glob("sweep-*"))
    points = json.loads((sweep / "sweep.json").read_text())["points"]
    assert len(points) == 4
    jobs = [json.loads((Path(p["run_dir"]) / "status.json").read_text())["job_ids"][-1] for p in points]
    arrays = [j.split("_")[0] for j in jobs]
    assert len(set(arrays)) == 2 and arrays[0] == arrays[1] and arrays[2] == arrays[3], jobs
    assert "tfrun: best run:" in result.stderr
