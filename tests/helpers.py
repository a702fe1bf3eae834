"""Helpers shared by the tests: run the real ``tfrun`` command in a scratch dir, watch processes."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "examples" / "digits" / "train.py"
LOCAL_SLURM = REPO / "scripts" / "local-slurm"
# The local cluster's state dir (pid files, locks, hosts files): scripts/test sets it for a release run from its root.
SLURM_STATE = Path(os.environ.get("TFRUN_SLURM_DIR", "/var/lib/tfrun-slurm"))


def tfrun_command() -> list[str]:
    """The installed console script beside this interpreter, else ``python -m tfrun.cli``."""
    script = Path(sys.executable).with_name("tfrun")
    if script.is_file():
        return [str(script)]
    found = shutil.which("tfrun")
    return [found] if found else [sys.executable, "-m", "tfrun.cli"]


def scratch_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment a test runs tfrun in: runs land under tmp_path, TF logs are quiet."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TFRUN_", "SLURM_"))}
    env.update(TFRUN_RUNS_DIR=str(tmp_path / "runs"), TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def private_venv(folder: Path) -> Path:
    """A virtual environment of its own over the one running the tests (its packages visible, its
    own site-packages first): what a test installs there (``pip install -e .``) is not reinstalled
    under the other tests running meanwhile. Its bin dir."""
    import site
    import sysconfig

    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", str(folder)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    # --system-site-packages reaches the base interpreter's packages only, not those of a venv
    # running the tests: those are added as site dirs (their .pth files, editable installs, work).
    python = folder / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    outer = [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]
    lines = [f"import site; site.addsitedir({d!r})" for d in dict.fromkeys(outer) if Path(d).is_dir()]
    Path(purelib, "_outer_site.pth").write_text("\n".join(lines) + "\n")
    return folder / "bin"


def run_tfrun(
    tmp_path: Path, *args: str, cwd: Path | None = None, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess[str]:
    """``tfrun ARGS`` as a user runs it, from ``cwd`` (default tmp_path)."""
    return subprocess.run(
        [*tfrun_command(), *args],
        cwd=cwd or tmp_path,
        env=scratch_env(tmp_path, **env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# A sitecustomize that makes the modules named in TFRUN_TEST_HIDDEN look not installed, in every
# Python process started with it on PYTHONPATH (tfrun, its tasks, their children): their finders
# answer "not found" for those names, as they do for a package that is not there.
_HIDING = """import os
import sys

HIDDEN = frozenset(filter(None, os.environ.get("TFRUN_TEST_HIDDEN", "").split(",")))


class _Hiding:
    def __init__(self, finder):
        self._finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            return None
        return self._finder.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self._finder, attr)


sys.meta_path[:] = [_Hiding(f) if hasattr(f, "find_spec") else f for f in sys.meta_path]
"""


def without(tmp_path: Path, *modules: str) -> dict[str, str]:
    """Environment variables for :func:`run_tfrun` under which ``modules`` are not installed
    (an optional extra missing), without touching the environment itself."""
    folder = tmp_path / "hidden-modules"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(_HIDING)
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "TFRUN_TEST_HIDDEN": ",".join(modules)}


def popen_tfrun(tmp_path: Path, *args: str, name: str = "tfrun", **env: str) -> tuple[subprocess.Popen, Path, Path]:
    """Start tfrun in the background, output to ``NAME.out``/``NAME.err``; SIGINT acts as in a
    terminal (a test runner started in the background may have it ignored)."""
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    with open(out, "w") as fout, open(err, "w") as ferr:
        proc = subprocess.Popen(
            [*tfrun_command(), *args],
            cwd=tmp_path,
            env=scratch_env(tmp_path, **env),
            stdin=subprocess.DEVNULL,
            stdout=fout,
            stderr=ferr,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    return proc, out, err


def stop(proc: subprocess.Popen) -> None:
    """Kill a background tfrun the test is done with (if it is still running)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def run_dir_from(stderr: str) -> Path:
    """The run dir tfrun reported at the end of a run."""
    match = re.search(r"^tfrun: run dir (.+)$", stderr, re.M)
    assert match, f"tfrun did not say where the run went:\n{stderr}"
    return Path(match.group(1))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def alive(pid: int) -> bool:
    """True while a process exists and is not a zombie (nothing may reap orphans here)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    """Poll until predicate() is true or fail the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


