"""The Python API (``tfrun.launch``, ``tfrun.sweep``, ``tfrun.Run``) and the drop-in for the
cloud SDK v1 ``TensorFlow`` estimator (issue 8), run in this process as a notebook would.

The estimator tests are that SDK's documented code samples with only the import line
changed, submitted to the local Slurm against the bundled examples.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

import tfrun
from tests.helpers import DIGITS, REPO, alive, run_tfrun, wait_for, wait_gone

LOCAL_SLURM = REPO / "scripts" / "local-slurm"
EXAMPLES = REPO / "examples"
JOB_TIMEOUT = 600

QUICK_SCRIPT = """\
import argparse, os, time
parser = argparse.ArgumentParser()
parser.add_argument("--sleep", type=float, default=0)
args = parser.parse_args()
print(f"quick script on {os.environ.get('SLURMD_NODENAME', 'here')} rank {os.environ['TFRUN_RANK']}", flush=True)
with open(os.path.join(os.environ["TFRUN_OUTPUT_DIR"], "pid"), "w") as f:
    f.write(str(os.getpid()))
time.sleep(args.sleep)
print("quick script done", flush=True)
"""


@pytest.fixture
def quick(scratch: Path) -> Path:
    (scratch / "quick.py").write_text(QUICK_SCRIPT)
    return scratch / "quick.py"


@pytest.fixture
def no_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Anything that tries to end the (notebook's) process fails the test instead."""
    def refuse(*args: Any) -> None:
        raise AssertionError(f"the API tried to exit the process: {args}")

    monkeypatch.setattr(sys, "exit", refuse)
    monkeypatch.setattr(os, "_exit", refuse)


def epochs(run: tfrun.Run) -> list[int]:
    return [m["epoch"] for m in run.metrics() if m.get("epoch") is not None]


# --- tfrun.launch / Run, locally -----------------------------------------------------------------

@pytest.mark.slow
def test_launch_trains_and_returns_a_completed_run(scratch: Path, no_exit: None) -> None:
    run = tfrun.launch([f"entry.script={DIGITS}", "trainer.epochs=2"])
    assert isinstance(run, tfrun.Run)
    assert run.dir.is_dir() and run.dir.parent == scratch / "runs" and run.id == run.dir.name
    assert run.status() == "COMPLETED"
    assert "val_accuracy=" in run.logs(0) and "Epoch 2/2" in run.logs(0)
    assert epochs(run) == [0, 1] and all("loss" in m for m in run.metrics() if "epoch" in m)
    assert (run.dir / "outputs/model.keras").is_file()

    again = tfrun.Run.load(run.id)
    assert again.dir == run.dir and again.status() == "COMPLETED" and again.metrics() == run.metrics()
    assert tfrun.Run.load(str(run.dir)).id == run.id
    assert tfrun.Run.load(run.id[-6:]).dir == run.dir  # a unique part of the id


def test_launch_without_waiting_returns_at_once(scratch: Path, quick: Path, no_exit: None) -> None:
    start = time.monotonic()
    run = tfrun.launch(["entry.script=quick.py", "trainer.sleep=4"], wait=False)
    took = time.monotonic() - start
    assert took < 4, f"launch(wait=False) took {took:.1f} s"
    assert run.status() in ("PENDING", "RUNNING")
    assert run.wait(timeout_s=120, poll_s=0.5) == "COMPLETED"
    assert "quick script done" in run.logs(0)


def test_cancel_a_sleeping_run(scratch: Path, quick: Path, no_exit: None) -> None:
    """Cancel a run this very process launched: the run ends CANCELLED, the caller goes on."""
    run = tfrun.launch(["entry.script=quick.py", "trainer.sleep=300"], wait=False)
    pid_file = run.dir / "outputs/pid"
    deadline = time.monotonic() + 60
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    pid = int(pid_file.read_text())
    assert alive(pid)
    run.cancel()
    assert run.wait(timeout_s=60, poll_s=0.5) == "CANCELLED"
    assert wait_gone([pid], timeout=15) == [], "the task survived cancel()"
    assert tfrun.Run.load(run.id).status() == "CANCELLED"


@pytest.mark.parametrize("override, named", [
    ("compute.nodes=abc", "compute.nodes"),
    ("compute=nope", "compute=nope"),
    ("nokey=1", "nokey"),
    ("compute.nodes=0", "compute.nodes"),
    ("entry.script=missing.py", "entry.script"),
    ("trainer.lr=$(reboot)", "trainer.lr"),
])
def test_bad_override_raises_config_error_and_creates_nothing(scratch: Path, no_exit: None, override: str,
                                                             named: str) -> None:
    with pytest.raises(tfrun.ConfigError) as error:
        tfrun.launch([override])
    assert named in str(error.value)
    with pytest.raises(tfrun.ConfigError):
        tfrun.sweep(["trainer.epochs=1,2", override])
    assert not (scratch / "runs").exists() or not any((scratch / "runs").iterdir())


