"""The local cluster's nodes are separate hosts, and what a cluster's network does to a job.

scripts/local-slurm gives every node its own network namespace (its own address on a
bridge, its own loopback), its own hostname and its own /etc/hosts. These tests check the
cluster is that, then break one node's network the ways real clusters are broken: its own
name resolving to loopback there (Debian's 127.0.1.1), its name not resolving while it
has several addresses, and a firewall that drops the ports the tasks use between two
nodes. tfrun either works (publishing the node's real address) or fails before training
with an error naming the nodes, the address and the port. Those tests break the network of
nodes of their own (``network_nodes``: no other test's jobs run there).
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import textwrap
from pathlib import Path
from typing import Iterator

import pytest

from tests.helpers import (
    SLURM_STATE,
    NodePair,
    assert_on_separate_hosts,
    node_address,
    read_json,
    run_dir_from,
    run_tfrun,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

RUN_TIMEOUT = 300

# Two workers reduce their rank + 1: the sum is 3 on both only if they really met.
MWMS_SUM = """\
import os
import tensorflow as tf

strategy = tf.distribute.MultiWorkerMirroredStrategy()
value = strategy.run(lambda: tf.constant(float(os.environ["TFRUN_RANK"]) + 1.0))
total = float(strategy.reduce("SUM", value, axis=None))
with open(os.path.join(os.environ["TFRUN_OUTPUT_DIR"], "sum-rank" + os.environ["TFRUN_RANK"]), "w") as f:
    f.write(str(total))
print("REDUCED", total, flush=True)
"""
# Horovod's allreduce of rank + 1 over Gloo: 3 on both ranks only if they really met.
HOROVOD_SUM = """\
import os
import horovod.tensorflow as hvd
import tensorflow as tf

hvd.init()
total = float(hvd.allreduce(tf.constant(float(hvd.rank() + 1)), op=hvd.Sum))
with open(os.path.join(os.environ["TFRUN_OUTPUT_DIR"], "sum-rank" + os.environ["TFRUN_RANK"]), "w") as f:
    f.write(str(total))
"""
STARTED = """\
import os
open(os.path.join(os.environ["TFRUN_OUTPUT_DIR"], "script-ran-rank" + os.environ["TFRUN_RANK"]), "w").close()
"""


def in_node(node: str, *command: str) -> str:
    """Run a command in a node's network namespace (as root, like scripts/local-slurm)."""
    return subprocess.run(
        ["nsenter", f"--net=/run/netns/tfrun-{node}", *command], check=True, capture_output=True, text=True, timeout=30
    ).stdout


@contextlib.contextmanager
def node_hosts(node: str, edit: callable) -> Iterator[None]:
    """Change one node's own /etc/hosts for the test (written in place: the node reads it
    through a bind mount)."""
    path = SLURM_STATE / "hosts" / node
    before = path.read_text()
    path.write_text(edit(before))
    try:
        yield
    finally:
        path.write_text(before)


@contextlib.contextmanager
def extra_address(node: str, address: str) -> Iterator[None]:
    in_node(node, "ip", "addr", "add", f"{address}/24", "dev", "eth0")
    try:
        yield
    finally:
        in_node(node, "ip", "addr", "del", f"{address}/24", "dev", "eth0")


def slurm_ports() -> str:
    """slurmd's port and srun's range: what a firewall between nodes leaves open for Slurm."""
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    srun = re.search(r"^SrunPortRange\s*=\s*(\d+)-(\d+)", config, re.M)
    slurmd = re.search(r"^SlurmdPort\s*=\s*(\d+)", config, re.M)
    assert srun and slurmd, "scripts/local-slurm sets SrunPortRange so that tests can firewall the rest"
    return f"{slurmd.group(1)}, {srun.group(1)}-{srun.group(2)}"