# States a job or array element is still in while slurmdbd has not yet been told how it ended.
UNSETTLED_STATES = ("PENDING", "RUNNING", "REQUEUED", "RESIZING", "SUSPENDED", "COMPLETING")


def accounted(job: str, count: int = 1, timeout: float = 60) -> dict[str, str]:
    """{JobID: State} of a job (or of an array: one per element) once accounting lists `count`
    allocations and every one has ended. The controller hands records to slurmdbd asynchronously,
    so sacct may list an element that has ended as RUNNING, or not list it, for a moment."""

    def rows() -> dict[str, str]:
        out = subprocess.run(
            ["sacct", "-j", job, "-X", "-n", "-P", "-o", "JobID,State"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        return dict(line.split("|", 1) for line in out.splitlines() if "|" in line)

    wait_for(
        lambda: (
            len(found := rows()) >= count and not any(state.startswith(UNSETTLED_STATES) for state in found.values())
        ),
        timeout,
        f"accounting to list {count} ended allocation(s) of job {job}",
    )
    return rows()


def text_of(path: Path) -> str:
    """A file's text, or "" while it does not exist yet (a task's log appears when it starts)."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def wait_gone(pids: list[int], timeout: float = 10) -> list[int]:
    """The pids still alive after waiting up to timeout seconds for them to end."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def slurm_release() -> tuple[int, int]:
    """(major, minor) of the Slurm the tests run against (``scontrol --version``: ``slurm-wlm 24.11.5``)."""
    out = subprocess.run(["scontrol", "--version"], capture_output=True, text=True, timeout=60, check=True).stdout
    major, minor = out.split()[-1].split(".")[:2]
    return int(major), int(minor)


# --- the local cluster (scripts/local-slurm) ----------------------------------------------------


@dataclass(frozen=True)
class NodePair:
    """Two of the local cluster's nodes that a group of tests has to itself (tests/conftest.py):
    ``partition``'s jobs are never preempted; ``low``'s are preempted and requeued by Slurm,
    ``scavenge``'s preempted and cancelled, each by a job of ``partition`` that needs their node."""

    first: str
    second: str
    partition: str
    low: str = ""
    scavenge: str = ""

    @property
    def nodes(self) -> list[str]:
        return [self.first, self.second]

    def preempt(self, *nodes: str, job_name: str) -> str:
        """Submit a short job to ``partition`` that needs these nodes whole: Slurm preempts what
        runs there in ``low`` and ``scavenge``. Its job id."""
        out = subprocess.run(
            [
                "sbatch",
                "--parsable",
                "-p",
                self.partition,
                "--exclusive",
                f"--nodes={len(nodes)}",
                "-w",
                ",".join(nodes),
                f"--job-name={job_name}",
                "-o",
                "/dev/null",
                "--wrap",
                "sleep 2",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return out.stdout.strip()

    def preempt_and_release(self, *nodes: str, job_name: str, release: Path) -> None:
        """:meth:`preempt`, then create ``release``, the file the preempted jobs' scripts go on
        until: only once the preempting job has started, that is once they have left its nodes
        (Slurm preempts at its next scheduling pass, not as the job is submitted)."""
        preemptor = self.preempt(*nodes, job_name=job_name)
        wait_for(lambda: has_started(preemptor), 600, "the preempting job to start")
        release.touch()


def has_started(job_id: str) -> bool:
    """Has the job left Slurm's PENDING (it runs, is ending, or is gone from the queue)? Slurm
    not answering is no start."""
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        return "Invalid job id" in out.stderr
    return out.stdout.strip() not in ("", "PENDING")


PREEMPT_NODES = NodePair("node4", "node5", "preempt", "preempt-low", "preempt-scavenge")
NETWORK_NODES = NodePair("node6", "node7", "network")


def cancel_jobs_named(name: str) -> None:
    """Cancel the jobs named ``name``, or ``name-...`` (names a test made from its own)."""
    out = subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True, timeout=60).stdout
    for found in sorted({line.strip() for line in out.splitlines()}):
        if found == name or found.startswith(name + "-"):
            subprocess.run(["scancel", f"--name={found}"], capture_output=True, timeout=60)


def node_address(node: str) -> str:
    """A node's own address, as the cluster resolves its name (never loopback on it)."""
    address = socket.gethostbyname(node)
    assert not ipaddress.ip_address(address).is_loopback, f"{node} resolves to {address}: not a cluster of hosts"
    return address


def assert_on_separate_hosts(run_dir: Path, nodes: list[str]) -> None:
    """Rank r ran on nodes[r], a host of its own: that hostname, and the node's own address
    as the one it used (a task records the address it published or reached rank 0 from)."""
    assert len(set(nodes)) > 1
    for rank, node in enumerate(nodes):
        record = read_json(run_dir / f"ranks/{rank}.json")
        assert (record["host"], record["hostname"]) == (node, node), record
        assert record["address"] == node_address(node), record
    published = [
        read_json(p)
        for p in sorted((run_dir / "rendezvous").glob("*/*.json"))
        if p.name.startswith(("task-", "horovod"))
    ]
    assert published and all(p["addr"] == node_address(p["host"]) for p in published), published


# --- a real MLflow tracking server ------------------------------------------------------------

# Where free_port claims ports: one folder for the whole test session (tests/conftest.py).
PORTS_DIR: Path | None = None


def free_port(host: str = "127.0.0.1") -> int:
    """A port for a server a test starts (seconds later), claimed as tfrun's tasks claim theirs:
    outside the kernel's ephemeral range (the outgoing connections of other tests' processes
    take ports there) and by a file no other test of the session can create too."""
    from tfrun.task import rendezvous

    assert PORTS_DIR is not None, "tests/conftest.py sets helpers.PORTS_DIR"
    return rendezvous.claim_port(PORTS_DIR, host)


class MlflowServer:
    """``mlflow server`` on ``host`` (loopback, or the local cluster's bridge address so the
    nodes reach it), its store and artifacts under ``folder``; stop() and start() again keep them."""

    def __init__(self, folder: Path, host: str = "127.0.0.1"):
        self.folder, self.host, self.port = folder, host, free_port(host)
        self.uri = f"http://{host}:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> "MlflowServer":
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                self.host,
                "--port",
                str(self.port),
                "--backend-store-uri",
                f"sqlite:///{self.folder / 'server.db'}",
                "--artifacts-destination",
                str(self.folder / "server-artifacts"),
                "--workers",
                "1",
                "--allowed-hosts",
                f"{self.host}:{self.port},{self.host}",
            ],
            cwd=self.folder,
            # MLflow's job runner (Huey consumers for its own server-side jobs, which tfrun never
            # asks for) costs a few seconds of CPU at every start.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            stdout=subprocess.DEVNULL,
            stderr=open(self.folder / "server.log", "a"),
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    return self
            except OSError:
                assert time.monotonic() < deadline and self.proc.poll() is None, (
                    f"mlflow server did not start:\n{text_of(self.folder / 'server.log')}"
                )
                time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self) -> "MlflowServer":
        # `with MlflowServer(...)` and `with server.start()` alike: one server, stopped at the end.
        return self if self.proc is not None and self.proc.poll() is None else self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def mlflow_runs(uri: str) -> list[dict[str, Any]]:
    """Every run of an MLflow store, with its metric histories (steps per key), params, tags,
    artifacts: read through MLflow's client in a child process (no MLflow in the test runner)."""
    code = (
        "import json, mlflow; c = mlflow.MlflowClient(%r); out = []\n"
        "for e in c.search_experiments():\n"
        "  for r in c.search_runs([e.experiment_id]):\n"
        "    hist = {k: [(m.step, m.value) for m in c.get_metric_history(r.info.run_id, k)] for k in r.data.metrics}\n"
        "    out.append({'experiment': e.name, 'run_id': r.info.run_id, 'name': r.info.run_name,\n"
        "      'status': r.info.status, 'params': r.data.params, 'tags': r.data.tags, 'history': hist,\n"
        "      'parent': r.data.tags.get('mlflow.parentRunId'),\n"
        "      'artifacts': [a.path for a in c.list_artifacts(r.info.run_id)]})\n"
        "print(json.dumps(out))" % uri
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout))
