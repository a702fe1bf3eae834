"""The Python API (``tfrun.launch``, ``tfrun.sweep``, ``tfrun.Run``) and the drop-in for the
cloud SDK v1 ``TensorFlow`` estimator (issue 8), run in this process as a notebook would.

The estimator tests are that SDK's documented code samples with only the import line
changed, submitted to the local Slurm against the bundled examples; and the estimator's
values (commas, ``=``, quotes, ``"true"``, dicts) composed by tfrun itself, which runs nothing.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

import tfrun
from tests.helpers import (
    DIGITS,
    REPO,
    alive,
    popen_tfrun,
    run_tfrun,
    stop,
    wait_for,
    wait_gone,
)
from tfrun.plan import Plan

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


def _launch_in_a_thread(overrides: list[str], timeout: float = 60) -> Any:
    """tfrun.launch(wait=False) from a thread: what it returned or raised, or a failed test if
    it has not come back within ``timeout``."""
    outcome: list[Any] = []

    def launch() -> None:
        try:
            outcome.append(tfrun.launch(overrides, wait=False))
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=launch, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"launch(wait=False) has not come back after {timeout} s"
    return outcome[0]


def test_launch_without_waiting_raises_when_the_launch_fails_before_the_run_has_a_status(
    scratch: Path, quick: Path, no_exit: None
) -> None:
    run_dir = scratch / "runs" / "fixed"
    run_dir.mkdir(parents=True)
    (run_dir / "logs").write_text("a file where the run's logs dir goes")  # the launch cannot make it
    raised = _launch_in_a_thread(["entry.script=quick.py", f"hydra.run.dir={run_dir}"])
    assert isinstance(raised, FileExistsError), raised
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "FAILED" and "the launch failed: FileExistsError" in status["reason"], status
    assert tfrun.Run(run_dir).wait(timeout_s=10, poll_s=0.2) == "FAILED"


def test_launch_without_waiting_raises_and_wait_returns_when_a_task_cannot_start(
    scratch: Path, quick: Path, no_exit: None
) -> None:
    """The run is RUNNING by then (its status written): it must not stay so with nobody to end it.
    Its interpreter is there when the run is planned (tfrun checks that it runs) and gone when
    the task starts, as a removed venv's would be."""
    vanishing = scratch / "vanishing-python"
    vanishing.write_text(f'#!/bin/sh\nrm -f "$0"\nexec {sys.executable} "$@"\n')
    vanishing.chmod(0o755)
    raised = _launch_in_a_thread(["entry.script=quick.py", f"entry.python={vanishing}"])
    assert isinstance(raised, FileNotFoundError) and str(vanishing) in str(raised), raised
    run = tfrun.Run.load(next((scratch / "runs").iterdir()).name)
    started = time.monotonic()
    assert run.wait(timeout_s=30, poll_s=0.2) == "FAILED"
    assert time.monotonic() - started < 10
    assert "the launch failed: FileNotFoundError" in run.info()["reason"]


def test_wait_returns_lost_when_the_runs_launcher_died(scratch: Path, quick: Path) -> None:
    """A local run whose launcher was killed (SIGKILL: it recorded no end) will not end by
    itself: Run.wait() says LOST instead of waiting for ever."""
    proc, _, err = popen_tfrun(scratch, "entry.script=quick.py", "trainer.sleep=300")
    pid = None
    try:
        wait_for(lambda: any((scratch / "runs").glob("*/outputs/pid")) or proc.poll() is not None, 60, "the task")
        run_dir = next((scratch / "runs").glob("*/outputs/pid")).parents[1]
        pid = int((run_dir / "outputs/pid").read_text())
        proc.kill()
        proc.wait()
        run = tfrun.Run(run_dir)
        started = time.monotonic()
        assert run.wait(timeout_s=30, poll_s=0.2) == "LOST", err.read_text()
        assert time.monotonic() - started < 10 and run.status() == "LOST"
    finally:
        stop(proc)
        if pid is not None and alive(pid):
            os.kill(pid, signal.SIGKILL)  # the task, in a session of its own, outlives its launcher


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


@pytest.mark.parametrize(
    "override, named",
    [
        ("compute.nodes=abc", "compute.nodes"),
        ("compute=nope", "compute=nope"),
        ("nokey=1", "nokey"),
        ("compute.nodes=0", "compute.nodes"),
        ("entry.script=missing.py", "entry.script"),
        ("trainer.lr={a: 1}", "trainer.lr"),  # a mapping: not a value a script can be given
    ],
)
def test_bad_override_raises_config_error_and_creates_nothing(
    scratch: Path, no_exit: None, override: str, named: str
) -> None:
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
        return subprocess.run(
            ["sacct", "-j", job, "-X", "-n", "-o", "JobName%40,State"], capture_output=True, text=True, timeout=60
        ).stdout.split()

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
    assert {k: v for k, v in cli_plan["config"]["compute"].items() if k != "wait"} == {
        k: v for k, v in submitted["config"]["compute"].items() if k != "wait"
    }


