"""Pure tests of the backends' plans: roles, TF_CONFIG templates, variables and compose-time errors.

No training process is started: plans come from the same composition ``tfrun`` uses, the
errors from ``tfrun --dry-run`` as a user types it, and the in-task ``setup`` of the
TF_CONFIG and Horovod backends is driven in this process with a fake task identity.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import run_tfrun
from tfrun.backends import horovod, mwms, ps, tfconfig
from tfrun.config.compose import normalize_overrides
from tfrun.errors import BootstrapError
from tfrun.plan import Plan
from tfrun.plan.planner import compose_plans
from tfrun.task import network, rendezvous
from tfrun.task.identity import TaskIdentity, local_identity

ATTEMPT = "unit-test"


def plan_for(*overrides: str) -> Plan:
    """The single plan ``tfrun OVERRIDES`` would run."""
    plans = compose_plans(normalize_overrides(list(overrides)))
    assert len(plans) == 1
    return plans[0]


def placeholders(*ranks: int) -> list[str]:
    return [f"{{host_{r}}}:{{port_{r}}}" for r in ranks]


def slurm_identity(rank: int, nodes: int, tasks_per_node: int) -> TaskIdentity:
    """What srun would give rank ``rank`` of nodes x tasks_per_node on node1..nodeN."""
    return TaskIdentity(
        rank=rank,
        local_rank=rank % tasks_per_node,
        world_size=nodes * tasks_per_node,
        local_world_size=tasks_per_node,
        node_index=rank // tasks_per_node,
        num_nodes=nodes,
        hostnames=tuple(f"node{i + 1}" for i in range(nodes)),
        launcher="slurm",
    )


@pytest.fixture
def attempt(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fixed rendezvous attempt, so the test can publish what other tasks would."""
    monkeypatch.setenv("TFRUN_ATTEMPT", ATTEMPT)
    return ATTEMPT