@contextlib.contextmanager
def firewall(node: str, peer: str) -> Iterator[None]:
    """``node`` cannot open connections to ``peer``, but for Slurm's own ports."""
    table = "tfrun-test-firewall"
    in_node(node, "nft", "add", "table", "inet", table)
    try:
        in_node(node, "nft", "add", "chain", "inet", table, "out", "{ type filter hook output priority 0; }")
        in_node(
            node,
            "nft",
            "add",
            "rule",
            "inet",
            table,
            "out",
            "ct",
            "state",
            "new",
            "ip",
            "daddr",
            node_address(peer),
            "tcp",
            "dport",
            "!=",
            "{ " + slurm_ports() + " }",
            "drop",
        )
        yield
    finally:
        in_node(node, "nft", "delete", "table", "inet", table)


def script(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# --- the cluster --------------------------------------------------------------------------------


def test_every_node_is_a_host_of_its_own(tmp_path: Path, network_nodes: NodePair) -> None:
    """A pair of nodes (the network tests' own: other tests' jobs do not hold them) each says it
    is itself: hostname, Slurm's node name, its address on eth0, no other host's interfaces."""
    out = subprocess.run(
        [
            "srun",
            f"--partition={network_nodes.partition}",
            "-N2",
            "--ntasks-per-node=1",
            "sh",
            "-c",
            "echo $(hostname) $SLURMD_NODENAME $(ip -4 -o addr show eth0 | awk '{print $4}') "
            "$(ls /sys/class/net | xargs | tr ' ' ,) $(getent hosts $(hostname) | awk '{print $1}')",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    rows = sorted(line.split() for line in out.splitlines())
    assert [r[:2] for r in rows] == [[node, node] for node in network_nodes.nodes], out
    for name, _, cidr, links, resolved in rows:
        assert cidr == f"{node_address(name)}/24" and resolved == node_address(name), out
        assert links == "eth0,lo", f"{name} sees another host's interfaces: {links}"
    assert node_address(network_nodes.first) != node_address(network_nodes.second)


def test_every_node_answers_ssh_as_itself() -> None:
    """Launchers that start ranks over ssh (horovodrun, mpirun) reach each node's own sshd."""
    key = SLURM_STATE / "ssh" / "id_ed25519"
    for node in ("node1", "node2"):
        out = subprocess.run(
            [
                "ssh",
                "-i",
                str(key),
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "LogLevel=ERROR",
                node,
                "echo $(hostname) $(ip -4 -o addr show eth0 | awk '{print $4}')",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == [node, f"{node_address(node)}/24"], out.stdout


# --- distributed paths across hosts (Horovod, ps and mwms are in test_backends/test_faults) -----


def test_packed_sweep_points_span_two_hosts(tmp_path: Path) -> None:
    """Two points of a packed sweep, each a 2-node mwms job step in one allocation."""
    train = script(tmp_path, "reduce.py", MWMS_SUM)
    result = run_tfrun(
        tmp_path,
        "-m",
        "compute=slurm",
        "compute.nodes=2",
        "compute.pack_size=2",
        "compute.poll_s=1",
        "backend=mwms",
        f"entry.script={train}",
        "trainer.x=1,2",
        timeout=2 * RUN_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    sweep = next((tmp_path / "runs").glob("sweep-*"))
    points = sorted(p for p in sweep.iterdir() if (p / "plan.json").exists())
    assert len(points) == 2 and len({read_json(p / "status.json")["job_ids"][-1] for p in points}) == 1
    for point in points:
        assert [(point / f"outputs/sum-rank{r}").read_text() for r in (0, 1)] == ["3.0", "3.0"]
        assert_on_separate_hosts(point, ["node1", "node2"])
        assert read_json(point / "status.json")["nodes"] == "node[1-2]"  # the point's own allocation


# --- a cluster's network, broken ------------------------------------------------------------------


@pytest.mark.parametrize("backend, text", [("horovod", HOROVOD_SUM), ("mwms", MWMS_SUM)])
def test_a_node_whose_name_means_loopback_there_still_publishes_its_address(
    tmp_path: Path, backend: str, text: str, network_nodes: NodePair
) -> None:
    """Debian maps a machine's own name to 127.0.1.1: the first node's name is then loopback on
    that node only. Publishing what the name resolves to there would send the second node to its
    own loopback."""
    first = network_nodes.first
    train = script(tmp_path, "reduce.py", text)
    loopback = lambda text: re.sub(rf"^\S+\s+{first}\b", f"127.0.1.1 {first}", text, flags=re.M)  # noqa: E731
    with node_hosts(first, loopback):
        result = run_tfrun(
            tmp_path,
            "compute=slurm",
            f"compute.partition={network_nodes.partition}",
            "compute.nodes=2",
            f"backend={backend}",
            f"entry.script={train}",
            "backend.rendezvous_timeout_s=60",
            timeout=RUN_TIMEOUT,
        )
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = run_dir_from(result.stderr)
    assert_on_separate_hosts(run_dir, network_nodes.nodes)
    why = read_json(run_dir / "ranks/0.json")["address_why"]
    assert f"{first} resolves to 127.0.1.1" in why and node_address(first) in why, why
    assert [(run_dir / f"outputs/sum-rank{r}").read_text() for r in (0, 1)] == ["3.0", "3.0"]


def test_a_name_that_does_not_resolve_on_a_node_with_two_addresses_is_named(
    tmp_path: Path, network_nodes: NodePair
) -> None:
    first = network_nodes.first
    started = script(tmp_path, "started.py", STARTED)
    unknown = lambda text: "".join(
        line
        for line in text.splitlines(keepends=True)  # noqa: E731
        if not re.match(rf"^\S+\s+{first}\b", line)
    )
    with node_hosts(first, unknown), extra_address(first, "10.88.0.111"):
        result = run_tfrun(
            tmp_path,
            "compute=slurm",
            f"compute.partition={network_nodes.partition}",
            "compute.nodes=2",
            "backend=mwms",
            f"entry.script={started}",
            "backend.rendezvous_timeout_s=30",
            timeout=RUN_TIMEOUT,
        )
    assert result.returncode == 1, result.stderr[-3000:]
    run_dir = run_dir_from(result.stderr)
    error = read_json(run_dir / "ranks/0.json")["error"]
    for words in (
        f"cannot tell which address of {first} the other nodes reach",
        f"{first} does not resolve here",
        node_address(first),
        "10.88.0.111",
        "backend.iface",
    ):
        assert words in error, error
    assert f"rank 0 on {first} failed" in result.stderr and f"cannot tell which address of {first}" in result.stderr
    assert not list((run_dir / "outputs").glob("script-ran-*")), "the script ran although the network was wrong"


def test_a_port_the_firewall_drops_between_two_nodes_is_named(tmp_path: Path, network_nodes: NodePair) -> None:
    first, second = network_nodes.nodes
    started = script(tmp_path, "started.py", STARTED)
    with firewall(second, first):
        result = run_tfrun(
            tmp_path,
            "compute=slurm",
            f"compute.partition={network_nodes.partition}",
            "compute.nodes=2",
            "backend=mwms",
            f"entry.script={started}",
            "backend.rendezvous_timeout_s=15",
            timeout=RUN_TIMEOUT,
        )
    assert result.returncode == 1, result.stderr[-3000:]
    run_dir = run_dir_from(result.stderr)
    task0 = read_json(next((run_dir / "rendezvous").glob("*/task-0.json")))
    error = read_json(run_dir / "ranks/1.json")["error"]
    assert (
        f"worker 1 (task 1) on {second} cannot reach worker 0 (task 0) on {first} at "
        f"{node_address(first)}:{task0['port']}"
    ) in error, error
    assert read_json(run_dir / "status.json")["failed_rank"] == 1
    assert not list((run_dir / "outputs").glob("script-ran-*")), "the script ran although the network was wrong"