@pytest.mark.slurm
@pytest.mark.slow
def test_estimator_single_node_with_script_params(
    scratch: Path, leftovers_cancelled: None, capsys: pytest.CaptureFixture[str]
) -> None:
    ws, compute_target, project_folder = None, "slurm", str(EXAMPLES / "digits")
    # ---- the sample ----
    from tfrun.estimator import Experiment, TensorFlow

    script_params = {
        "--epochs": 3,
        "--lr": 0.01,
    }
    tf_est = TensorFlow(
        source_directory=project_folder,
        script_params=script_params,
        compute_target=compute_target,
        entry_script="train.py",
        use_gpu=True,
    )
    run = Experiment(ws, "digits").submit(tf_est)
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
    script_params = {"--epochs": 2}
    # ---- the sample ----
    from tfrun.estimator import Experiment, TensorFlow

    estimator = TensorFlow(
        source_directory=project_folder,
        compute_target=compute_target,
        script_params=script_params,
        entry_script="train.py",
        node_count=2,
        process_count_per_node=1,
        distributed_backend="mpi",
        use_gpu=True,
    )
    run = Experiment(ws, "horovod").submit(estimator)
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
def test_estimator_parameter_server(
    scratch: Path, leftovers_cancelled: None, capsys: pytest.CaptureFixture[str]
) -> None:
    ws, compute_target, project_folder = None, "slurm", str(EXAMPLES / "ps_keras")
    script_params = {"--epochs": 2, "--steps_per_epoch": 10}
    # ---- the sample ----
    from tfrun.estimator import Experiment, TensorFlow

    tf_est = TensorFlow(
        source_directory=project_folder,
        compute_target=compute_target,
        script_params=script_params,
        entry_script="train.py",
        node_count=2,
        worker_count=2,
        parameter_server_count=1,
        distributed_backend="ps",
        use_gpu=True,
    )
    run = Experiment(ws, "ps").submit(tf_est)
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
def test_estimator_keras_with_pip_packages(
    scratch: Path, leftovers_cancelled: None, capsys: pytest.CaptureFixture[str]
) -> None:
    ws, compute_target, script_folder = None, "slurm", str(EXAMPLES / "digits")
    script_params = {"--epochs": 2, "--batch_size": 50}
    # ---- the sample ----
    from tfrun.estimator import Experiment, TensorFlow

    est = TensorFlow(
        source_directory=script_folder,
        script_params=script_params,
        compute_target=compute_target,
        pip_packages=["keras"],
        entry_script="train.py",
        use_gpu=True,
    )
    run = Experiment(ws, "keras").submit(est)
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
        TensorFlow(
            source_directory=str(EXAMPLES / "digits"),
            entry_script="train.py",
            compute_target="slurm",
            vm_size="STANDARD_NC6",
        )
    assert "vm_size" in str(error.value) and "compute.partition" in str(error.value)
    with pytest.raises(tfrun.ConfigError) as error:
        TensorFlow(source_directory=".", entry_script="train.py", distributed_backend="gloo")
    assert "distributed_backend" in str(error.value)
    assert not (scratch / "runs").exists()


# --- the estimator's values, composed by tfrun itself (nothing runs) --------------------------------


def estimator_plan(overrides: list[str]) -> Plan:
    """The plan ``tfrun.launch(overrides)`` would run, composed and planned the way it does."""
    from tfrun.config.compose import normalize_overrides
    from tfrun.plan.planner import compose_plans

    plans = compose_plans(normalize_overrides(overrides))
    assert len(plans) == 1
    return plans[0]


# Values Hydra's override grammar reads as something else unless they are quoted and escaped.
AWKWARD_TEXT = {
    "WITH_COMMA": "a,b,c",
    "WITH_EQUALS": "key=value",
    "TRUE_AS_TEXT": "true",
    "NUMBER_AS_TEXT": "1e3",
    "NULL_AS_TEXT": "null",
    "EMPTY": "",
    "BOTH_QUOTES": 'it\'s "quoted"',
    "ESCAPED_QUOTE": "a\\'b\\\"c",
    "TRAILING_BACKSLASH": "C:\\dir\\",
    "LOOKS_INTERPOLATED": "${HOME} and \\${x}",
    "CONTAINERS": "[1,2] {a: b}",
    "BLANKS": "  two  blanks ",
}


