"""Real local runs through the ``tfrun`` command: real processes, real files, no mocks."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.helpers import (
    DIGITS,
    alive,
    popen_tfrun,
    read_json,
    run_dir_from,
    run_tfrun,
    scratch_env,
    stop,
    text_of,
    wait_for,
    wait_gone,
)

# Epochs of the digits example that reach >= 0.9 validation accuracy in a few seconds.
DIGITS_EPOCHS = 5


def write_script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


# --- (a) the digits example, one task -------------------------------------------------


@pytest.mark.slow
def test_digits_single_task_trains_and_records_the_run(tmp_path: Path) -> None:
    result = run_tfrun(tmp_path, f"trainer.epochs={DIGITS_EPOCHS}", timeout=300)
    assert result.returncode == 0, result.stderr
    run_dir = run_dir_from(result.stderr)
    assert run_dir.parent == tmp_path / "runs"
    assert f"tfrun: outputs {run_dir / 'outputs'}" in result.stderr
    assert "COMPLETED" in result.stderr

    for name in (
        ".hydra/config.yaml",
        ".hydra/overrides.yaml",
        "plan.json",
        "status.json",
        "logs/rank0.log",
        "ranks/0.json",
        "outputs/model.keras",
        "outputs/final_metrics.json",
    ):
        assert (run_dir / name).is_file(), name
    status = read_json(run_dir / "status.json")
    assert status["state"] == "COMPLETED" and status["exit_codes"] == {"0": 0}
    assert status["ended"] >= status["started"]
    record = read_json(run_dir / "ranks/0.json")
    assert record["exit_code"] == 0 and record["error"] is None and record["pid"] > 0
    plan = read_json(run_dir / "plan.json")
    assert plan["tasks"][0]["argv"] == [str(DIGITS), "--epochs", str(DIGITS_EPOCHS)]
    assert "epochs: 5" in (run_dir / ".hydra/config.yaml").read_text()

    metrics = read_json(run_dir / "outputs/final_metrics.json")
    assert metrics["val_accuracy"] >= 0.9, metrics
    log = (run_dir / "logs/rank0.log").read_text()
    assert f"Epoch {DIGITS_EPOCHS}/{DIGITS_EPOCHS}" in log and "val_accuracy=" in log
    assert "val_accuracy=" in result.stdout  # streamed to the terminal too
    assert "[rank0]" not in result.stdout  # one task: no prefixes


# --- (b) two tasks -----------------------------------------------------------------------


@pytest.mark.slow
def test_two_tasks_log_separately_and_prefix_output(tmp_path: Path) -> None:
    result = run_tfrun(tmp_path, "compute.tasks_per_node=2", "trainer.epochs=1", timeout=300)
    assert result.returncode == 0, result.stderr
    run_dir = run_dir_from(result.stderr)
    for rank in (0, 1):
        log = (run_dir / f"logs/rank{rank}.log").read_text()
        assert f"rank {rank}/2" in log and "val_accuracy=" in log
        assert read_json(run_dir / f"ranks/{rank}.json")["exit_code"] == 0
    lines = result.stdout.splitlines()
    assert lines and all(line.startswith(("[rank0] ", "[rank1] ")) for line in lines)
    assert any(line.startswith("[rank1] val_accuracy=") for line in lines)
    assert read_json(run_dir / "status.json")["exit_codes"] == {"0": 0, "1": 0}


LATE_RANK_SCRIPT = """\
import os, time
import numpy as np
import keras
import tfrun

ctx = tfrun.context()
state = os.path.join(ctx.run_dir, "checkpoints", "backup", "state.json")
if ctx.rank == 1:  # start fit only once the chief has backed up an epoch of this very attempt
    deadline = time.time() + 240
    while not os.path.exists(state) and time.time() < deadline:
        time.sleep(0.1)
    print("CHIEF BACKED UP FIRST:", os.path.exists(state), flush=True)
x = np.random.default_rng(0).random((64, 4)).astype("float32")
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
model.compile("sgd", "mse")
for fit in (1, 2):  # a second fit in the same attempt trains too: nothing is resumed from the first
    history = model.fit(x, x.sum(1), epochs=3, verbose=0)
    print(f"FIT {fit} EPOCHS {len(history.history['loss'])}", flush=True)
