"""The verbs that act on runs (``tfrun runs|status|logs|cancel|...``) as a new user meets them:
which run is "the latest", what a run list shows, a rank or a path that is not there, and never
a traceback (bad input, a closed pipe, Ctrl-C, an optional extra that is not installed)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import (
    popen_tfrun,
    read_json,
    run_dir_from,
    run_tfrun,
    scratch_env,
    stop,
    text_of,
    tfrun_command,
    wait_for,
    wait_gone,
    without,
)

# A script that records one metric, as a Keras fit would, in a fraction of a second.
TINY = """import sys
import tfrun
tfrun.log_metric("loss", 1.0 / len(sys.argv), step=0)
print("tiny", sys.argv[1:])
"""


def tiny_run(tmp_path: Path, *overrides: str) -> Path:
    """A completed local run of the tiny script; its run dir."""
    (tmp_path / "tiny.py").write_text(TINY)
    result = run_tfrun(tmp_path, "entry.script=tiny.py", *overrides)
    assert result.returncode == 0, result.stderr
    return run_dir_from(result.stderr)


def tiny_sweep(tmp_path: Path, *overrides: str) -> Path:
    """A completed local sweep of the tiny script over two points; its sweep dir."""
    (tmp_path / "tiny.py").write_text(TINY)
    result = run_tfrun(tmp_path, "-m", "entry.script=tiny.py", "trainer.a=1,2", *overrides)
    assert result.returncode == 0, result.stderr
    return run_dir_from(result.stderr).parent


def listed(tmp_path: Path, *args: str) -> list[str]:
    """The run ids ``tfrun runs`` lists, in its order."""
    result = run_tfrun(tmp_path, "runs", *args)
    assert result.returncode == 0, result.stderr
    return [line.split()[0] for line in result.stdout.splitlines()[1:]]


# --- which run is the latest ------------------------------------------------------------------


def test_runs_are_listed_and_found_in_the_order_they_were_launched(tmp_path: Path) -> None:
    """A sweep's points are listed where the sweep was launched, not after every single run
    (names sort a sweep last); the latest run is the one launched last, whatever verb wrote
    into an older one since (``tfrun plot`` writes its PNG into the run dir)."""
    first = tiny_run(tmp_path, "tfrun.name=first")
    time.sleep(1.1)
    sweep = tiny_sweep(tmp_path)
    time.sleep(1.1)
    last = tiny_run(tmp_path)

    order = listed(tmp_path)
    assert order == [first.name, f"{sweep.name}/0", f"{sweep.name}/1", last.name], order
    assert listed(tmp_path, "--last", "2") == [f"{sweep.name}/1", last.name]
    table = run_tfrun(tmp_path, "runs").stdout
    assert re.search(rf"^{first.name}\s+first\s+COMPLETED", table, re.M), table  # tfrun.name is shown

    plotted = run_tfrun(tmp_path, "plot", str(first), "--metric", "loss")
    assert plotted.returncode == 0, plotted.stderr
    status = run_tfrun(tmp_path, "status")
    assert status.stdout.startswith(f"run {last.name}: COMPLETED"), status.stdout

    newest = tiny_sweep(tmp_path)  # a sweep is the latest once it is launched last
    status = run_tfrun(tmp_path, "status")
    assert status.stdout.startswith(f"sweep {newest}: 2 run(s)"), status.stdout


def test_no_runs_says_where_it_looked(tmp_path: Path) -> None:
    result = run_tfrun(tmp_path, "runs")
    assert result.returncode == 0 and result.stdout == ""
    assert result.stderr.startswith(f"tfrun: no runs under {tmp_path / 'runs'}"), result.stderr


# --- logs ------------------------------------------------------------------------------------


def test_logs_of_a_rank_the_run_does_not_have_is_refused(tmp_path: Path) -> None:
    run = tiny_run(tmp_path)
    result = run_tfrun(tmp_path, "logs", "--rank", "5")
    assert result.returncode == 2, result
    assert result.stderr == f"tfrun: error: --rank 5: run {run.name} has 1 task (rank 0)\n"
    assert run_tfrun(tmp_path, "logs", "--rank", "0").stdout.rstrip().endswith("tiny []")


def test_logs_of_a_sweep_says_which_point_it_shows(tmp_path: Path) -> None:
    sweep = tiny_sweep(tmp_path)
    result = run_tfrun(tmp_path, "logs", sweep.name)
    assert result.returncode == 0, result.stderr
    assert "tiny ['--a', '1']" in result.stdout and "'2'" not in result.stdout
    assert f"{sweep} is a sweep of 2 run(s): the log of its first point, {sweep / '0'}" in result.stderr
    assert "tiny ['--a', '2']" in run_tfrun(tmp_path, "logs", f"{sweep.name}/1").stdout


# --- never a traceback: bad input, a closed pipe, Ctrl-C, a missing extra --------------------


def tiny_onnx(path: Path) -> None:
    """A one-node ONNX model (y = x, x: float32 [N, 4]) where a run's export would put it."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "tiny", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project dir with a completed run (its model in outputs/) and a completed sweep."""
    where = tmp_path_factory.mktemp("verbs")
    tiny_run(where, "tfrun.name=plain")
    tiny_onnx(tiny_run(where, "tfrun.name=served") / "outputs" / "model.onnx")
    tiny_sweep(where)
    return where