def test_estimator_environment_variables_reach_every_task_as_given(scratch: Path) -> None:
    from tfrun.estimator import TensorFlow

    est = TensorFlow(
        source_directory=str(EXAMPLES / "digits"),
        entry_script="train.py",
        node_count=2,
        environment_variables=AWKWARD_TEXT,
    )
    plan = estimator_plan(est.to_overrides())
    assert plan.config["deps"]["env"] == AWKWARD_TEXT
    for task in plan.tasks:
        assert {k: task.env[k] for k in AWKWARD_TEXT} == AWKWARD_TEXT
    assert shlex.split(est.command_line())[1:] == est.to_overrides()


def test_estimator_script_params_keep_their_values_and_types(scratch: Path) -> None:
    from tfrun.estimator import TensorFlow

    params = {
        "--names": "a,b",
        "--opt": "key=value",
        "--flag": "true",
        "--scale": "1e3",
        "--lr": 0.01,
        "--small": 1e-05,
        "--epochs": 3,
        "--verbose": True,
        "--layers": [64, 32],
        "--resume": None,
        "-m": 'it\'s "x", y=1',
    }
    est = TensorFlow(source_directory=str(EXAMPLES / "digits"), entry_script="train.py", script_params=params)
    plan = estimator_plan(est.to_overrides())
    trainer = plan.config["trainer"]
    wanted = {k[2:]: v for k, v in params.items() if k.startswith("--")}
    assert trainer == wanted
    assert {k: type(v) for k, v in trainer.items()} == {k: type(v) for k, v in wanted.items()}
    assert plan.config["entry"]["args"] == ["-m", 'it\'s "x", y=1']
    argv = plan.tasks[0].argv
    for flag, value in [("--names", "a,b"), ("--opt", "key=value"), ("--flag", "true"), ("--scale", "1e3")]:
        assert argv[argv.index(flag) + 1] == value, argv
    assert argv[-2:] == ["-m", 'it\'s "x", y=1']


def test_estimator_compute_object_with_a_dict_field(scratch: Path) -> None:
    from tfrun.config.schema import SlurmComputeConfig
    from tfrun.estimator import TensorFlow

    extra = {"mail-type": "END,FAIL", "comment": "k=v, 'single' \"double\"", "mail-user": "me@example.org"}
    setup = ["module load cuda/12.4", "export LIST=a,b"]
    as_dict = {"option": "slurm", "partition": "gpu", "additional_parameters": extra, "setup": setup}
    as_dataclass = SlurmComputeConfig(partition="gpu", additional_parameters=extra, setup=setup)
    for target in (as_dict, as_dataclass):
        est = TensorFlow(source_directory=str(EXAMPLES / "digits"), entry_script="train.py", compute_target=target)
        compute = estimator_plan(est.to_overrides()).config["compute"]
        assert compute["target"] == "slurm" and compute["partition"] == "gpu"
        assert compute["additional_parameters"] == extra and compute["setup"] == setup


def test_estimator_paths_name_and_tags_as_given(scratch: Path) -> None:
    from tfrun.estimator import Experiment, TensorFlow

    source = scratch / "data,v=1 'x'"
    source.mkdir()
    (source / "train.py").write_text("print('hi')\n")
    tags = {"team": "vision", "note": "lr=0.01, batch 32", "mlflow.note.content": 'it\'s "the" baseline', "count": "3"}
    est = TensorFlow(source_directory=str(source), entry_script="train.py")
    plan = estimator_plan(Experiment(None, "digits, v2 = true").to_overrides(est, tags=tags))
    assert plan.source_dir == str(source) and plan.script == str(source / "train.py")
    assert plan.config["tfrun"]["name"] == "digits, v2 = true"
    assert plan.config["tfrun"]["tags"] == tags


def test_estimator_refuses_names_hydra_cannot_write(scratch: Path) -> None:
    from tfrun.estimator import TensorFlow

    with pytest.raises(tfrun.ConfigError) as error:
        TensorFlow(source_directory=".", entry_script="train.py", environment_variables={"A.B": "x"}).to_overrides()
    assert "environment_variables" in str(error.value) and "A.B" in str(error.value)
    with pytest.raises(tfrun.ConfigError) as error:
        TensorFlow(
            source_directory=".",
            entry_script="train.py",
            compute_target={"option": "slurm", "additional_parameters": {"it's": "x"}},
        ).to_overrides()
    assert "compute.additional_parameters" in str(error.value) and "it's" in str(error.value)