"""


@pytest.mark.slow
def test_a_rank_that_starts_late_trains_every_epoch(tmp_path: Path) -> None:
    # Only an earlier attempt's backup is resumed from: a rank whose fit starts after its chief
    # backed up an epoch of this attempt must not skip that epoch (nor a script's second fit).
    write_script(tmp_path, "late.py", LATE_RANK_SCRIPT)
    result = run_tfrun(tmp_path, "entry.script=late.py", "compute.tasks_per_node=2", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "[rank1] CHIEF BACKED UP FIRST: True" in result.stdout
    for rank in (0, 1):
        assert f"[rank{rank}] FIT 1 EPOCHS 3" in result.stdout and f"[rank{rank}] FIT 2 EPOCHS 3" in result.stdout
    assert "resumed from the backup" not in result.stderr + result.stdout


# --- (c) what a script sees ----------------------------------------------------------------

SHOW_SCRIPT = """\
import json, os, sys
import tfrun

ctx = tfrun.context()
print("TFRUN-SEES " + json.dumps({
    "argv": sys.argv, "cwd": os.getcwd(), "rank": ctx.rank, "world_size": ctx.world_size,
    "run_dir": ctx.run_dir, "output_dir": ctx.output_dir, "output_exists": os.path.isdir(ctx.output_dir),
    "env_output_dir": os.environ["TFRUN_OUTPUT_DIR"], "trainer": ctx.trainer, "config": ctx.config,
    "under_tfrun": ctx.under_tfrun, "is_chief": ctx.is_chief, "my_var": os.environ.get("MY_VAR"),
}))
"""


@pytest.mark.slow
def test_script_sees_flags_cwd_and_context(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    write_script(source, "show.py", SHOW_SCRIPT)
    result = run_tfrun(
        tmp_path,
        f"entry.source_dir={source}",
        "entry.script=show.py",
        "trainer.lr=0.01",
        "trainer.batch_size=50",
        "trainer.name=a/b:c+d",
        "+deps.env.MY_VAR=hello",
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.split("TFRUN-SEES ", 1)[1].splitlines()[0])
    run_dir = run_dir_from(result.stderr)

    assert seen["argv"] == [str(source / "show.py"), "--lr", "0.01", "--batch_size", "50", "--name", "a/b:c+d"]
    assert seen["cwd"] == str(source)
    assert seen["run_dir"] == str(run_dir)
    assert seen["output_dir"] == seen["env_output_dir"] == str(run_dir / "outputs")
    assert seen["output_exists"]
    assert seen["trainer"] == {"lr": 0.01, "batch_size": 50, "name": "a/b:c+d"}
    assert seen["config"]["trainer"] == seen["trainer"]
    assert seen["config"]["entry"]["source_dir"] == str(source)
    assert (seen["rank"], seen["world_size"], seen["under_tfrun"], seen["is_chief"]) == (0, 1, True, True)
    assert seen["my_var"] == "hello"


@pytest.mark.slow
def test_script_run_from_cwd_by_default(tmp_path: Path) -> None:
    write_script(tmp_path, "show.py", SHOW_SCRIPT)
    result = run_tfrun(tmp_path, "entry.script=show.py")
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.split("TFRUN-SEES ", 1)[1].splitlines()[0])
    assert seen["cwd"] == str(tmp_path) and seen["argv"] == [str(tmp_path / "show.py")]


def test_context_outside_tfrun(tmp_path: Path) -> None:
    """A script that uses tfrun.context() still runs as plain python."""
    write_script(tmp_path, "show.py", SHOW_SCRIPT.replace('os.environ["TFRUN_OUTPUT_DIR"]', "None"))
    result = subprocess.run(
        [sys.executable, "show.py", "--x", "1"],
        cwd=tmp_path,
        env=scratch_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.split("TFRUN-SEES ", 1)[1])
    assert (seen["under_tfrun"], seen["rank"], seen["world_size"]) == (False, 0, 1)
    assert seen["output_dir"] == str(tmp_path) and seen["config"] == {}


# --- (d) a failing rank stops the run -------------------------------------------------------

FAILING_SCRIPT = """\
import os, subprocess, sys, time
rank = int(os.environ["TFRUN_RANK"])
pids = "{pids}"
if rank == 0:
    child = subprocess.Popen(["sleep", "300"])  # something the task started: must die with it
    with open(os.path.join(pids, "child"), "w") as f:
        f.write(str(child.pid))
    with open(os.path.join(pids, "rank0.tmp"), "w") as f:
        f.write(str(os.getpid()))
    os.rename(os.path.join(pids, "rank0.tmp"), os.path.join(pids, "rank0"))
    time.sleep(300)
