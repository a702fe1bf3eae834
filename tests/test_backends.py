"""Real distributed runs under every backend: real processes, locally and as Slurm jobs.

Every run trains a little (a few epochs or steps of the bundled digits data) and the
test checks what training really did: the ranks' recorded histories and weight digests,
the checkpoints, the servers' own log lines, the run's status and that no process is
left behind.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    REPO,
    alive,
    assert_on_separate_hosts,
    node_address,
    read_json,
    run_dir_from,
    run_tfrun,
    scratch_env,
    tfrun_command,
    wait_for,
)

EXAMPLES = REPO / "examples"
HOROVOD_KERAS = EXAMPLES / "horovod_keras" / "train.py"
HOROVOD_TAPE = EXAMPLES / "horovod_tape" / "train.py"
PS_KERAS = EXAMPLES / "ps_keras" / "train.py"
DIGITS_DISTRIBUTED = EXAMPLES / "digits_distributed" / "train.py"

# Horovod and Slurm are part of the test setup (scripts/test builds and starts them): a
# missing one is a failure, never a skip.
needs_horovod = pytest.mark.usefixtures("require_horovod")
needs_slurm = pytest.mark.usefixtures("require_slurm")


@pytest.fixture
def require_horovod() -> None:
    if importlib.util.find_spec("horovod") is None:
        pytest.fail("Horovod is not installed: run scripts/build-horovod (scripts/test does)")


@pytest.fixture
def require_slurm() -> None:
    if shutil.which("sinfo") is None:
        pytest.fail("Slurm is not installed: run scripts/local-slurm install && scripts/local-slurm start")


RUN_TIMEOUT = 300


# --- helpers ------------------------------------------------------------------------------


def task_alive(pid: int, run_dir: Path) -> bool:
    """Is ``pid`` still a task of this run? Its command line names the run dir (locally
    ``-m tfrun.bootstrap RUN_DIR``, on Slurm submitit's folder inside it), so a recycled
    pid of another process is not mistaken for one."""
    try:
        return alive(pid) and str(run_dir) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def run_tasks(run_dir: Path) -> list[int]:
    return [rec["pid"] for rec in map(read_json, sorted((run_dir / "ranks").glob("*.json"))) if rec.get("pid")]


@pytest.fixture(autouse=True)
def no_leftover_tasks(tmp_path: Path):
    """Whatever a test asserted, no task of its runs outlives it."""
    yield
    for ranks in (tmp_path / "runs").glob("**/ranks"):
        for pid in run_tasks(ranks.parent):
            if task_alive(pid, ranks.parent):
                os.kill(pid, signal.SIGKILL)


def completed(tmp_path: Path, *args: str, timeout: float = RUN_TIMEOUT) -> Path:
    """Run ``tfrun ARGS``; it must complete. Returns the run dir."""
    result = run_tfrun(tmp_path, *args, timeout=timeout)
    assert result.returncode == 0, f"{result.stderr[-4000:]}\n{result.stdout[-4000:]}"
    run_dir = run_dir_from(result.stderr)
    assert read_json(run_dir / "status.json")["state"] == "COMPLETED"
    return run_dir


def assert_no_process_left(run_dir: Path) -> None:
    pids = run_tasks(run_dir)
    assert pids, "the ranks recorded no pid"
    wait_for(lambda: not any(task_alive(p, run_dir) for p in pids), 15, "every task of the run to end")


def assert_falls(loss: list[float], what: str) -> None:
    assert len(loss) >= 2 and loss[-1] < loss[0], f"{what}: loss did not fall: {loss}"


def assert_same_training(histories: list[dict[str, Any]], size: int) -> None:
    """Every rank took part in one group of ``size``, ended with the same weights, and learned."""
    assert len(histories) == size
    for record in histories:
        if "size" in record:
            assert record["size"] == size, record
        assert_falls(record["loss"], f"rank {record['rank']}")
    assert len({r["weights_sha"] for r in histories}) == 1, [r["weights_sha"] for r in histories]


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def per_rank_outputs(tmp_path: Path, script: Path) -> Path:
    """A wrapper that runs ``script`` unchanged with ``--output_dir outputs/rank<R>``.

    Every rank of the Horovod examples writes to the run's one outputs dir, where a
    checkpoint from rank 1 would be indistinguishable from rank 0's; per-rank dirs show
    which rank wrote what.
    """
    return write(
        tmp_path / f"per_rank_{script.parent.name}.py",
        f"""\
        import os, runpy, sys
        out = os.path.join(os.environ["TFRUN_OUTPUT_DIR"], "rank" + os.environ["TFRUN_RANK"])
        sys.argv = [{str(script)!r}, *sys.argv[1:], "--output_dir", out]
        runpy.run_path({str(script)!r}, run_name="__main__")
        """,
    )


# --- 1, 2. Horovod: classic Keras script and DistributedGradientTape -----------------------------


def check_horovod_keras(run_dir: Path, epochs: int) -> None:
    histories = [read_json(run_dir / f"outputs/rank{r}/history-rank{r}.json") for r in (0, 1)]
    assert [h["rank"] for h in histories] == [0, 1]
    assert_same_training(histories, size=2)
    assert len(histories[0]["loss"]) == epochs
    assert sorted(p.name for p in (run_dir / "outputs/rank0").glob("checkpoint-*.h5")) == [
        f"checkpoint-{e}.h5" for e in range(1, epochs + 1)
    ]
    assert list((run_dir / "outputs/rank1").glob("checkpoint-*")) == []
    for rank in (0, 1):
        assert f"tfrun: horovod ready: rank {rank} of 2" in (run_dir / f"logs/rank{rank}.log").read_text()
    assert_no_process_left(run_dir)


@pytest.mark.slow
@needs_horovod
def test_horovod_keras_two_local_tasks(tmp_path: Path) -> None:
    script = per_rank_outputs(tmp_path, HOROVOD_KERAS)
    run_dir = completed(
        tmp_path, f"entry.script={script}", "backend=horovod", "compute.tasks_per_node=2", "trainer.epochs=3"
    )
    check_horovod_keras(run_dir, epochs=3)


@pytest.mark.slow
@pytest.mark.slurm
@needs_slurm
@needs_horovod
def test_horovod_keras_slurm_two_nodes(tmp_path: Path) -> None:
    script = per_rank_outputs(tmp_path, HOROVOD_KERAS)
    run_dir = completed(
        tmp_path, "compute=slurm", "compute.nodes=2", f"entry.script={script}", "backend=horovod", "trainer.epochs=3"
    )
    check_horovod_keras(run_dir, epochs=3)
    assert_horovod_across(run_dir, ["node1", "node2"])


def assert_horovod_across(run_dir: Path, nodes: list[str]) -> None:
    """Every rank met rank 0's rendezvous at node1's own address, over its own interface."""
    assert_on_separate_hosts(run_dir, nodes)
    for rank, node in enumerate(nodes):
        env = dict(re.findall(r"(HOROVOD_[A-Z_]+)=(\S+)", (run_dir / f"logs/rank{rank}.log").read_text()))
        assert env["HOROVOD_GLOO_RENDEZVOUS_ADDR"] == node_address(nodes[0]), env
        assert env["HOROVOD_GLOO_IFACE"] not in ("lo", ""), env
        assert (env["HOROVOD_HOSTNAME"], env["HOROVOD_CROSS_RANK"], env["HOROVOD_CROSS_SIZE"]) == (
            node,
            str(sorted(set(nodes)).index(node)),
            str(len(set(nodes))),
        ), env


def check_horovod_tape(run_dir: Path, steps: int) -> None:
    histories = [read_json(run_dir / f"outputs/history-rank{r}.json") for r in (0, 1)]
    assert [h["rank"] for h in histories] == [0, 1]
    assert_same_training(histories, size=2)
    # Every step's loss is allreduced: the ranks saw the same numbers.
    assert histories[0]["loss"] == histories[1]["loss"] and len(histories[0]["loss"]) == steps
    assert_no_process_left(run_dir)


@pytest.mark.slow
@needs_horovod
def test_horovod_gradient_tape_two_local_tasks(tmp_path: Path) -> None:
    run_dir = completed(
        tmp_path, f"entry.script={HOROVOD_TAPE}", "backend=horovod", "compute.tasks_per_node=2", "trainer.steps=30"
    )
    check_horovod_tape(run_dir, steps=30)


@pytest.mark.slow
@pytest.mark.slurm
@needs_slurm
@needs_horovod
def test_horovod_gradient_tape_slurm_two_nodes(tmp_path: Path) -> None:
    run_dir = completed(
        tmp_path,
        "compute=slurm",
        "compute.nodes=2",
        f"entry.script={HOROVOD_TAPE}",
        "backend=horovod",
        "trainer.steps=30",
    )
    check_horovod_tape(run_dir, steps=30)
    assert_horovod_across(run_dir, ["node1", "node2"])


# --- 3. Horovod: a rank that cannot reach the rendezvous ---------------------------------------

TRAINS_ALONE = """\
import os
open(os.path.join(os.environ["TFRUN_RUN_DIR"], "script-ran-rank" + os.environ["TFRUN_RANK"]), "w").close()
import horovod.tensorflow as hvd
hvd.init()
print("TRAINED ALONE with size", hvd.size())
"""


def lone_rank(
    tmp_path: Path, rank: int, timeout_s: int, stale_rendezvous: bool = False
) -> tuple[subprocess.CompletedProcess[str], float, Path]:
    """Start only ``rank`` of a 2-task Horovod plan, exactly as the local launcher would.

    The plan is the one ``tfrun --dry-run=json`` prints, written into its run dir; the
    other rank is never started (or, with ``stale_rendezvous``, rank 0 published an
    address and died).
    """
    write(tmp_path / "alone.py", TRAINS_ALONE)
    shown = run_tfrun(
        tmp_path,
        "--dry-run=json",
        "entry.script=alone.py",
        "backend=horovod",
        "compute.tasks_per_node=2",
        f"backend.rendezvous_timeout_s={timeout_s}",
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    plan = json.loads(shown.stdout)
    run_dir = Path(plan["run_dir"])
    run_dir.mkdir(parents=True)
    (run_dir / "plan.json").write_text(shown.stdout)
    # A port nothing listens on any more: bound, never listening, while the rank runs (closed, it
    # could be taken meanwhile by another test's process).
    with socket.socket() as stale:
        if stale_rendezvous:
            stale.bind(("127.0.0.1", 0))
            folder = run_dir / "rendezvous" / "lone"
            folder.mkdir(parents=True)
            (folder / "horovod.json").write_text(
                json.dumps({"addr": "127.0.0.1", "port": stale.getsockname()[1], "host": "localhost"})
            )
        env = scratch_env(tmp_path, TFRUN_LAUNCHER="local", TFRUN_RANK=str(rank), TFRUN_ATTEMPT="lone")
        start = time.monotonic()
        result = subprocess.run(
            plan["command"],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout_s + 60,
        )
    return result, time.monotonic() - start, run_dir


@pytest.mark.slow
@needs_horovod
def test_horovod_rank_fails_when_rank0_never_publishes(tmp_path: Path) -> None:
    result, took, run_dir = lone_rank(tmp_path, rank=1, timeout_s=5)
    assert result.returncode == 1, result.stderr
    assert took < 5 + 10, took
    assert (
        "tfrun: error: timed out after 5 s waiting for Horovod's rendezvous server (rank 0): "
        "horovod never published an address in"
    ) in result.stderr
    assert not (run_dir / "script-ran-rank1").exists() and "TRAINED ALONE" not in result.stdout
    record = read_json(run_dir / "ranks/1.json")
    assert record["exit_code"] == 1 and "Horovod's rendezvous server (rank 0)" in record["error"]


@pytest.mark.slow
@needs_horovod
def test_horovod_rank_fails_when_rendezvous_is_unreachable(tmp_path: Path) -> None:
    result, took, run_dir = lone_rank(tmp_path, rank=1, timeout_s=5, stale_rendezvous=True)
    assert result.returncode == 1, result.stderr
    assert 4 < took < 5 + 10, took
    assert (
        "tfrun: error: rank 1 on localhost cannot reach Horovod's rendezvous server (rank 0, on localhost) "
        "at 127.0.0.1:"
    ) in result.stderr
    assert not (run_dir / "script-ran-rank1").exists() and "TRAINED ALONE" not in result.stdout
    assert read_json(run_dir / "ranks/1.json")["exit_code"] == 1


@pytest.mark.slow
@needs_horovod
def test_horovod_rank0_alone_never_trains(tmp_path: Path) -> None:
    """Rank 0 serves the rendezvous, but rank 1 never comes: Horovod gives up after its timeout.

    Horovod aborts the process from C++ (SIGABRT), so the bootstrap cannot record an exit
    code; the launcher reports the rank as killed by SIGABRT. Horovod's clock starts at
    hvd.init(), after TensorFlow's import (seconds on a busy machine), hence the looser bound.
    """
    result, took, run_dir = lone_rank(tmp_path, rank=0, timeout_s=5)
    assert result.returncode == -signal.SIGABRT, (result.returncode, result.stderr[-2000:])
    assert took < 5 + 45, took
    assert "Wait timeout after 5 seconds for key(s): 1" in result.stderr
    assert "TRAINED ALONE" not in result.stdout and not (run_dir / "script-ran-rank0").exists()


# --- 4. Parameter servers ---------------------------------------------------------------------

PS_ROLES = {1: "worker 0", 2: "worker 1", 3: "ps 0"}


def check_ps_run(run_dir: Path) -> None:
    assert_falls(read_json(run_dir / "outputs/history-rank0.json")["loss"], "chief")
    assert (run_dir / "outputs/model/saved_model.pb").is_file()
    for rank, who in PS_ROLES.items():
        log = (run_dir / f"logs/rank{rank}.log").read_text()
        assert f"tfrun: {who} serving at grpc://" in log, log[-2000:]
        assert f"tfrun: {who} stopping: the chief finished" in log, log[-2000:]
        assert read_json(run_dir / f"ranks/{rank}.json")["exit_code"] == 0
    assert_no_process_left(run_dir)


@pytest.mark.slow
def test_ps_keras_four_local_tasks(tmp_path: Path) -> None:
    run_dir = completed(
        tmp_path,
        f"entry.script={PS_KERAS}",
        "backend=ps",
        "compute.tasks_per_node=4",
        "trainer.epochs=3",
        "trainer.steps_per_epoch=10",
    )
    check_ps_run(run_dir)
    assert read_json(run_dir / "status.json")["exit_codes"] == {"0": 0, "1": 0, "2": 0, "3": 0}


@pytest.mark.slow
@pytest.mark.slurm
@needs_slurm
def test_ps_keras_slurm_two_nodes_two_tasks(tmp_path: Path) -> None:
    run_dir = completed(
        tmp_path,
        "compute=slurm",
        "compute.nodes=2",
        "compute.tasks_per_node=2",
        f"entry.script={PS_KERAS}",
        "backend=ps",
        "trainer.epochs=3",
        "trainer.steps_per_epoch=10",
    )
    check_ps_run(run_dir)
    assert_on_separate_hosts(run_dir, ["node1", "node1", "node2", "node2"])
    shown = re.search(r"TF_CONFIG=(\{.*\}) GRPC_FAIL_FAST", (run_dir / "logs/rank0.log").read_text())
    assert shown, "the chief's log does not show its TF_CONFIG"
    cluster = json.loads(shown.group(1))["cluster"]
    # chief and worker 0 on node1; worker 1 and the parameter server on node2: by address, never loopback
    assert [a.split(":")[0] for a in cluster["chief"] + cluster["worker"] + cluster["ps"]] == [
        node_address("node1"),
        node_address("node1"),
        node_address("node2"),
        node_address("node2"),
    ]


class _Lines(threading.Thread):
    """Collects a process's stdout lines; ``seen(text)`` says whether one contained text."""

    def __init__(self, stream: Any):
        super().__init__(daemon=True)
        self.stream, self.lines = stream, []

    def run(self) -> None:
        for line in self.stream:
            self.lines.append(line)

    def seen(self, text: str) -> bool:
        return any(text in line for line in self.lines)


@pytest.mark.slow
def test_ps_run_survives_a_killed_worker(tmp_path: Path) -> None:
    """SIGKILL worker 0 mid-training: TF's coordinator carries on with worker 1."""
    argv = [
        *tfrun_command(),
        f"entry.script={PS_KERAS}",
        "backend=ps",
        "compute.tasks_per_node=4",
        "trainer.epochs=12",
        "trainer.steps_per_epoch=50",
    ]
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen(
            argv,
            cwd=tmp_path,
            env=scratch_env(tmp_path),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        out = _Lines(proc.stdout)
        out.start()
        try:
            wait_for(lambda: out.seen("[rank0] Epoch 3/12") or proc.poll() is not None, 180, "epoch 3 on the chief")
            assert proc.poll() is None, "".join(out.lines[-40:])
            run_dir = next((tmp_path / "runs").iterdir())
            victim = read_json(run_dir / "ranks/1.json")["pid"]
            os.kill(victim, signal.SIGKILL)
            killed_at = len(out.lines)
            proc.wait(timeout=RUN_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
        out.join(timeout=10)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 0, stderr[-3000:]
    assert "tfrun: rank 1 ended (killed by SIGKILL); the run goes on without it" in "".join(out.lines)
    status = read_json(run_dir / "status.json")
    assert status["state"] == "COMPLETED" and status["exit_codes"] == {"0": 0, "1": -9, "2": 0, "3": 0}
    assert any("[rank0] Epoch 12/12" in line for line in out.lines[killed_at:]), "training stopped at the kill"
    loss = read_json(run_dir / "outputs/history-rank0.json")["loss"]
    assert len(loss) == 12
    assert_falls(loss, "chief")
    for rank, who in ((2, "worker 1"), (3, "ps 0")):
        assert f"tfrun: {who} stopping: the chief finished" in (run_dir / f"logs/rank{rank}.log").read_text()
    assert_no_process_left(run_dir)


# --- 7. The chief fails under ps --------------------------------------------------------------

CHIEF_FAILS = """\
import tensorflow as tf

resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
strategy = tf.distribute.ParameterServerStrategy(resolver)  # connects to every worker and ps
with strategy.scope():
    v = tf.Variable(1.0)
print("CLUSTER UP: variable on", v.device, flush=True)
raise RuntimeError("the chief broke on purpose")
"""


@pytest.mark.slow
def test_ps_chief_failure_fails_the_run_and_stops_the_servers(tmp_path: Path) -> None:
    write(tmp_path / "chief_fails.py", CHIEF_FAILS)
    result = run_tfrun(
        tmp_path, "entry.script=chief_fails.py", "backend=ps", "compute.tasks_per_node=4", timeout=RUN_TIMEOUT
    )
    assert result.returncode == 1, result.stderr
    run_dir = run_dir_from(result.stderr)
    assert "[rank0] CLUSTER UP: variable on /job:ps/" in result.stdout
    status = read_json(run_dir / "status.json")
    assert status["state"] == "FAILED" and status["failed_rank"] == 0, status
    assert status["reason"] == "RuntimeError: the chief broke on purpose", status  # the rank's own account
    assert f"tfrun: run {status['run_id']} FAILED" in result.stderr
    assert re.search(r"^tfrun: rank 0 on \S+ failed: .*", result.stderr, re.M), result.stderr
    assert "  | RuntimeError: the chief broke on purpose" in result.stderr  # the traceback's tail
    assert read_json(run_dir / "ranks/0.json")["exit_code"] == 1
    assert_no_process_left(run_dir)


# --- 5, 6. The backend-neutral example under every backend; MultiWorkerMirrored -----------------

EVERY_BACKEND = {
    "none": (1, [0]),
    "horovod": (2, [0, 1]),
    "mwms": (2, [0, 1]),
    "ps": (4, [0]),  # only the chief runs the script
}


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(EVERY_BACKEND))
def test_digits_distributed_under_every_backend(tmp_path: Path, backend: str) -> None:
    if backend == "horovod" and importlib.util.find_spec("horovod") is None:
        pytest.fail("Horovod is not installed: run scripts/build-horovod (scripts/test does)")
    tasks, trained = EVERY_BACKEND[backend]
    run_dir = completed(
        tmp_path,
        f"entry.script={DIGITS_DISTRIBUTED}",
        f"backend={backend}",
        f"compute.tasks_per_node={tasks}",
        "trainer.epochs=3",
        "trainer.steps_per_epoch=10",
    )
    histories = [read_json(run_dir / f"outputs/history-rank{r}.json") for r in trained]
    assert sorted(p.name for p in (run_dir / "outputs").glob("history-rank*.json")) == [
        f"history-rank{r}.json" for r in trained
    ]
    for record in histories:
        assert len(record["loss"]) == 3
        assert_falls(record["loss"], f"{backend} rank {record['rank']}")
    if len(trained) > 1:  # synchronous data parallelism: one model on every rank
        assert_same_training(histories, size=len(trained))
    if backend == "ps":
        assert histories[0]["role"] == "chief"
        assert "stopping: the chief finished" in (run_dir / "logs/rank3.log").read_text()
    assert_no_process_left(run_dir)


@pytest.mark.slow
@pytest.mark.slurm
@needs_slurm
def test_mwms_slurm_two_nodes(tmp_path: Path) -> None:
    run_dir = completed(
        tmp_path,
        "compute=slurm",
        "compute.nodes=2",
        f"entry.script={DIGITS_DISTRIBUTED}",
        "backend=mwms",
        "trainer.epochs=3",
        "trainer.steps_per_epoch=10",
    )
    histories = [read_json(run_dir / f"outputs/history-rank{r}.json") for r in (0, 1)]
    assert_same_training(histories, size=2)
    assert_on_separate_hosts(run_dir, ["node1", "node2"])
    shown = re.search(r"TF_CONFIG=(\{.*\})", (run_dir / "logs/rank1.log").read_text())
    assert shown and json.loads(shown.group(1))["cluster"]["worker"][0].split(":")[0] == node_address("node1")
    assert_no_process_left(run_dir)


CHIEF_KILLED = """\
import os, signal
import tensorflow as tf

strategy = tf.distribute.ParameterServerStrategy(tf.distribute.cluster_resolver.TFConfigClusterResolver())
print("CLUSTER UP", flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no exception, no exit code, no chief-done: only the heartbeat stops
"""


@pytest.mark.slow
@pytest.mark.slurm
@needs_slurm
def test_ps_slurm_servers_stop_when_the_chief_dies_hard(tmp_path: Path) -> None:
    """On Slurm a lost ps task must not end the step, so a SIGKILLed chief leaves its servers up:
    they stop on their own once its heartbeat is older than backend.chief_timeout_s."""
    write(tmp_path / "chief_killed.py", CHIEF_KILLED)
    result = run_tfrun(
        tmp_path,
        "compute=slurm",
        "compute.nodes=2",
        "compute.tasks_per_node=2",
        "entry.script=chief_killed.py",
        "backend=ps",
        "backend.chief_timeout_s=12",
        timeout=RUN_TIMEOUT,
    )
    assert result.returncode == 1, result.stderr
    run_dir = run_dir_from(result.stderr)
    status = read_json(run_dir / "status.json")
    assert status["state"] == "FAILED" and status["failed_rank"] == 0, status
    assert "CLUSTER UP" in (run_dir / "logs/rank0.log").read_text()
    for rank, who in PS_ROLES.items():
        log = (run_dir / f"logs/rank{rank}.log").read_text()
        assert f"tfrun: {who} stopping: no heartbeat from the chief for 12 s" in log, log[-1500:]
        assert read_json(run_dir / f"ranks/{rank}.json")["exit_code"] == 0
    assert_no_process_left(run_dir)


# --- How a task's process ends ------------------------------------------------------------------

# In every process of a run (a sitecustomize): an exit handler that records that the process ran
# its exit handlers, and an object, kept by a module, whose finalizer only the interpreter's
# teardown would call, that records that the process went through it.
_EXIT_NOTED = """import atexit, os

_DIR = os.environ["TEST_EXIT_DIR"]


def _note(what):  # the rank as it is at the end (a task started ahead learns it later)
    with open(os.path.join(_DIR, f"{what}-{os.environ.get('TFRUN_RANK', 'x')}"), "w") as f:
        f.write(what)


class _NotedAtTeardown:
    def __del__(self):
        _note("teardown")


atexit.register(_note, "handlers")
kept_until_teardown = _NotedAtTeardown()
"""


@pytest.mark.slow
def test_a_server_task_ends_past_the_interpreters_teardown(tmp_path: Path) -> None:
    """A parameter server or ps worker ends, once its records are written, without the
    interpreter's teardown: TensorFlow's gRPC server can abort the process there (SIGABRT,
    "FATAL: exception not rethrown"), and a run whose servers did their work failed. Every
    task ends so, the chief that runs the script too; each runs its exit handlers first."""
    hook, noted = tmp_path / "hook", tmp_path / "noted"
    hook.mkdir()
    noted.mkdir()
    (hook / "sitecustomize.py").write_text(_EXIT_NOTED)
    result = run_tfrun(
        tmp_path,
        f"entry.script={DIGITS_DISTRIBUTED}",
        "backend=ps",
        "compute.tasks_per_node=4",
        "trainer.epochs=1",
        "trainer.steps_per_epoch=5",
        timeout=RUN_TIMEOUT,
        PYTHONPATH=str(hook),
        TEST_EXIT_DIR=str(noted),
    )
    assert result.returncode == 0, f"{result.stderr[-4000:]}\n{result.stdout[-4000:]}"
    run_dir = run_dir_from(result.stderr)
    tasks = sorted(p.name for p in noted.iterdir() if not p.name.endswith("-x"))  # tfrun's own processes
    assert tasks == [f"handlers-{rank}" for rank in range(4)], tasks
    status = read_json(run_dir / "status.json")
    assert status["exit_codes"] == {"0": 0, "1": 0, "2": 0, "3": 0}, status


# A script that is done, but whose process would be aborted by the interpreter's teardown, as a
# task's with TensorFlow loaded was seen to be ("terminate called ... FATAL: exception not
# rethrown", SIGABRT), which no script can provoke on demand. It leaves an exit handler and a
# thread still at work, which must both have their turn before the task ends.
ABORTED_AT_TEARDOWN = """\
import atexit, os, threading, time
import aborts_at_teardown  # a library's module state, torn down only at the interpreter's exit

out = os.environ["TFRUN_OUTPUT_DIR"]


def write(name):
    with open(os.path.join(out, name), "w") as f:
        f.write("ran")


def later():
    time.sleep(1.0)
    write("thread")


atexit.register(write, "handler")
threading.Thread(target=later).start()
print("SCRIPT DONE", flush=True)
"""

ABORTS_AT_TEARDOWN = """\
import os


class _AbortsAtTeardown:
    def __del__(self, abort=os.abort):  # bound now: the module's globals are gone by then
        abort()


kept = _AbortsAtTeardown()
"""


@pytest.mark.parametrize("target", ["local", pytest.param("slurm", marks=pytest.mark.slurm)])
def test_a_task_that_did_its_work_is_not_failed_by_the_interpreters_teardown(
    tmp_path: Path, target: str, request: pytest.FixtureRequest
) -> None:
    """A run whose script completed once ended FAILED, its rank "killed by SIGABRT" after the
    script's last line: the process died in the interpreter's teardown. Every task now ends
    after its exit handlers and its threads, past the teardown (tfrun.task.ending)."""
    (tmp_path / "aborts_at_teardown.py").write_text(ABORTS_AT_TEARDOWN)
    script = tmp_path / "done.py"
    script.write_text(ABORTED_AT_TEARDOWN)
    args = [f"entry.script={script}"]
    if target == "slurm":
        args += ["compute=slurm", f"compute.job_name={request.getfixturevalue('job_name')}"]
    run_dir = completed(tmp_path, *args)
    assert "SCRIPT DONE" in (run_dir / "logs/rank0.log").read_text()
    assert read_json(run_dir / "status.json")["exit_codes"] == {"0": 0}
    assert (run_dir / "outputs/handler").read_text() == "ran", "the script's exit handler did not run"
    assert (run_dir / "outputs/thread").read_text() == "ran", "the task ended before the script's thread"