def test_estimator_framework_version_compares_release_numbers(scratch: Path) -> None:
    from importlib.metadata import version

    from tfrun.estimator import TensorFlow

    installed = version("tensorflow")
    major_minor = ".".join(installed.split(".")[:2])
    assert major_minor == "2.21", installed  # the version pyproject.toml pins
    for matching in (major_minor, installed, "2"):
        TensorFlow(source_directory=".", entry_script="train.py", framework_version=matching)
    for other in ("2.2", "2.1", "2.210", "3"):
        with pytest.raises(tfrun.ConfigError) as error:
            TensorFlow(source_directory=".", entry_script="train.py", framework_version=other)
        message = str(error.value)
        assert "framework_version" in message and repr(other) in message and installed in message, message
        assert major_minor in message
    with pytest.raises(tfrun.ConfigError) as error:
        TensorFlow(source_directory=".", entry_script="train.py", framework_version="latest")
    assert "framework_version" in str(error.value) and "'latest'" in str(error.value)


def test_framework_matches_part_by_part() -> None:
    from tfrun.estimator import framework_matches

    assert framework_matches("2.2", "2.2.3") and framework_matches("2.21", "2.21.0rc1")
    assert framework_matches("2.21.0", "2.21.0") and framework_matches("2", "2.21.0")
    assert not framework_matches("2.2", "2.21.0") and not framework_matches("2.21.1", "2.21.0")
    assert not framework_matches("2.21", "2.2.1")


def test_experiment_submit_keeps_tags(scratch: Path, quick: Path, no_exit: None) -> None:
    """The tags are the run's: in its config and plan, from the run object, and on its MLflow run."""
    from tfrun.estimator import Experiment, TensorFlow

    (scratch / "conf" / "project").mkdir(parents=True)
    (scratch / "conf" / "project" / "default.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /tracking: mlflow\n"
    )
    tags = {"team": "vision", "note": "lr=0.01, batch 32", "mlflow.note.content": 'it\'s "the" baseline'}
    est = TensorFlow(source_directory=str(scratch), entry_script="quick.py")
    run = Experiment(None, "tagged").submit(est, tags=tags)
    assert run.wait_for_completion()["status"] == "Completed", run.run.logs(0)
    assert run.get_tags() == tags and run.get_details()["tags"] == tags
    assert json.loads((run.run.dir / "plan.json").read_text())["config"]["tfrun"]["tags"] == tags
    # The MLflow sync follows the run's end in the process that launched it.
    wait_for(lambda: "mlflow_run_id" in run.run.info(), 120, "the run to be logged to MLflow")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{scratch / 'runs' / 'mlflow.db'}")
    logged = client.get_run(run.run.info()["mlflow_run_id"]).data.tags
    assert {k: logged.get(k) for k in tags} == tags


def test_local_sweep_from_python_is_logged_to_mlflow(scratch: Path, quick: Path, no_exit: None) -> None:
    """As from the command line: every point an MLflow run under the sweep's, which ends FINISHED."""
    runs = tfrun.sweep(["entry.script=quick.py", "tracking=mlflow", "trainer.sleep=0,0.1"])
    assert [r.status() for r in runs] == ["COMPLETED", "COMPLETED"]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{scratch / 'runs' / 'mlflow.db'}")
    logged = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    parents = [r for r in logged if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in logged if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", [r.info for r in logged]
    assert sorted(r.data.params["trainer.sleep"] for r in children) == ["0", "0.1"]
    assert {r.info.run_id for r in children} == {r.info()["mlflow_run_id"] for r in runs}


def test_estimator_local_run_shows_each_line_once(
    scratch: Path, quick: Path, no_exit: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """wait_for_completion(show_output=True) of a local run this process started: its output,
    streamed as it ran, is not shown a second time from its log."""
    from tfrun.estimator import Experiment, TensorFlow

    estimator = TensorFlow(
        source_directory=str(scratch), entry_script="quick.py", compute_target="local", script_params={"--sleep": 0}
    )
    run = Experiment(None, "once").submit(estimator)
    run.wait_for_completion(show_output=True)
    shown = capsys.readouterr().out
    assert run.get_status() == "Completed", run.run.logs(0)
    assert shown.count("quick script done") == 1, shown


def test_estimator_command_line_names_one_compute_option() -> None:
    """use_gpu on Slurm is the slurm_gpu option itself, not a second compute option after slurm."""
    from tfrun.estimator import TensorFlow

    line = TensorFlow(
        source_directory=".", entry_script="train.py", compute_target="slurm", use_gpu=True
    ).command_line()
    assert re.findall(r"\bcompute=\S+", line) == ["compute=slurm_gpu"], line
    local = TensorFlow(
        source_directory=".", entry_script="train.py", compute_target="local", use_gpu=True
    ).command_line()
    assert re.findall(r"\bcompute=\S+", local) == ["compute=local"] and "compute.gpus_per_node=1" in local, local