else:
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(pids, "rank0")):
        if time.time() > deadline:
            raise SystemExit("rank 0 did not start in 120 s")
        time.sleep(0.05)
    print("rank 1 about to fail", flush=True)
    {failure}
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "failure, code, reason, in_log",
    [
        ("sys.exit(3)", 3, "exit code 3", "rank 1 about to fail"),
        (
            "raise ValueError('boom from rank 1')",
            1,
            "ValueError: boom from rank 1",
            "Traceback (most recent call last)",
        ),
    ],
    ids=["exit-3", "exception"],
)
def test_failing_rank_stops_the_run(tmp_path: Path, failure: str, code: int, reason: str, in_log: str) -> None:
    pids = tmp_path / "pids"
    pids.mkdir()
    write_script(tmp_path, "fail.py", FAILING_SCRIPT.format(pids=pids, failure=failure))
    started = time.monotonic()
    result = run_tfrun(tmp_path, "entry.script=fail.py", "compute.tasks_per_node=2", timeout=120)
    took = time.monotonic() - started

    assert result.returncode == 1, result.stderr
    assert took < 15, f"tfrun took {took:.1f} s to give up"
    assert "tfrun: rank 1 on " in result.stderr and f"failed: {reason}" in result.stderr
    assert "logs/rank1.log" in result.stderr and in_log in result.stderr  # the tail of its log
    run_dir = run_dir_from(result.stderr)
    status = read_json(run_dir / "status.json")
    assert status["state"] == "FAILED" and status["failed_rank"] == 1
    # the rank's own account, as on every target (not only its exit code)
    assert status["reason"] == reason and status["exit_codes"]["1"] == code
    assert read_json(run_dir / "ranks/1.json")["exit_code"] == code

    task_pids = [int((pids / name).read_text()) for name in ("rank0", "child")]
    assert wait_gone(task_pids, timeout=5) == [], "processes of the run were left running"


# A sitecustomize that notes every import made by a daemon thread (one the interpreter does not
# wait for at its exit), in every Python process started with it on PYTHONPATH: one line per
# import, in a file per process.
_THREAD_IMPORTS = """import os, sys, threading

_DIR = os.environ["TEST_THREAD_IMPORTS"]


class _Noting:
    def find_spec(self, name, path=None, target=None):
        if threading.current_thread().daemon:
            fd = os.open(os.path.join(_DIR, str(os.getpid())), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.write(fd, f"{threading.current_thread().name} {name} {' '.join(sys.orig_argv)}\\n".encode())
            os.close(fd)
        return None


sys.meta_path.insert(0, _Noting())
"""


@pytest.mark.slow
def test_a_run_past_its_time_limit_ends_timeout_and_says_why(tmp_path: Path) -> None:
    """compute.timeout_min passed: TIMEOUT, with that as its reason (as a pool's item says it),
    and no rank named as failed: the limit ended every one of them."""
    pids = tmp_path / "pids"
    pids.mkdir()
    write_script(tmp_path, "sleep.py", SLEEP_SCRIPT.format(pids=pids))
    result = run_tfrun(
        tmp_path, "entry.script=sleep.py", "compute.tasks_per_node=2", "compute.timeout_min=1", timeout=240
    )
    assert result.returncode == 1, result.stderr
    status = read_json(run_dir_from(result.stderr) / "status.json")
    assert status["state"] == "TIMEOUT" and status["reason"] == "its time limit (compute.timeout_min) passed", status
    assert status.get("failed_rank") is None, status