def named(project: Path, name: str) -> Path:
    """The project's run of that ``tfrun.name``."""
    return next(p.parent for p in (project / "runs").glob("*/plan.json") if f'"name": "{name}"' in p.read_text())


# verb -> the arguments it is tried with on the project's latest run (the sweep) or its first run.
USES = {
    "status": ["status"],
    "watch": ["watch"],
    "logs": ["logs"],
    "cancel": ["cancel"],
    "runs": ["runs"],
    "resume": ["resume", "PLAIN"],
    "plot": ["plot", "--metric", "loss", "-o", "OUT/curves.png"],
    "tensorboard": ["tensorboard", "--print-command"],
    "export": ["export", "PLAIN"],
    "serve": ["serve", "SERVED", "--port", "0"],
    "sync": ["sync"],
    "env": ["env", "list", "--cache-dir", "OUT/envs"],
    "tune": ["tune", "resume", "nope"],
}
# verb -> (a package of an optional extra it needs, the extra)
EXTRAS = {
    "plot": ("matplotlib", "tracking"),
    "serve": ("onnxruntime", "onnx"),
    "sync": ("mlflow", "tracking"),
    "export": ("tf2onnx", "onnx"),
    "tensorboard": ("tensorboard", "tensorboard"),
}


def _args(verb: str, project: Path, out: Path) -> list[str]:
    return [
        a.replace("PLAIN", str(named(project, "plain")))
        .replace("SERVED", str(named(project, "served")))
        .replace("OUT", str(out))
        for a in USES[verb]
    ]


def no_traceback(result: subprocess.CompletedProcess[str] | tuple[int, str], what: str) -> None:
    output = result[1] if isinstance(result, tuple) else result.stdout + result.stderr
    assert "Traceback" not in output and "Error:" not in output.replace("tfrun: error:", ""), f"{what}:\n{output}"


def test_the_table_has_every_verb() -> None:
    from tfrun.cli.verbs import BY_NAME

    assert set(USES) == set(BY_NAME)


@pytest.mark.parametrize("verb", list(USES))
def test_a_verb_given_what_is_not_there_says_so(project: Path, verb: str, tmp_path: Path) -> None:
    """A run that does not exist, and an argument the verb does not take: exit 2, one line."""
    for args in (
        [verb, *(["resume"] if verb == "tune" else ["list"] if verb == "env" else []), "no-such-run"],
        [verb, "--no-such-option"],
    ):
        if verb == "env" and args[-1] == "no-such-run":
            args = ["env", "no-such-action"]
        result = run_tfrun(project, *args, timeout=120)
        no_traceback(result, " ".join(args))
        assert result.returncode == 2, (args, result.stderr)
        assert result.stdout == "" and result.stderr.strip(), args