@pytest.fixture
def listener() -> Iterator[int]:
    """A port on 127.0.0.1 that accepts connections (a stand-in for rank 0's server)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections: bound but never listening, for the whole test
    (a port closed again could be taken meanwhile by another test's process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


# --- ps: roles and TF_CONFIG of every task --------------------------------------------

PS_CLUSTER = {"chief": placeholders(0), "worker": placeholders(1, 2), "ps": placeholders(3)}


def test_ps_roles_chief_workers_ps(scratch: Path) -> None:
    plan = plan_for("backend=ps", "compute.tasks_per_node=4")
    assert [(t.rank, t.role, t.role_index, t.runs_script) for t in plan.tasks] == [
        (0, "chief", 0, True),
        (1, "worker", 0, False),
        (2, "worker", 1, False),
        (3, "ps", 0, False),
    ]
    assert [t.env["TFRUN_ROLE"] for t in plan.tasks] == ["chief", "worker", "worker", "ps"]


def test_ps_tf_config_of_every_task(scratch: Path) -> None:
    plan = plan_for("backend=ps", "compute.tasks_per_node=4")
    assert [t.tf_config for t in plan.tasks] == [
        {"cluster": PS_CLUSTER, "task": {"type": "chief", "index": 0}, "environment": "cloud"},
        {"cluster": PS_CLUSTER, "task": {"type": "worker", "index": 0}, "environment": "cloud"},
        {"cluster": PS_CLUSTER, "task": {"type": "worker", "index": 1}, "environment": "cloud"},
        {"cluster": PS_CLUSTER, "task": {"type": "ps", "index": 0}, "environment": "cloud"},
    ]


def test_ps_with_evaluator_and_more_servers(scratch: Path) -> None:
    plan = plan_for(
        "backend=ps",
        "backend.worker_count=3",
        "backend.parameter_server_count=2",
        "backend.evaluator=true",
        "compute.nodes=7",
    )
    assert [(t.role, t.role_index, t.runs_script) for t in plan.tasks] == [
        ("chief", 0, True),
        ("worker", 0, False),
        ("worker", 1, False),
        ("worker", 2, False),
        ("ps", 0, False),
        ("ps", 1, False),
        ("evaluator", 0, True),
    ]
    # The evaluator is not part of the training cluster; it learns the cluster from TF_CONFIG.
    cluster = {"chief": placeholders(0), "worker": placeholders(1, 2, 3), "ps": placeholders(4, 5)}
    assert plan.tasks[6].tf_config == {
        "cluster": cluster,
        "task": {"type": "evaluator", "index": 0},
        "environment": "cloud",
    }
    assert plan.tasks[5].tf_config == {"cluster": cluster, "task": {"type": "ps", "index": 1}, "environment": "cloud"}
    assert [t.node_index for t in plan.tasks] == list(range(7))


def test_ps_on_slurm_two_nodes_keeps_going_without_a_worker(scratch: Path) -> None:
    plan = plan_for("backend=ps", "compute=slurm", "compute.nodes=2", "compute.tasks_per_node=2")
    assert [(t.role, t.node_index, t.local_rank) for t in plan.tasks] == [
        ("chief", 0, 0),
        ("worker", 0, 1),
        ("worker", 1, 0),
        ("ps", 1, 1),
    ]
    assert plan.tasks[3].tf_config == {
        "cluster": PS_CLUSTER,
        "task": {"type": "ps", "index": 0},
        "environment": "cloud",
    }
    # A lost worker must not end the Slurm step; other backends stop every rank at once.
    assert "--kill-on-bad-exit=0" in plan.request["srun"]
    assert "--kill-on-bad-exit=1" in plan_for("backend=mwms", "compute=slurm", "compute.nodes=2").request["srun"]


# --- mwms and horovod -------------------------------------------------------------------


def test_mwms_every_task_is_a_worker(scratch: Path) -> None:
    plan = plan_for("backend=mwms", "compute.nodes=2", "compute.tasks_per_node=2")
    cluster = {"worker": placeholders(0, 1, 2, 3)}
    assert [(t.role, t.role_index, t.runs_script) for t in plan.tasks] == [("worker", i, True) for i in range(4)]
    assert [t.tf_config for t in plan.tasks] == [
        {"cluster": cluster, "task": {"type": "worker", "index": i}, "environment": "cloud"} for i in range(4)
    ]
    assert all(t.env["TF_USE_LEGACY_KERAS"] == "1" and t.env["TFRUN_BACKEND"] == "mwms" for t in plan.tasks)


def test_horovod_tasks_have_no_tf_config_and_use_legacy_keras(scratch: Path) -> None:
    plan = plan_for("backend=horovod", "compute.tasks_per_node=2")
    assert [(t.role, t.role_index, t.runs_script, t.tf_config) for t in plan.tasks] == [
        ("worker", 0, True, None),
        ("worker", 1, True, None),
    ]
    for task in plan.tasks:
        assert task.env["TF_USE_LEGACY_KERAS"] == "1"
        assert task.env["TFRUN_BACKEND"] == "horovod"
        # Horovod's variables depend on where the task lands: the bootstrap sets them.
        assert not [k for k in task.env if k.startswith("HOROVOD_")]
    assert plan.config["backend"] == {
        "name": "horovod",
        "legacy_keras": True,
        "rendezvous_timeout_s": 300.0,
        "controller": "gloo",
        "iface": None,
        "check_size": True,
    }


@pytest.mark.parametrize("backend", ["none", "ps", "mwms", "horovod"])
def test_backend_name_reaches_every_task(scratch: Path, backend: str) -> None:
    plan = plan_for(f"backend={backend}", "compute.tasks_per_node=4")
    assert {t.env["TFRUN_BACKEND"] for t in plan.tasks} == {backend}
    assert all(("TF_USE_LEGACY_KERAS" in t.env) == (backend != "none") for t in plan.tasks)
    assert all((t.tf_config is not None) == (backend in ("ps", "mwms")) for t in plan.tasks)


def test_legacy_keras_can_be_turned_off(scratch: Path) -> None:
    plan = plan_for("backend=mwms", "backend.legacy_keras=false", "compute.tasks_per_node=2")
    assert not any("TF_USE_LEGACY_KERAS" in t.env for t in plan.tasks)


# --- TF_CONFIG with real addresses ------------------------------------------------------


def test_tf_config_with_an_address_map() -> None:
    roles = [("chief", 0, True), ("worker", 0, False), ("worker", 1, False), ("ps", 0, False), ("evaluator", 0, True)]
    address = {0: "node1:2001", 1: "node1:2002", 2: "node2:3001", 3: "node2:3002", 4: "node3:1"}
    cluster = {"chief": ["node1:2001"], "worker": ["node1:2002", "node2:3001"], "ps": ["node2:3002"]}
    assert tfconfig.tf_config(roles, 2, address) == {
        "cluster": cluster,
        "task": {"type": "worker", "index": 1},
        "environment": "cloud",
    }
    assert tfconfig.tf_config(roles, 4, address) == {
        "cluster": cluster,
        "task": {"type": "evaluator", "index": 0},
        "environment": "cloud",
    }
    assert tfconfig.cluster(roles) == {"chief": placeholders(0), "worker": placeholders(1, 2), "ps": placeholders(3)}


def test_resolve_builds_tf_config_from_what_tasks_published(scratch: Path, attempt: str) -> None:
    """TF_CONFIG names addresses (what each task published), not node names. (Across
    nodes, tests/test_backends.py runs this on the cluster's separate hosts.)"""
    plan = plan_for("backend=ps", "compute=slurm", "compute.tasks_per_node=4")
    for rank, port in {0: 5000, 1: 5001, 3: 5003}.items():
        rendezvous.publish(plan.run_dir, f"task-{rank}", {"host": "node1", "addr": "127.0.0.1", "port": port})
    ident = slurm_identity(2, nodes=1, tasks_per_node=4)
    env = ps.setup(plan.config["backend"], ident, plan.run_dir, plan.tasks[2], plan)

    mine = json.loads((rendezvous.directory(plan.run_dir, attempt) / "task-2.json").read_text())
    assert mine["host"] == "node1" and mine["addr"] == "127.0.0.1"  # one host: the tasks meet on loopback
    assert json.loads(env["TF_CONFIG"]) == {
        "cluster": {
            "chief": ["127.0.0.1:5000"],
            "worker": ["127.0.0.1:5001", f"127.0.0.1:{mine['port']}"],
            "ps": ["127.0.0.1:5003"],
        },
        "task": {"type": "worker", "index": 1},
        "environment": "cloud",
    }
    assert env["GRPC_FAIL_FAST"] == "use_caller"


def test_resolve_names_the_tasks_that_never_published(scratch: Path, attempt: str) -> None:
    plan = plan_for("backend=mwms", "compute.tasks_per_node=3", "backend.rendezvous_timeout_s=0.3")
    rendezvous.publish(plan.run_dir, "task-0", {"host": "localhost", "addr": "127.0.0.1", "port": 5000})
    with pytest.raises(BootstrapError, match=r"timed out after 0 s waiting for the other tasks: task-2 never"):
        mwms.setup(plan.config["backend"], local_identity(1, 1, 3), plan.run_dir, plan.tasks[1], plan)


@given(published=st.floats(min_value=0, max_value=120))
def test_a_rendezvous_sees_a_peer_a_tenth_of_its_wait_after_it_published(published: float) -> None:
    """When the tasks meet, the one that waits looks again after a tenth of what it has waited
    (20 ms to 0.5 s): the first look after a peer published is at most that late, where a
    backoff that grows by half at each look sees a worker that published at 0.17 s at 0.26 s."""
    looked = 0.0
    while looked < published:
        looked += rendezvous.poll_interval(looked)
    assert looked - published <= min(0.5, max(0.02, published / 10)) + 1e-9


# --- compose-time errors, through the command line ------------------------------------

ERRORS = {
    "ps with too few tasks": (
        ["backend=ps"],
        ["backend=ps", "needs 4 tasks", "1 chief + 2 worker(s) + 1 ps", "nodes x tasks_per_node = 1"],
    ),
    "ps evaluator needs one more": (
        ["backend=ps", "backend.evaluator=true", "compute.tasks_per_node=4"],
        ["needs 5 tasks", "+ 1 evaluator", "= 4"],
    ),
    "ps with no workers": (
        ["backend=ps", "backend.worker_count=0", "compute.tasks_per_node=2"],
        ["backend.worker_count", "0", ">= 1"],
    ),
    "ps chief timeout shorter than its heartbeat": (
        ["backend=ps", "compute.tasks_per_node=4", "backend.chief_timeout_s=4"],
        ["backend.chief_timeout_s=4.0", "more than 10 s", "every 5 s"],
    ),
    "unknown horovod controller": (
        ["backend=horovod", "backend.controller=bogus"],
        ["backend.controller", "'bogus'", "gloo", "mpi"],
    ),
    "mpi without mpirun": (
        ["backend=horovod", "backend.controller=mpi"],
        ["backend.controller", "'mpi'", "mpirun is not on PATH", "backend.controller=gloo"],
    ),
    "gpus not divisible by tasks": (
        ["compute.gpus_per_node=3", "compute.tasks_per_node=2"],
        ["compute.gpus_per_node=3", "compute.tasks_per_node=2"],
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_compose_time_errors_exit_2(tmp_path: Path, case: str) -> None:
    argv, wanted = ERRORS[case]
    if case == "mpi without mpirun":
        import shutil

        if shutil.which("mpirun"):
            pytest.skip("MPI is installed here")
    result = run_tfrun(tmp_path, "--dry-run", *argv, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith("tfrun: error: ") and "Traceback" not in result.stderr
    for text in wanted:
        assert text in result.stderr, (text, result.stderr)
    assert not (tmp_path / "runs").exists()


def test_dry_run_shows_tf_config_of_every_ps_task(tmp_path: Path) -> None:
    result = run_tfrun(tmp_path, "--dry-run", "backend=ps", "compute.tasks_per_node=4", timeout=60)
    assert result.returncode == 0, result.stderr
    shown = [
        json.loads(line.split("TF_CONFIG=", 1)[1])
        for line in result.stdout.splitlines()
        if line.strip().startswith("TF_CONFIG=")
    ]
    assert [c["task"] for c in shown] == [
        {"type": "chief", "index": 0},
        {"type": "worker", "index": 0},
        {"type": "worker", "index": 1},
        {"type": "ps", "index": 0},
    ]
    assert all(c["cluster"] == PS_CLUSTER for c in shown)
    assert result.stdout.count("(serves; does not run the script)") == 3
    assert "tensorflow" not in result.stderr.lower()


# --- horovod: slots and variables for a task --------------------------------------------


def test_host_slots_local_and_slurm() -> None:
    assert horovod.host_slots(local_identity(3, nodes=2, tasks_per_node=2)) == [("localhost", 4)]
    assert horovod.host_slots(slurm_identity(3, nodes=2, tasks_per_node=2)) == [("node1", 2), ("node2", 2)]
    assert horovod.host_slots(slurm_identity(0, nodes=1, tasks_per_node=1)) == [("node1", 1)]


def test_interface_for_loopback() -> None:
    assert horovod.interface_for("127.0.0.1") == "lo"


BACKEND = {"name": "horovod", "controller": "gloo", "iface": None, "rendezvous_timeout_s": 5.0, "check_size": True}


@pytest.mark.parametrize(
    "rank, expected",
    [
        (
            3,
            {
                "HOROVOD_HOSTNAME": "node2",
                "HOROVOD_RANK": "3",
                "HOROVOD_LOCAL_RANK": "1",
                "HOROVOD_LOCAL_SIZE": "2",
                "HOROVOD_CROSS_RANK": "1",
            },
        ),
        (
            1,
            {
                "HOROVOD_HOSTNAME": "node1",
                "HOROVOD_RANK": "1",
                "HOROVOD_LOCAL_RANK": "1",
                "HOROVOD_LOCAL_SIZE": "2",
                "HOROVOD_CROSS_RANK": "0",
            },
        ),
    ],
)
def test_horovod_env_for_a_slurm_task(
    scratch: Path, attempt: str, listener: int, rank: int, expected: dict[str, str]
) -> None:
    run_dir = str(scratch / "run")
    rendezvous.publish(run_dir, "horovod", {"addr": "127.0.0.1", "port": listener})
    env = horovod.setup(BACKEND, slurm_identity(rank, nodes=2, tasks_per_node=2), run_dir, None, None)
    assert env == {
        "HOROVOD_CONTROLLER": "gloo",
        "HOROVOD_CPU_OPERATIONS": "gloo",
        "HOROVOD_GLOO_RENDEZVOUS_ADDR": "127.0.0.1",
        "HOROVOD_GLOO_RENDEZVOUS_PORT": str(listener),
        "HOROVOD_GLOO_IFACE": "lo",
        "HOROVOD_GLOO_TIMEOUT_SECONDS": "5",
        "HOROVOD_SIZE": "4",
        "HOROVOD_CROSS_SIZE": "2",
        **expected,
    }


def test_horovod_iface_from_config_wins(scratch: Path, attempt: str, listener: int) -> None:
    run_dir = str(scratch / "run")
    rendezvous.publish(run_dir, "horovod", {"addr": "127.0.0.1", "port": listener})
    env = horovod.setup({**BACKEND, "iface": "eth7"}, slurm_identity(1, 2, 1), run_dir, None, None)
    assert env["HOROVOD_GLOO_IFACE"] == "eth7" and env["HOROVOD_LOCAL_SIZE"] == "1"


def test_horovod_rank0_serves_the_rendezvous(scratch: Path, attempt: str) -> None:
    """Rank 0 starts Horovod's HTTP rendezvous (a thread here) and publishes where it is."""
    run_dir = str(scratch / "run")
    try:
        env0 = horovod.setup(BACKEND, local_identity(0, 1, 2), run_dir, None, None)
        published = json.loads((rendezvous.directory(run_dir, attempt) / "horovod.json").read_text())
        port = int(env0["HOROVOD_GLOO_RENDEZVOUS_PORT"])
        assert published == {"addr": "127.0.0.1", "port": port, "host": "localhost"}
        with socket.create_connection(("127.0.0.1", published["port"]), timeout=2):
            pass
        env1 = horovod.setup(BACKEND, local_identity(1, 1, 2), run_dir, None, None)
    finally:
        if horovod._SERVER is not None:
            horovod._SERVER.stop()
            horovod._SERVER = None
    for rank, env in enumerate((env0, env1)):
        assert env["HOROVOD_RANK"] == env["HOROVOD_LOCAL_RANK"] == str(rank)
        assert (env["HOROVOD_SIZE"], env["HOROVOD_LOCAL_SIZE"], env["HOROVOD_CROSS_SIZE"]) == ("2", "2", "1")
        assert env["HOROVOD_HOSTNAME"] == "localhost" and env["HOROVOD_CROSS_RANK"] == "0"
    assert env0["HOROVOD_GLOO_RENDEZVOUS_PORT"] == env1["HOROVOD_GLOO_RENDEZVOUS_PORT"]


def other_local_addresses() -> list[tuple[str, str]]:
    """(interface, address) of this machine's IPv4 addresses besides loopback."""
    return [
        (name, a) for name, addrs in sorted(network.interfaces().items()) for a in addrs if not network.is_loopback(a)
    ]


def refuses(address: str, port: int) -> bool:
    """Whether a connection to ``address:port`` is refused (nothing listens there)."""
    try:
        with socket.create_connection((address, port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def store_round_trip(address: str, port: int) -> bytes:
    """PUT a value in Horovod's rendezvous store and GET it back, as Gloo's ranks do."""
    conn = http.client.HTTPConnection(address, port, timeout=5)
    try:
        conn.request("PUT", "/tfrun-test/rank-0", body=b"10.0.0.1:5000")
        assert conn.getresponse().read() == b""
        conn.request("GET", "/tfrun-test/rank-0")
        return conn.getresponse().read()
    finally:
        conn.close()


def serve_as_rank0(backend: dict, ident: TaskIdentity, run_dir: str, attempt: str) -> tuple[dict, int]:
    """What rank 0's setup published, and the port; the server is stopped by the caller."""
    env = horovod.setup(backend, ident, run_dir, None, None)
    published = json.loads((rendezvous.directory(run_dir, attempt) / "horovod.json").read_text())
    assert published["port"] == int(env["HOROVOD_GLOO_RENDEZVOUS_PORT"])
    return published, int(published["port"])


@pytest.fixture
def stops_rendezvous() -> Iterator[None]:
    """Stop whatever rendezvous server the test's rank 0 started."""
    yield
    if horovod._SERVER is not None:
        horovod._SERVER.stop()
        horovod._SERVER._httpd.server_close()  # stop() leaves the socket open: free the port now
        horovod._SERVER = None


def test_horovod_rendezvous_of_a_local_run_listens_on_loopback_only(
    scratch: Path, attempt: str, stops_rendezvous: None
) -> None:
    """Horovod's own start() binds every interface: anyone reaching the node could read and
    change the store through which the ranks find each other."""
    published, port = serve_as_rank0(BACKEND, local_identity(0, 1, 2), str(scratch / "run"), attempt)
    assert published["addr"] == "127.0.0.1"
    assert store_round_trip("127.0.0.1", port) == b"10.0.0.1:5000"
    assert refuses("127.0.0.2", port)  # loopback is 127.0.0.0/8: bound to 127.0.0.1, not to every address
    for _, address in other_local_addresses():
        assert refuses(address, port), f"the rendezvous server answers on {address}"


def test_horovod_rendezvous_of_a_one_node_slurm_job_listens_on_loopback_only(
    scratch: Path, attempt: str, stops_rendezvous: None
) -> None:
    published, port = serve_as_rank0(
        BACKEND, slurm_identity(0, nodes=1, tasks_per_node=2), str(scratch / "run"), attempt
    )
    assert published == {"addr": "127.0.0.1", "port": port, "host": "node1"}
    assert store_round_trip("127.0.0.1", port) == b"10.0.0.1:5000"
    assert refuses("127.0.0.2", port)


def test_horovod_rendezvous_across_nodes_listens_on_the_published_address_only(
    scratch: Path, attempt: str, stops_rendezvous: None
) -> None:
    """Across nodes: the node's own address (here backend.iface's), which the others reach."""
    found = other_local_addresses()
    if not found:
        pytest.skip("this machine has no address but loopback")
    iface, address = found[0]
    published, port = serve_as_rank0(
        {**BACKEND, "iface": iface}, slurm_identity(0, nodes=2, tasks_per_node=1), str(scratch / "run"), attempt
    )
    assert published == {"addr": address, "port": port, "host": "node1"}
    assert store_round_trip(address, port) == b"10.0.0.1:5000"
    assert refuses("127.0.0.1", port)


def test_horovod_rank_without_rendezvous_fails_clearly(scratch: Path, attempt: str) -> None:
    with pytest.raises(BootstrapError, match=r"waiting for Horovod's rendezvous server \(rank 0\): horovod never"):
        horovod.setup({**BACKEND, "rendezvous_timeout_s": 0.3}, slurm_identity(1, 2, 1), str(scratch), None, None)


def test_horovod_unreachable_rendezvous_fails_clearly(scratch: Path, attempt: str, closed_port: int) -> None:
    port = closed_port
    rendezvous.publish(str(scratch), "horovod", {"addr": "127.0.0.1", "port": port, "host": "node1"})
    with pytest.raises(
        BootstrapError,
        match=rf"rank 1 on node2 cannot reach Horovod's rendezvous server \(rank 0, on "
        rf"node1\) at 127.0.0.1:{port}",
    ):
        horovod.setup({**BACKEND, "rendezvous_timeout_s": 0.5}, slurm_identity(1, 2, 1), str(scratch), None, None)


# --- ps: when a server stops ----------------------------------------------------------------


def test_servers_stop_when_the_chief_finished(scratch: Path, attempt: str) -> None:
    run_dir = str(scratch)
    now = time.time()
    assert ps._chief_gone(run_dir, 5.0, since=now) is None  # just started: wait for the chief
    rendezvous.publish(run_dir, "chief-heartbeat", {"time": now - 60})
    assert ps._chief_gone(run_dir, 5.0, since=now) == "no heartbeat from the chief for 5 s"
    rendezvous.publish(run_dir, "chief-heartbeat", {"time": now})
    assert ps._chief_gone(run_dir, 5.0, since=now - 60) is None
    rendezvous.publish(run_dir, "chief-done", {"exit_code": 0, "time": now})
    assert ps._chief_gone(run_dir, 5.0, since=now) == "the chief finished"


def test_servers_stop_when_the_chief_never_beat(scratch: Path, attempt: str) -> None:
    """A chief killed before its first heartbeat must not leave the servers up until the time limit."""
    assert ps._chief_gone(str(scratch), 5.0, since=time.time() - 6) == "no heartbeat from the chief for 5 s"


# --- ports -------------------------------------------------------------------------------------


def test_free_ports_avoid_the_ephemeral_range() -> None:
    """A task binds its port seconds after choosing it; outgoing connections must not take it meanwhile."""
    low, high = rendezvous.ephemeral_ports()
    ports = {rendezvous.free_port() for _ in range(50)}
    assert all(not low <= p <= high and 10000 <= p <= 65535 for p in ports), sorted(ports)
    assert len(ports) > 40  # random, not a fixed base
    with socket.socket() as s:
        s.bind(("", ports.pop()))


def test_tasks_on_one_node_never_claim_the_same_port(
    scratch: Path, attempt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two tasks that share a node and draw the same free port: the second gets another one."""
    draws = iter([31000, 31000, 31001, 31000])
    monkeypatch.setattr(rendezvous, "free_port", lambda: next(draws))
    assert rendezvous.claim_port(str(scratch), "node1") == 31000
    assert rendezvous.claim_port(str(scratch), "node1") == 31001
    assert rendezvous.claim_port(str(scratch), "node2") == 31000  # another node's ports are its own