@pytest.mark.slow
def test_no_daemon_thread_of_a_task_imports_anything(tmp_path: Path) -> None:
    """tfrun's daemon threads in a task never import: a script that ends while one is
    still importing crashes the interpreter at its exit (SIGSEGV in CPython's import lock), and a
    task that did its work, or exited with its own code, was reported killed by SIGSEGV."""
    hook, noted = tmp_path / "hook", tmp_path / "noted"
    hook.mkdir()
    noted.mkdir()
    (hook / "sitecustomize.py").write_text(_THREAD_IMPORTS)
    # long enough for tfrun's threads to have started and done a round of their work
    write_script(tmp_path, "short.py", "import time\ntime.sleep(1.5)\n")
    result = run_tfrun(
        tmp_path,
        "entry.script=short.py",
        "compute.tasks_per_node=2",
        timeout=120,
        PYTHONPATH=str(hook),
        TEST_THREAD_IMPORTS=str(noted),
    )
    assert result.returncode == 0, result.stderr
    lines = [line for f in noted.iterdir() for line in f.read_text().splitlines()]
    in_tasks = [line for line in lines if "tfrun.bootstrap" in line]
    assert in_tasks == [], "\n".join(in_tasks)


# --- (e) Ctrl-C cancels every task ------------------------------------------------------------

SLEEP_SCRIPT = """\
import os, time
pids = "{pids}"
rank = os.environ["TFRUN_RANK"]
with open(os.path.join(pids, rank + ".tmp"), "w") as f:
    f.write(str(os.getpid()))
os.rename(os.path.join(pids, rank + ".tmp"), os.path.join(pids, rank))
time.sleep(300)
"""


# Says it will handle a stop request (on_preempt) and then never stops.
DEAF_SLEEP_SCRIPT = "import tfrun\ntfrun.on_preempt(lambda: None)\n" + SLEEP_SCRIPT


# The main thread holds SIGUSR2 while it sleeps: the kernel gives the stop request to another
# thread of the task (the heartbeat's), as it may whenever the main thread has a signal pending.
HELD_SLEEP_SCRIPT = "import signal\nsignal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2])\n" + SLEEP_SCRIPT


@pytest.mark.slow
@pytest.mark.parametrize("script", [SLEEP_SCRIPT, HELD_SLEEP_SCRIPT], ids=["main thread", "another thread"])
def test_ctrl_c_once_stops_a_script_that_does_not_listen(tmp_path: Path, script: str) -> None:
    """A script that neither fits with Keras nor listens for a stop is stopped at once by
    the first Ctrl-C; the run is STOPPED (resumable) and no task is left. Also when the stop
    request reaches another thread than the main one, which sleeps in a blocking call: Python
    runs the handler in the main thread, once that thread runs Python code again."""
    pids = tmp_path / "pids"
    pids.mkdir()
    write_script(tmp_path, "sleep.py", script.format(pids=pids))
    proc, _, _ = popen_tfrun(tmp_path, "entry.script=sleep.py", "compute.tasks_per_node=2")
    try:
        wait_for(lambda: (pids / "0").exists() and (pids / "1").exists(), 60, "both ranks to start")
        task_pids = [int((pids / r).read_text()) for r in ("0", "1")]
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        took = time.monotonic() - sent
    finally:
        stop(proc)
    err_text = (tmp_path / "tfrun.err").read_text()
    assert proc.returncode != 0 and took < 15, (took, err_text)
    assert read_json(run_dir_from(err_text) / "status.json")["state"] == "STOPPED"
    assert "tfrun resume" in err_text
    assert wait_gone(task_pids, timeout=5) == [], "tasks survived Ctrl-C"
    for rank in (0, 1):  # woken without a stack dump (the watchdog's signal asks for one)
        log = text_of(run_dir_from(err_text) / f"logs/rank{rank}.log")
        assert "most recent call first" not in log, log


@pytest.mark.slow
def test_sigterm_while_stopping_gracefully_still_stops_every_task(tmp_path: Path) -> None:
    """A SIGTERM (a cancel, a shell's kill) while the first Ctrl-C waits for a checkpoint that
    never comes: the run is CANCELLED and its tasks are stopped, not left running."""
    pids = tmp_path / "pids"
    pids.mkdir()
    write_script(tmp_path, "sleep.py", DEAF_SLEEP_SCRIPT.format(pids=pids))
    proc, out_path, _ = popen_tfrun(tmp_path, "entry.script=sleep.py", "compute.tasks_per_node=2")
    try:
        wait_for(lambda: (pids / "0").exists() and (pids / "1").exists(), 60, "both ranks to start")
        task_pids = [int((pids / r).read_text()) for r in ("0", "1")]
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: b"tfrun: stopping" in out_path.read_bytes(), 10, "tfrun to ask the tasks to stop")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        stop(proc)
    err_text = (tmp_path / "tfrun.err").read_text()
    assert wait_gone(task_pids, timeout=10) == [], "tasks survived a SIGTERM to their launcher"
    assert read_json(run_dir_from(err_text) / "status.json")["state"] == "CANCELLED", err_text


