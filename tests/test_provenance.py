"""Where each attempt came from (tfrun/tracking/provenance.py, ``tfrun status --full``) and
``tfrun tensorboard SWEEP`` (tfrun/tracking/board.py): real runs of tiny scripts, no TensorFlow
import in them (they write TensorBoard events with TensorBoard's protobufs)."""

from __future__ import annotations

import importlib.metadata
import json
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import free_port, read_json, run_dir_from, run_tfrun, scratch_env, stop, tfrun_command, wait_for

pytestmark = pytest.mark.slow

# TensorBoard's event file format by hand: TensorBoard's own writers import TensorFlow (~10 s).
EVENTS = """
import argparse, os, struct, time
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary

TABLE = []
for i in range(256):
    c = i
    for _ in range(8):
        c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    TABLE.append(c)

def masked_crc(data):
    c = 0xFFFFFFFF
    for byte in data:
        c = TABLE[(c ^ byte) & 0xFF] ^ (c >> 8)
    c ^= 0xFFFFFFFF
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF

p = argparse.ArgumentParser(); p.add_argument("--x", type=float); p.add_argument("--y"); a = p.parse_args()
folder = os.path.join(os.environ["TFRUN_RUN_DIR"], "tensorboard")
os.makedirs(folder, exist_ok=True)
with open(os.path.join(folder, "events.out.tfevents.%d.test" % time.time()), "wb") as f:
    events = [Event(wall_time=time.time(), file_version="brain.Event:2")]
    events += [Event(wall_time=time.time(), step=s, summary=Summary(value=[Summary.Value(tag="score", simple_value=a.x * s)]))
               for s in range(3)]
    for event in events:
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        f.write(header + struct.pack("<I", masked_crc(header)) + data + struct.pack("<I", masked_crc(data)))
import tfrun
for s in range(4):  # values of a custom loop: tfrun tensorboard converts them
    tfrun.log_metric("custom", a.x + s, s)
"""


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git repo with a committed script, then changed and not committed (and a new file)."""
    path = tmp_path_factory.mktemp("repo")
    git(path, "init", "-q")
    git(path, "config", "user.email", "test@example.com")
    git(path, "config", "user.name", "test")
    (path / "train.py").write_text('print("training")\n')
    (path / "events.py").write_text(EVENTS)
    git(path, "add", ".")
    git(path, "commit", "-q", "-m", "first")
    (path / "train.py").write_text('print("training, changed")\n')
    (path / "notes.txt").write_text("not tracked\n")
    return path


def provenance_of(run_dir: Path) -> dict:
    [attempt] = read_json(run_dir / "attempts.json").values()
    return read_json(run_dir / "provenance" / f"{attempt['attempt']}.json")


@pytest.mark.slow
def test_local_run_records_commit_diff_packages_and_host(tmp_path: Path, repo: Path) -> None:
    # The runs dir in the repo, as ./tfrun-runs is by default: the run's own dir is no change.
    result = run_tfrun(tmp_path, "entry.script=train.py", cwd=repo, TFRUN_RUNS_DIR=str(repo / "tfrun-runs"))
    assert result.returncode == 0, result.stderr
    run_dir = run_dir_from(result.stderr)
    prov = provenance_of(run_dir)
    assert prov["git"]["commit"] == git(repo, "rev-parse", "HEAD").strip()
    assert prov["git"]["dirty"] and prov["git"]["untracked"] == ["notes.txt"]
    diff = (run_dir / prov["git"]["diff_file"]).read_text()
    assert '+print("training, changed")' in diff and '-print("training")' in diff
    packages = (run_dir / prov["packages"]["file"]).read_text().splitlines()
    assert f"tensorflow=={importlib.metadata.version('tensorflow')}" in packages
    assert len(packages) == prov["packages"]["count"] > 20
    assert prov["hosts"] == [socket.gethostname()] and prov["job_id"] is None
    assert prov["source_dir"] == str(repo) and prov["python"]["executable"]

    full = run_tfrun(tmp_path, "status", str(run_dir), "--full")
    assert full.returncode == 0, full.stderr
    assert f"commit: {prov['git']['commit']} dirty ({run_dir / prov['git']['diff_file']}), 1 untracked" in full.stdout
    assert f"hosts: {socket.gethostname()}" in full.stdout and "slurm job: -" in full.stdout
    assert f"packages: {len(packages)} ({run_dir / prov['packages']['file']})" in full.stdout
    assert "commit:" not in run_tfrun(tmp_path, "status", str(run_dir)).stdout


def _dist(site: Path, name: str, version: str) -> None:
    info = site / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n\nA package.\n")


def test_the_package_list_is_read_again_once_a_package_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tfrun.tracking import provenance

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    site = tmp_path / "site"
    site.mkdir()
    _dist(site, "alpha", "1.0")
    assert provenance.packages([str(site)]) == ("alpha==1.0",)
    [kept] = (tmp_path / "cache" / "tfrun" / "packages").iterdir()
    assert kept.read_text() == "alpha==1.0\n"
    assert provenance.packages([str(site)]) == ("alpha==1.0",)  # from the cache
    _dist(site, "Beta", "2.0")  # installed
    assert provenance.packages([str(site)]) == ("alpha==1.0", "Beta==2.0")
    (site / "alpha-1.0.dist-info").rename(site / "alpha-1.1.dist-info")  # upgraded (its METADATA too)
    (site / "alpha-1.1.dist-info" / "METADATA").write_text("Name: alpha\nVersion: 1.1\n\n")
    assert provenance.packages([str(site)]) == ("alpha==1.1", "Beta==2.0")
    other = tmp_path / "other"
    other.mkdir()
    _dist(other, "alpha", "9.0")  # earlier on the path: it wins, as for imports
    assert provenance.packages([str(other), str(site)]) == ("alpha==9.0", "Beta==2.0")
    monkeypatch.setattr(provenance, "KEPT_LISTS", 2)  # the newest lists are kept
    provenance.packages([str(other)])
    assert len(list((tmp_path / "cache" / "tfrun" / "packages").iterdir())) == 2


def test_a_dir_outside_git_records_no_commit(tmp_path: Path) -> None:
    from tfrun.tracking import provenance

    prov = provenance.collect("a1", str(tmp_path), ["h"], None)
    assert prov.git.commit is None and not prov.git.dirty
    provenance.write(tmp_path, prov)
    record = provenance.read(tmp_path, "a1")
    assert record is not None and record["git"]["diff_file"] is None and record["hosts"] == ["h"]
    assert not (tmp_path / "provenance" / "a1.diff").exists()


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_run_on_two_nodes_records_both_hosts_and_the_job(tmp_path: Path, repo: Path) -> None:
    result = run_tfrun(
        tmp_path, "compute=slurm", "compute.nodes=2", "compute.poll_s=1", "entry.script=train.py", cwd=repo, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = run_dir_from(result.stderr)
    prov = provenance_of(run_dir)
    assert prov["hosts"] == ["node1", "node2"]
    assert prov["job_id"] == read_json(run_dir / "status.json")["job_ids"][-1]
    full = run_tfrun(tmp_path, "status", str(run_dir), "--full").stdout
    assert f"hosts: node1,node2  slurm job: {prov['job_id']}" in full


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, repo: Path) -> Path:
    """A 2-point local sweep over trainer.x (trainer.y is the same in both)."""
    tmp_path = tmp_path_factory.mktemp("sweep")
    result = run_tfrun(tmp_path, "-m", "entry.script=events.py", "trainer.x=0.5,2", "trainer.y=same", cwd=repo)
    assert result.returncode == 0, result.stderr[-3000:]
    return next((tmp_path / "runs").glob("sweep-*"))


@pytest.mark.slow
def test_tensorboard_command_names_each_run_by_its_parameter(tmp_path: Path, sweep: Path) -> None:
    result = run_tfrun(tmp_path, "tensorboard", str(sweep), "--port", "6123", "--print-command", TMPDIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    command = result.stdout.split()
    assert command[1:3] == ["-m", "tensorboard.main"] and command[-4:] == ["--host", "127.0.0.1", "--port", "6123"]
    links = Path(command[command.index("--logdir") + 1])
    assert links.parent == tmp_path
    assert {p.name: p.resolve() for p in links.iterdir()} == {
        "trainer.x=0.5": sweep / "0" / "tensorboard",
        "trainer.x=2": sweep / "1" / "tensorboard",
    }


@pytest.mark.slow
def test_tensorboard_serves_the_sweep(tmp_path: Path, sweep: Path) -> None:
    port = free_port()
    err = tmp_path / "tensorboard.err"
    with open(err, "w") as ferr:
        proc = subprocess.Popen(
            [*tfrun_command(), "tensorboard", str(sweep), "--port", str(port)],
            cwd=tmp_path,
            env=scratch_env(tmp_path, TMPDIR=str(tmp_path)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=ferr,
        )
    try:

        def runs() -> list[str]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=2) as answer:
                    return sorted(json.loads(answer.read()))
            except OSError:
                assert proc.poll() is None, err.read_text()
                return []

        # Each run's own events, and its tfrun.log_metric values converted (TensorFlow's import: ~10 s).
        wait_for(
            lambda: runs() == ["trainer.x=0.5", "trainer.x=0.5/metrics", "trainer.x=2", "trainer.x=2/metrics"],
            90,
            "TensorBoard to list both runs and their logged values",
        )
        query = urllib.parse.urlencode({"run": "trainer.x=2/metrics", "tag": "custom"})

        def points() -> list[tuple[int, float]]:
            # TensorBoard lists a run when it finds its directory and reads its events later, in its
            # reload loop: until then the tag is unknown (404).
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?{query}", timeout=10
                ) as answer:
                    return [(step, value) for _, step, value in json.loads(answer.read())]
            except urllib.error.HTTPError as error:
                assert error.code == 404, error
                return []

        wait_for(lambda: len(points()) == 4, 60, "TensorBoard to read the run's logged values")
        assert points() == [(0, 2.0), (1, 3.0), (2, 4.0), (3, 5.0)]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        finally:
            stop(proc)
    # TensorBoard ended with tfrun, and its dir of links is gone.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                break
        time.sleep(0.2)
    else:
        pytest.fail("TensorBoard still answers after tfrun was stopped")
    assert not list(tmp_path.glob("tfrun-tensorboard-*"))


def test_tensorboard_on_a_path_that_is_no_run(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = run_tfrun(tmp_path, "tensorboard", str(tmp_path / "empty"))
    assert result.returncode == 2
    assert f"{tmp_path / 'empty'} is neither a run dir nor a sweep dir" in result.stderr