@pytest.mark.slow
def test_sweep_returns_a_run_per_point(scratch: Path, no_exit: None) -> None:
    runs = tfrun.sweep(["trainer.epochs=1,2"])
    assert len(runs) == 2 and runs[0].dir.parent == runs[1].dir.parent
    assert [r.status() for r in runs] == ["COMPLETED", "COMPLETED"]
    assert [epochs(r) for r in runs] == [[0], [0, 1]]


# --- Slurm through the API -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster() -> None:
    out = subprocess.run([str(LOCAL_SLURM), "status"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        pytest.fail("the local Slurm cluster is not up: start it with `scripts/local-slurm start`.\n"
                    f"{out.stdout}{out.stderr}", pytrace=False)


@pytest.fixture
def job_name(cluster: None) -> Iterator[str]:
    name = f"tfrun-api-{uuid.uuid4().hex[:8]}"
    yield name
    subprocess.run(["scancel", f"--name={name}"], capture_output=True, timeout=60)


@pytest.fixture
def leftovers_cancelled(cluster: None, scratch: Path) -> Iterator[None]:
    """The estimator samples name no job: afterwards, cancel whatever their runs left queued."""
    yield
    ids = []
    for status in (scratch / "runs").glob("*/status.json"):
        data = json.loads(status.read_text())
        if data.get("state") not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            ids += data.get("job_ids") or []
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=60)


@pytest.mark.slurm
def test_launch_on_slurm(scratch: Path, quick: Path, job_name: str, no_exit: None) -> None:
    run = tfrun.launch(["compute=slurm", f"compute.job_name={job_name}", "entry.script=quick.py"])
    assert run.status() == "COMPLETED"
    assert re.search(r"^quick script on node\d rank 0$", run.logs(0), re.M), run.logs(0)
    info = run.info()
    assert info["target"] == "slurm" and len(info["job_ids"]) == 1
    job = info["job_ids"][0]

    def accounted() -> list[str]:  # a job that ran for a second is named "allocation" at first
        return subprocess.run(["sacct", "-j", job, "-X", "-n", "-o", "JobName%40,State"], capture_output=True,
                              text=True, timeout=60).stdout.split()

    wait_for(lambda: accounted() == [job_name, "COMPLETED"], 60, f"sacct to show {job_name} COMPLETED")


# --- the estimator drop-in: the documented samples, only the import changed ---------------------------

def _compare_with_cli(tmp_path: Path, est: Any, run: Any) -> None:
    """command_line() is the same run: the CLI's --dry-run=json plans the same tasks."""
    words = shlex.split(est.command_line())
    assert words[0] == "tfrun"
    assert est.to_overrides() == words[1:]
    dry = run_tfrun(tmp_path, "--dry-run=json", *words[1:], timeout=120)
    assert dry.returncode == 0, dry.stderr
    cli_plan = json.loads(dry.stdout)
    submitted = json.loads((run.run.dir / "plan.json").read_text())

    def tasks(plan: dict[str, Any]) -> Any:
        text = json.dumps(plan["tasks"]).replace(plan["run_dir"], "RUN_DIR").replace(plan["run_id"], "RUN_ID")
        return json.loads(text)

    assert tasks(cli_plan) == tasks(submitted)
    assert cli_plan["backend"] == submitted["backend"] and cli_plan["script"] == submitted["script"]
    # The API follows a Slurm job itself (Run.wait), so it submits with compute.wait=false.
    assert {k: v for k, v in cli_plan["config"]["compute"].items() if k != "wait"} == \
        {k: v for k, v in submitted["config"]["compute"].items() if k != "wait"}


@pytest.mark.slurm
@pytest.mark.slow
def test_estimator_single_node_with_script_params(scratch: Path, leftovers_cancelled: None,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    ws, compute_target, project_folder = None, "slurm", str(EXAMPLES / "digits")
    # ---- the sample ----
    from tfrun.estimator import TensorFlow, Experiment

    script_params = {
        '--epochs': 3,
        '--lr': 0.01,
    }
    tf_est = TensorFlow(source_directory=project_folder,
                        script_params=script_params,
                        compute_target=compute_target,
                        entry_script='train.py',
                        use_gpu=True)
    run = Experiment(ws, 'digits').submit(tf_est)
    run.wait_for_completion(show_output=True)
    # ---- checks ----
    shown = capsys.readouterr().out
    assert run.get_status() == "Completed", run.run.logs(0)[-3000:]
    assert "Epoch 3/3" in shown and "val_accuracy=" in shown
    metrics = run.get_metrics()
    assert len(metrics["loss"]) == 3 and len(metrics["val_accuracy"]) == 3, metrics
    assert "trainer.epochs=3" in tf_est.command_line() and "trainer.lr=0.01" in tf_est.command_line()
    _compare_with_cli(scratch, tf_est, run)


@pytest.mark.slurm
@pytest.mark.slow
def test_estimator_horovod(scratch: Path, leftovers_cancelled: None, capsys: pytest.CaptureFixture[str]) -> None:
    ws, compute_target, project_folder = None, "slurm", str(EXAMPLES / "horovod_keras")
    script_params = {'--epochs': 2}
    # ---- the sample ----
    from tfrun.estimator import TensorFlow, Experiment

    estimator = TensorFlow(source_directory=project_folder,
                           compute_target=compute_target,
                           script_params=script_params,
                           entry_script='train.py',
                           node_count=2,
                           process_count_per_node=1,
                           distributed_backend='mpi',
                           use_gpu=True)
    run = Experiment(ws, 'horovod').submit(estimator)
    run.wait_for_completion(show_output=True)
    # ---- checks ----
    shown = capsys.readouterr().out
    assert run.get_status() == "Completed", run.run.logs(0)[-3000:] + run.run.logs(1)[-3000:]
    assert "rank 0 of 2" in shown
    assert "rank 1 of 2" in run.run.logs(1)
    assert len(run.get_metrics()["loss"]) == 2
    info = run.run.info()
    assert info["backend"] == "horovod" and info["nodes"] == "node[1-2]", info
    _compare_with_cli(scratch, estimator, run)


@pytest.mark.slurm
@pytest.mark.slow
def test_estimator_parameter_server(scratch: Path, leftovers_cancelled: None, capsys: pytest.CaptureFixture[str]) -> None:
    ws, compute_target, project_folder = None, "slurm", str(EXAMPLES / "ps_keras")
    script_params = {'--epochs': 2, '--steps_per_epoch': 10}
    # ---- the sample ----
    from tfrun.estimator import TensorFlow, Experiment

    tf_est = TensorFlow(source_directory=project_folder,
                        compute_target=compute_target,
                        script_params=script_params,
                        entry_script='train.py',
                        node_count=2,
                        worker_count=2,
                        parameter_server_count=1,
                        distributed_backend='ps',
                        use_gpu=True)
    run = Experiment(ws, 'ps').submit(tf_est)
    run.wait_for_completion(show_output=True)
    # ---- checks ----
    shown = capsys.readouterr().out
    assert run.get_status() == "Completed", run.run.logs(0)[-3000:]
    assert "chief: loss" in shown
    plan = json.loads((run.run.dir / "plan.json").read_text())
    assert sorted(t["role"] for t in plan["tasks"]) == ["chief", "ps", "worker", "worker"], plan["tasks"]
    assert len(run.get_metrics()["loss"]) == 2
    _compare_with_cli(scratch, tf_est, run)


@pytest.mark.slurm
@pytest.mark.slow
def test_estimator_keras_with_pip_packages(scratch: Path, leftovers_cancelled: None, capsys: pytest.CaptureFixture[str]) -> None:
    ws, compute_target, script_folder = None, "slurm", str(EXAMPLES / "digits")
    script_params = {'--epochs': 2, '--batch_size': 50}
    # ---- the sample ----
    from tfrun.estimator import TensorFlow, Experiment

    est = TensorFlow(source_directory=script_folder,
                     script_params=script_params,
                     compute_target=compute_target,
                     pip_packages=['keras'],
                     entry_script='train.py',
                     use_gpu=True)
    run = Experiment(ws, 'keras').submit(est)
    run.wait_for_completion(show_output=True)
    # ---- checks ----
    shown = capsys.readouterr().out
    assert run.get_status() == "Completed", run.run.logs(0)[-3000:]
    assert "Epoch 2/2" in shown
    assert len(run.get_metrics()["loss"]) == 2
    plan = json.loads((run.run.dir / "plan.json").read_text())
    assert plan["deps"]["kind"] == "pip" and "/envs/pip-" in plan["deps"]["python"], plan["deps"]
    _compare_with_cli(scratch, est, run)


def test_estimator_rejects_what_has_no_meaning_on_a_cluster(scratch: Path) -> None:
    from tfrun.estimator import TensorFlow

    with pytest.raises(tfrun.ConfigError) as error:
        TensorFlow(source_directory=str(EXAMPLES / "digits"), entry_script="train.py", compute_target="slurm",
                   vm_size="STANDARD_NC6")
    assert "vm_size" in str(error.value) and "compute.partition" in str(error.value)
    with pytest.raises(tfrun.ConfigError) as error:
        TensorFlow(source_directory=".", entry_script="train.py", distributed_backend="gloo")
    assert "distributed_backend" in str(error.value)
    assert not (scratch / "runs").exists()