COUNTS_EPOCHS = """\
import os
from pathlib import Path
done = Path(os.environ["TFRUN_OUTPUT_DIR"]) / "epochs"
for epoch in range(len(done.read_text()) if done.exists() else 0, 3):
    done.write_text("x" * (epoch + 1))
print("trained epochs:", done.read_text().count("x"), flush=True)
"""


def test_a_new_run_is_never_started_over_an_existing_run_dir(tmp_path: Path) -> None:
    """The same run twice with one hydra.run.dir (and a sweep with one hydra.sweep.dir): the
    second is refused (exit 2, nothing started), the first run is left as it was."""
    write_script(tmp_path, "count.py", COUNTS_EPOCHS)
    first = run_tfrun(tmp_path, "entry.script=count.py", "hydra.run.dir=fixed")
    assert first.returncode == 0 and "trained epochs: 3" in first.stdout, first.stderr
    before = (tmp_path / "fixed" / "status.json").read_text()
    again = run_tfrun(tmp_path, "entry.script=count.py", "hydra.run.dir=fixed")
    assert again.returncode == 2, again.stdout + again.stderr
    assert "holds a run already (COMPLETED)" in again.stderr and "hydra.run.dir" in again.stderr
    assert "trained epochs" not in again.stdout and "Traceback" not in again.stderr
    assert (tmp_path / "fixed" / "status.json").read_text() == before

    sweep = ["-m", "entry.script=count.py", "trainer.lr=0.1,0.2", "hydra.sweep.dir=swept"]
    assert run_tfrun(tmp_path, *sweep).returncode == 0
    points = sorted(p.name for p in (tmp_path / "swept").iterdir())
    again = run_tfrun(tmp_path, *sweep[:2], "trainer.lr=0.1,0.2,0.3", sweep[3])
    assert again.returncode == 2 and "holds a run already" in again.stderr, again.stderr
    assert sorted(p.name for p in (tmp_path / "swept").iterdir()) == points, "a refused sweep wrote a point"


LAUNCHES_AND_WAITS = """import sys, tfrun
run = tfrun.launch(["entry.script=sleep.py", "compute.tasks_per_node=2"], wait=False)
print(run.dir, flush=True)
print("after the run:", run.wait(timeout_s=120, poll_s=0.2), flush=True)
"""


@pytest.mark.slow
def test_cancel_from_a_shell_spares_the_process_that_launched_the_run(tmp_path: Path) -> None:
    """`tfrun cancel RUN` of a run that a process (a notebook, a study) launched with
    tfrun.launch(wait=False): the run is CANCELLED, its tasks end, the process goes on."""
    pids = tmp_path / "pids"
    pids.mkdir()
    write_script(tmp_path, "sleep.py", SLEEP_SCRIPT.format(pids=pids))
    write_script(tmp_path, "notebook.py", LAUNCHES_AND_WAITS)
    notebook = subprocess.Popen(
        [sys.executable, "notebook.py"],
        cwd=tmp_path,
        env=scratch_env(tmp_path),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: (pids / "0").exists() and (pids / "1").exists(), 60, "both ranks to start")
        task_pids = [int((pids / r).read_text()) for r in ("0", "1")]
        cancelled = run_tfrun(tmp_path, "cancel")
        assert cancelled.returncode == 0, cancelled.stderr
        out, err = notebook.communicate(timeout=60)
    finally:
        stop(notebook)
    assert notebook.returncode == 0, (notebook.returncode, err)
    assert "after the run: CANCELLED" in out, out + err
    assert wait_gone(task_pids, timeout=10) == [], "tasks survived the cancel"
    run_dir = Path(out.splitlines()[0])
    assert read_json(run_dir / "status.json")["state"] == "CANCELLED"