@pytest.mark.parametrize("verb", list(USES))
def test_a_verb_whose_reader_is_gone_ends_quietly(project: Path, verb: str, tmp_path: Path) -> None:
    """``tfrun VERB | head -0``: stdout's reader closed before the verb wrote anything."""
    if verb == "serve":  # it serves until stopped: its Ctrl-C below
        return
    args = _args(verb, project, tmp_path)
    proc = subprocess.Popen(
        [*tfrun_command(), *args],
        cwd=project,
        env=scratch_env(project),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.close()
    err = proc.communicate(timeout=300)[1]
    no_traceback((proc.returncode, err), " ".join(args))
    assert proc.returncode in (0, 1, 2), (args, err)


def _interrupted(project: Path, args: list[str], ready: str, tmp_path: Path) -> tuple[int, str]:
    """Run ``tfrun ARGS``, press Ctrl-C (SIGINT to its process group) once ``ready`` shows in its
    output; its exit code and output."""
    log = tmp_path / "out.txt"
    with open(log, "w") as out:
        # SIGINT as in a terminal: a test runner started in the background has it ignored, and
        # its children would inherit that.
        proc = subprocess.Popen(
            [*tfrun_command(), *args],
            cwd=project,
            env=scratch_env(project),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        wait_for(lambda: ready in text_of(log) or proc.poll() is not None, 120, f"{ready!r} from {args}")
        assert proc.poll() is None, text_of(log)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        stop(proc)
    return proc.returncode, text_of(log)


@pytest.mark.parametrize(
    "verb, args, ready",
    [
        ("serve", ["serve", "SERVED", "--port", "0"], "Ctrl-C stops"),
        ("tensorboard", ["tensorboard", "--port", "0"], "TensorBoard over"),
        ("watch", ["watch", "LIVE"], "RUNNING"),
        ("logs", ["logs", "LIVE", "-f"], "sleeping"),
    ],
)
def test_ctrl_c_stops_a_verb_that_runs_on(
    project: Path, verb: str, args: list[str], ready: str, tmp_path: Path
) -> None:
    live, live_dir = None, None
    try:
        if "LIVE" in args:  # a run that trains on while it is watched: this test's own, not an
            # earlier test's in the same project (ended, its log saying the same)
            (project / "sleepy.py").write_text("import time\nprint('sleeping', flush=True)\ntime.sleep(120)\n")
            earlier = set((project / "runs").glob("*"))
            live, _, _ = popen_tfrun(project, "entry.script=sleepy.py", name=f"live-{verb}")
            wait_for(lambda: _sleeping(project, earlier), 120, "the live run to start")
            live_dir = _sleeping(project, earlier)
            assert live_dir is not None and read_json(live_dir / "status.json")["state"] == "RUNNING"
        given = [a.replace("SERVED", str(named(project, "served"))).replace("LIVE", str(live_dir)) for a in args]
        code, output = _interrupted(project, given, ready, tmp_path)
        no_traceback((code, output), " ".join(given))
        assert code in (0, 130), output
    finally:
        if live is not None:
            if live_dir is not None:
                run_tfrun(project, "cancel", str(live_dir))
            stop(live)


def _sleeping(project: Path, earlier: set[Path]) -> Path | None:
    """The run dir, not among ``earlier``, whose script says it is sleeping."""
    return next(
        (
            log.parents[1]
            for log in (project / "runs").glob("*/logs/rank0.log")
            if log.parents[1] not in earlier and "sleeping" in text_of(log)
        ),
        None,
    )


def test_tensorboard_ends_with_tfrun_even_when_tfrun_is_killed(project: Path, tmp_path: Path) -> None:
    """SIGKILL skips tfrun's own clean-up: its TensorBoard and converter end all the same (a
    TensorBoard left behind kept its port, and the next ``tfrun tensorboard`` could not bind it)."""
    import psutil

    log = tmp_path / "out.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*tfrun_command(), "tensorboard", "--port", "0"],
            cwd=project,
            env=scratch_env(project),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(lambda: "TensorBoard over" in text_of(log) or proc.poll() is not None, 120, "tfrun tensorboard")
        children = [c.pid for c in psutil.Process(proc.pid).children()]
        assert len(children) == 2, text_of(log)  # TensorBoard and the converter
        proc.kill()
        proc.wait()
        assert wait_gone(children, timeout=20) == [], "TensorBoard outlived tfrun"
    finally:
        stop(proc)


@pytest.mark.parametrize("verb", list(EXTRAS))
def test_a_verb_without_its_optional_extra_says_what_to_install(project: Path, verb: str, tmp_path: Path) -> None:
    module, extra = EXTRAS[verb]
    args = _args(verb, project, tmp_path)
    result = run_tfrun(project, *args, timeout=120, **without(tmp_path, module))
    no_traceback(result, " ".join(args))
    assert result.returncode == 2, result.stderr
    install = "pip install tensorboard" if extra == "tensorboard" else f"pip install 'tfrun[{extra}]'"
    assert result.stderr == f"tfrun: error: tfrun {verb} needs {module}, which is not installed here: {install}\n"


@pytest.mark.parametrize(
    "overrides, module, what",
    [
        (
            ["-m", "hydra/sweeper=tfrun", "tfrun.objective=loss", "trainer.lr=interval(0.1,1)"],
            "optuna",
            "hydra/sweeper=tfrun",
        ),
        (["tracking=mlflow"], "mlflow", "tracking=mlflow"),
    ],
    ids=["tuning", "mlflow"],
)
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
def test_a_run_without_its_optional_extra_starts_nothing(
    tmp_path: Path, overrides: list[str], module: str, what: str, dry_run: bool
) -> None:
    (tmp_path / "tiny.py").write_text(TINY)
    args = [*(["--dry-run"] if dry_run else []), "entry.script=tiny.py", *overrides]
    result = run_tfrun(tmp_path, *args, timeout=120, **without(tmp_path, module))
    no_traceback(result, " ".join(args))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(
        f"tfrun: error: {what} needs {module}, which is not installed here: pip install 'tfrun["
    ), result.stderr
    assert not (tmp_path / "runs").exists()


def test_epochs_count_from_one_wherever_they_are_shown(tmp_path: Path) -> None:
    """Keras prints ``Epoch 1/2`` for the first epoch: so do status, watch and plot, while
    metrics.jsonl keeps Keras's own index (0 for the first)."""
    from tfrun.tracking.compare import curves

    (tmp_path / "two.py").write_text(
        "from tfrun.tracking.metrics import log_epoch\n"
        "for epoch in range(2):\n    log_epoch(epoch, {'loss': 1.0 / (epoch + 1)})\n"
    )
    run = run_dir_from(run_tfrun(tmp_path, "entry.script=two.py", "trainer.epochs=2").stderr)
    assert [r["epoch"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] == [0, 1]
    assert "latest epoch: epoch 2: loss=0.5" in run_tfrun(tmp_path, "status").stdout
    assert "epoch 2/2" in run_tfrun(tmp_path, "watch").stdout
    assert [epochs for _, epochs, _, _ in curves([run], "loss")] == [[1, 2]]


# --- what a verb says --------------------------------------------------------------------------


def test_cancel_of_a_finished_run_says_there_is_nothing_to_cancel(tmp_path: Path) -> None:
    run = tiny_run(tmp_path)
    result = run_tfrun(tmp_path, "cancel")
    assert (result.returncode, result.stdout) == (0, "")
    assert result.stderr == f"tfrun: run {run.name} is COMPLETED: nothing to cancel\n"
    sweep = tiny_sweep(tmp_path)
    result = run_tfrun(tmp_path, "cancel", sweep.name)
    assert result.stderr == f"tfrun: every run of sweep {sweep.name} has ended: nothing to cancel\n"


def test_serve_of_a_model_file_the_run_does_not_have_names_the_ones_it_has(tmp_path: Path) -> None:
    run = tiny_run(tmp_path)
    tiny_onnx(run / "outputs" / "model.onnx")
    result = run_tfrun(tmp_path, "serve", "--model", "nope.onnx", "--port", "0")
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"tfrun: error: --model 'nope.onnx': no {run}/outputs/nope.onnx; its .onnx files: model.onnx\n"
    )


def test_serve_of_a_registered_model_removes_its_download_when_it_stops(tmp_path: Path) -> None:
    """``tfrun serve models:/NAME/VERSION`` downloads the version's ONNX file; Ctrl-C removes it."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tiny_onnx(tmp_path / "model" / "model.onnx")
    client = mlflow.MlflowClient(uri, uri)
    experiment = client.create_experiment("tiny", artifact_location=str(tmp_path / "artifacts"))
    made = client.create_run(experiment)
    client.log_artifacts(made.info.run_id, str(tmp_path / "model"), "model")
    client.create_registered_model("tiny")
    client.create_model_version("tiny", f"{made.info.artifact_uri}/model", made.info.run_id)
    client.set_terminated(made.info.run_id)

    temp = tmp_path / "temp"
    temp.mkdir()
    log = tmp_path / "serve.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*tfrun_command(), "serve", "models:/tiny/1", "--tracking-uri", uri, "--port", "0"],
            cwd=tmp_path,
            env=scratch_env(tmp_path, TMPDIR=str(temp)),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(lambda: "Ctrl-C stops" in text_of(log) or proc.poll() is not None, 120, "serve to start")
        served = re.search(r"serving (\S+\.onnx)", text_of(log))
        assert served and Path(served.group(1)).is_file() and str(temp) in served.group(1), text_of(log)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0, text_of(log)
    finally:
        stop(proc)
    assert not list(temp.glob("tfrun-model-*")), "the downloaded model was left behind"


def test_a_rank_shows_running_only_while_its_run_runs() -> None:
    from tfrun.cli.cmd_status import rank_state

    started = {"rank": 0, "host": "node1", "pid": 4242}  # a task that has not recorded an end
    assert rank_state(started, "RUNNING") == "running"
    assert rank_state(started, "PREEMPTED") == "not running (the run is PREEMPTED)"
    assert rank_state(started, "PENDING") == "not running (the run is PENDING)"
    assert rank_state(started, "FAILED") == "killed before it finished"
    assert rank_state({**started, "ended": 1.0, "exit_code": 0}, "PREEMPTED") == "exit 0"


HANGS = """import time


def wait_for_data():
    time.sleep(600)


print("waiting", flush=True)
wait_for_data()
"""


def test_a_hung_rank_is_shown_where_its_script_is_stuck(tmp_path: Path) -> None:
    """Not the end of its log, which is the watchdog's dump of every thread (py-spy's of
    tfrun's own idle heartbeat thread last)."""
    (tmp_path / "hangs.py").write_text(HANGS)
    result = run_tfrun(tmp_path, "entry.script=hangs.py", "compute.hang_timeout_s=3", timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    log = run_dir_from(result.stderr) / "logs" / "rank0.log"
    stuck = [
        f"where its script is stuck (the watchdog's stacks in {log}):",
        f'  | File "{tmp_path / "hangs.py"}", line 5 in wait_for_data',
        f'  | File "{tmp_path / "hangs.py"}", line 9 in <module>',
    ]
    lines = result.stderr.splitlines()
    assert lines[lines.index(stuck[0]) :][:3] == stuck, result.stderr[-2000:]
    status = run_tfrun(tmp_path, "status").stdout.splitlines()
    assert [line.strip() for line in status[status.index("  " + stuck[0]) :][:3]] == [s.strip() for s in stuck]