@pytest.mark.slow
def test_a_cancel_ends_a_run_cancelled_whatever_else_its_run_dir_says(tmp_path: Path) -> None:
    """`tfrun cancel` of a run that its tuning policy had also asked to stop (prune.json) and
    whose watchdog had named a hang: CANCELLED, as on every target (the cancel decides first)."""
    from tfrun import rundir
    from tfrun.paths import RunPaths

    pids = tmp_path / "pids"
    pids.mkdir()
    write_script(tmp_path, "sleep.py", SLEEP_SCRIPT.format(pids=pids))
    proc, _, err_path = popen_tfrun(tmp_path, "entry.script=sleep.py", "compute.tasks_per_node=2")
    try:
        wait_for(lambda: (pids / "0").exists() and (pids / "1").exists(), 60, "both ranks to start")
        run_dir = next(tmp_path.rglob("plan.json")).parent
        rundir.write_json(RunPaths.of(run_dir).prune, {"policy": "asha", "epoch": 1, "why": "below the median"})
        rundir.update_status(
            run_dir, hang={"rank": 1, "host": "here", "reason": "rank 1 made no progress", "requeued": False}
        )
        cancelled = run_tfrun(tmp_path, "cancel", str(run_dir))
        assert cancelled.returncode == 0, cancelled.stderr
        proc.wait(timeout=60)
    finally:
        stop(proc)
    status = read_json(run_dir / "status.json")
    assert status["state"] == "CANCELLED" and status.get("failed_rank") is None, (status, err_path.read_text())


@pytest.mark.slow
def test_ctrl_c_twice_cancels_every_task(tmp_path: Path) -> None:
    """The first Ctrl-C asks every task to checkpoint and stop; this script promises to
    and never does, so the second Ctrl-C kills them all."""
    pids = tmp_path / "pids"
    pids.mkdir()
    write_script(tmp_path, "sleep.py", DEAF_SLEEP_SCRIPT.format(pids=pids))
    proc, out_path, _ = popen_tfrun(tmp_path, "entry.script=sleep.py", "compute.tasks_per_node=2")
    try:
        wait_for(lambda: (pids / "0").exists() and (pids / "1").exists(), 60, "both ranks to start")
        task_pids = [int((pids / r).read_text()) for r in ("0", "1")]
        assert all(alive(p) for p in task_pids)
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: b"tfrun: stopping" in out_path.read_bytes(), 10, "tfrun to ask the tasks to stop")
        assert proc.poll() is None and all(alive(p) for p in task_pids)  # still waiting for a checkpoint
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        took = time.monotonic() - sent
    finally:
        stop(proc)
    err_text = (tmp_path / "tfrun.err").read_text()
    assert proc.returncode != 0, err_text
    assert "Traceback" not in err_text
    assert took < 10, f"tfrun took {took:.1f} s to stop after the second SIGINT"
    assert "CANCELLED" in err_text
    assert read_json(run_dir_from(err_text) / "status.json")["state"] == "CANCELLED"
    assert wait_gone(task_pids, timeout=5) == [], "tasks survived Ctrl-C"


# --- (f) the user's config dir ------------------------------------------------------------------

MYBOX = """\
defaults:
  - /schema/compute/local@_here_
  - _self_
tasks_per_node: 2
"""


def planned(result: subprocess.CompletedProcess[str]) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def make_user_conf(root: Path) -> Path:
    conf = root / "conf"
    (conf / "compute").mkdir(parents=True)
    (conf / "compute" / "mybox.yaml").write_text(MYBOX)
    return conf


def test_user_config_dir_adds_an_option(tmp_path: Path) -> None:
    conf = make_user_conf(tmp_path / "project")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for flag in (["--config-dir", str(conf)], [f"--config-dir={conf}"], ["-cd", str(conf)]):
        plan = planned(run_tfrun(tmp_path, "--dry-run=json", *flag, "compute=mybox", cwd=elsewhere))
        assert len(plan["tasks"]) == 2, flag
    # Without --config-dir, tfrun finds ./conf by itself ...
    plan = planned(run_tfrun(tmp_path, "--dry-run=json", "compute=mybox", cwd=tmp_path / "project"))
    assert len(plan["tasks"]) == 2
    # ... and only there.
    result = run_tfrun(tmp_path, "--dry-run", "compute=mybox", cwd=elsewhere)
    assert result.returncode == 2 and "compute=mybox" in result.stderr


@pytest.mark.parametrize(
    "project_default, tasks, argv",
    [
        ("# @package _global_\ndefaults:\n  - override /compute: mybox\n", 2, []),
        ("# @package _global_\ncompute:\n  tasks_per_node: 3\ntrainer:\n  epochs: 2\n", 3, ["--epochs", "2"]),
    ],
    ids=["override-group", "set-values"],
)
def test_project_default_changes_defaults(tmp_path: Path, project_default: str, tasks: int, argv: list) -> None:
    conf = make_user_conf(tmp_path)
    (conf / "project").mkdir()
    (conf / "project" / "default.yaml").write_text(project_default)
    plan = planned(run_tfrun(tmp_path, "--dry-run=json"))
    assert len(plan["tasks"]) == tasks
    assert plan["tasks"][0]["argv"][1:] == argv
    # The command line still wins over the project's defaults.
    plan = planned(run_tfrun(tmp_path, "--dry-run=json", "compute=local", "compute.tasks_per_node=1"))
    assert len(plan["tasks"]) == 1
    # Hydra's own app (used for --cfg, -m, ...) sees the same defaults.
    result = run_tfrun(tmp_path, "--cfg", "job")
    assert result.returncode == 0 and f"tasks_per_node: {tasks}" in result.stdout


BARE_CONFIG = """\
defaults:
  - tfrun_schema
  - compute: local
  - backend: none
  - deps: none
  - export: none
  - _self_
entry:
  script: ${tfrun_example:digits/train.py}
compute:
  tasks_per_node: 2
"""


def test_config_name_from_user_config_dir(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "mine.yaml").write_text(BARE_CONFIG)
    assert run_tfrun(tmp_path, "--cfg", "job", "--config-name", "mine").returncode == 0
    plan = planned(run_tfrun(tmp_path, "--dry-run=json", "--config-name", "mine"))
    assert len(plan["tasks"]) == 2


# --- (g) no TensorFlow in the CLI ---------------------------------------------------------------

NO_TF = """\
import sys
from tfrun.cli.main import main
sys.argv = ["tfrun", *{args!r}]
try:
    main()
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "tf_keras", "horovod"))
assert not heavy, heavy
print("NO-TF-OK", file=sys.stderr)
"""


@pytest.mark.parametrize(
    "args", [["--dry-run"], ["--dry-run=json", "compute.tasks_per_node=2"], ["--help"], ["--cfg", "job"]], ids=" ".join
)
def test_cli_does_not_import_tensorflow(tmp_path: Path, args: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-c", NO_TF.format(args=args)],
        cwd=tmp_path,
        env=scratch_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and "NO-TF-OK" in result.stderr, result.stderr


# --- (h) Hydra's own flags ------------------------------------------------------------------------


def test_cfg_job_prints_the_composed_config(tmp_path: Path) -> None:
    result = run_tfrun(tmp_path, "--cfg", "job", "compute.tasks_per_node=3", "trainer.lr=0.5")
    assert result.returncode == 0, result.stderr
    for text in ("compute:", "tasks_per_node: 3", "trainer:", "lr: 0.5", "entry:", "${tfrun_example:"):
        assert text in result.stdout
    resolved = run_tfrun(tmp_path, "--cfg", "job", "--resolve")
    assert resolved.returncode == 0, resolved.stderr
    assert f"script: {DIGITS}" in resolved.stdout and f"runs_dir: {tmp_path / 'runs'}" in resolved.stdout
    assert not (tmp_path / "runs").exists()  # printing the config runs nothing


def test_info_and_help(tmp_path: Path) -> None:
    info = run_tfrun(tmp_path, "--info")
    assert info.returncode == 0, info.stderr
    assert "compute" in info.stdout
    help_ = run_tfrun(tmp_path, "--help")
    assert help_.returncode == 0, help_.stderr
    assert "compute" in help_.stdout and "local" in help_.stdout
    assert not (tmp_path / "runs").exists()
