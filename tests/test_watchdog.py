"""The watchdog's notion of progress, piece by piece: which ranks it judges and when a run is
hung (pure logic over heartbeats), what a process's activity is (measured on real processes
and threads), and the lost-node probe (ranks' ports on this machine, nodes' addresses from the local cluster)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

from tfrun.task import probe as probe_module
from tfrun.task import watchdog
from tfrun.task.probe import NodeProbe

T = 20.0
NOW = 1_000_000.0


def beat(
    ago: float,
    *,
    active_ago: float | None = None,
    stepping: bool = False,
    phase: str = "script running",
    step: int | None = None,
) -> dict:
    """A rank's heartbeat: its last beat ``ago`` s before NOW, its script's last CPU use
    ``active_ago`` s before (None: not measured)."""
    return {
        "progressed": NOW - ago,
        "active": None if active_ago is None else NOW - active_ago,
        "stepping": stepping,
        "phase": phase,
        "step": step,
        "host": "n",
    }


def test_a_rank_that_waits_is_not_hung_while_another_works() -> None:
    beats = {0: beat(300, active_ago=1), 1: beat(300, active_ago=300)}
    assert watchdog.stalled(beats, ["worker", "worker"], T, NOW, since=NOW - 400) == []


def test_no_rank_progressing_is_a_hang() -> None:
    beats = {0: beat(300, active_ago=30), 1: beat(300, active_ago=300)}
    assert watchdog.stalled(beats, ["worker", "worker"], T, NOW, since=NOW - 400) == [0, 1]


def test_a_silent_script_that_computes_is_not_hung() -> None:
    """No beat since the script started (it never calls tfrun), but its CPU is in use."""
    beats = {0: beat(3000, active_ago=2)}
    assert watchdog.stalled(beats, ["worker"], T, NOW, since=NOW - 3000) == []


def test_while_a_rank_reports_steps_its_steps_are_its_progress() -> None:
    """A rank that reports steps and spins without one (a retry loop, a livelock) is judged by its
    steps; once its loop ended, by its activity again."""
    spinning = beat(60, active_ago=0, stepping=True, step=5)
    assert watchdog.stalled({0: spinning}, ["worker"], T, NOW, since=NOW - 400) == [0]
    assert watchdog.where(spinning) == "since step 5"
    assert watchdog.stalled({0: {**spinning, "stepping": False}}, ["worker"], T, NOW, since=NOW - 400) == []


def test_a_rank_never_heard_from_counts_from_the_watchdogs_start() -> None:
    assert watchdog.stalled({0: beat(1, active_ago=1)}, ["worker", "worker"], T, NOW, since=NOW - 400) == []
    assert watchdog.stalled({0: beat(30, active_ago=30)}, ["worker", "worker"], T, NOW, since=NOW - 400) == [0, 1]


def test_servers_ended_ranks_and_unmeasured_ranks_are_not_judged() -> None:
    roles = ["chief", "serves", "worker", "worker"]
    beats = {
        0: beat(300, active_ago=300),
        1: beat(300, active_ago=300, phase="serving"),
        2: beat(300, active_ago=300, phase="ended"),
        3: beat(300),
    }
    assert watchdog.stalled(beats, roles, T, NOW, since=NOW - 400) == [0]
    assert "cannot be read" in watchdog.unwatched(beats[3], "worker")
    assert watchdog.unwatched(beats[0], "chief") is None
    # nothing judged, nothing hung
    assert watchdog.stalled({0: beat(300)}, ["worker"], T, NOW, since=NOW - 400) == []


def test_a_parameter_server_evaluator_is_judged_only_once_training_has_ended() -> None:
    roles = ["chief", "serves", "serves", "evaluator"]
    waiting = beat(3000, active_ago=3000)  # between two checkpoints
    training = {0: beat(1, active_ago=1), 3: waiting}
    assert watchdog.stalled(training, roles, T, NOW, since=NOW - 4000) == []
    assert "not judged while training goes on" in watchdog.unwatched(waiting, "evaluator")
    stuck_chief = {0: beat(300, active_ago=300), 3: beat(1, active_ago=1)}
    # the evaluator's work is not training's
    assert watchdog.stalled(stuck_chief, roles, T, NOW, since=NOW - 4000) == [0]
    trained = {0: beat(300, phase="ended", active_ago=300), 3: waiting}
    assert watchdog.stalled(trained, roles, T, NOW, since=NOW - 4000) == [3]


def test_a_refused_requeue_ends_the_run_as_the_hang() -> None:
    from tfrun import rundir

    hang = {
        "rank": 1,
        "host": "node2",
        "reason": "rank 1 on node2 made no progress since step 5 (12 s)",
        "requeued": False,
        "requeue_failed": "Requested operation is presently disabled for job 7",
    }
    fields = rundir.settled_hang(hang, "CANCELLED")
    assert fields["state"] == "FAILED" and fields["failed_rank"] == 1, fields
    assert fields["reason"] == (
        "hang: rank 1 on node2 made no progress since step 5 (12 s); not requeued: "
        "Requested operation is presently disabled for job 7"
    ), fields
    assert rundir.settled_hang({**hang, "requeued": True, "requeue_failed": None}, "CANCELLED") == {}


# --- a process's activity, measured on real threads and processes ---------------------------------

# Each case runs on the main thread for WINDOW_S, and says when its set-up is done; then a thread of
# tfrun's samples the middle of the rest (as the heartbeat's thread does).
ACTIVITY = textwrap.dedent("""\
    import json, subprocess, sys, threading, time
    from tfrun.task.activity import Activity

    WINDOW_S = 1.2
    activity = Activity()

    def spin(seconds):
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    def spent(case):
        ready, found = threading.Event(), []
        def sample():
            ready.wait()
            time.sleep(0.15)
            activity.sample()
            time.sleep(WINDOW_S - 0.5)
            found.append(activity.sample())
        sampler = threading.Thread(target=sample, name="tfrun-sampler")
        sampler.start()
        case(ready.set)
        sampler.join()
        return found[0]

    def sleeping(ready):
        ready()
        time.sleep(WINDOW_S)

    def computing(ready):
        ready()
        spin(WINDOW_S)

    def in_thread(name=None):
        def case(ready):
            t = threading.Thread(target=spin, args=(WINDOW_S,), name=name)
            t.start()
            ready()
            t.join()
        return case

    child = subprocess.Popen([sys.executable, "-c", "import time\\nend = time.time() + 60\\nwhile time.time() < end: pass"])
    time.sleep(0.5)
    seen = {"a child that computes": spent(sleeping)}
    activity.ignore(child.pid)
    seen["an ignored child"] = spent(sleeping)
    child.kill()
    child.wait()
    spent(sleeping)  # the ended child's CPU, into what the next cases start from
    seen.update({
        "sleeping": spent(sleeping),
        "computing": spent(computing),
        "the script's thread": spent(in_thread()),
        "tfrun's thread": spent(in_thread("tfrun-something")),
    })
    print(json.dumps(seen))
""")


def test_activity_is_the_cpu_of_the_script_not_of_tfrun() -> None:
    out = subprocess.run([sys.executable, "-c", ACTIVITY], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen == {
        "sleeping": False,
        "computing": True,
        "tfrun's thread": False,
        "the script's thread": True,
        "a child that computes": True,
        "an ignored child": False,
    }, seen


# --- the lost-node probe --------------------------------------------------------------------------


def node_addr(node: str) -> str:
    out = subprocess.run(["scontrol", "-o", "show", "node", node], capture_output=True, text=True, timeout=30).stdout
    return dict(w.split("=", 1) for w in out.split() if "=" in w)["NodeAddr"]


@pytest.mark.slurm
def test_the_probe_asks_each_node_where_slurm_says_it_is() -> None:
    """Each node at its NodeAddr; a node whose name does not resolve is unknown, never lost."""
    probe = NodeProbe(["node1", "node2", "no-such-node.invalid"])
    assert probe.addresses == {"node1": node_addr("node1"), "node2": node_addr("node2")}, probe.addresses
    assert probe.see({2: {"rank": 2, "host": "no-such-node.invalid", "probe_port": 4242}}) == []
    assert probe.unknown == {"no-such-node.invalid": "its address no-such-node.invalid does not resolve"}
    assert probe.targets == {} and probe.lost(time.time() + 3600) == []


@contextlib.contextmanager
def silent_port() -> Iterator[int]:
    """A port on this machine whose connections time out, as a node cut off the network: a
    listener never accepting, its queue (of one) full."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            yield port


def free_port() -> int:
    """A port nothing listens on: connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def loopback_probe(*nodes: str) -> NodeProbe:
    probe = NodeProbe([])
    probe.nodes, probe.addresses = list(nodes), {node: "127.0.0.1" for node in nodes}
    return probe


def test_a_rank_answers_the_probe_on_its_port_and_its_node_is_watched_from_its_first_answer() -> None:
    """listen() answers connections on every address, while the rank runs; a node is watched
    once a rank of it is seen to answer, through each of its ranks; a node whose first rank
    does not answer (a firewall) is unknown, never lost."""
    ports = [probe_module.listen(), probe_module.listen()]
    for port in ports:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
    if socket.has_dualstack_ipv6():
        with socket.create_connection(("::1", ports[0]), timeout=2):
            pass
    with silent_port() as silent:
        probe = loopback_probe("a", "b")
        found = probe.see(
            {
                0: {"rank": 0, "host": "a", "probe_port": ports[0]},
                1: {"rank": 1, "host": "a", "probe_port": ports[1]},
                2: {"rank": 2, "host": "b", "probe_port": silent},
                3: {"rank": 3, "host": "elsewhere", "probe_port": ports[0]},
            }
        )
        assert found == [f"node a at 127.0.0.1, rank 0 on port {ports[0]}"], found
        assert probe.targets == {"a": [("127.0.0.1", ports[0]), ("127.0.0.1", ports[1])]}, probe.targets
        assert probe.unknown == {"b": f"rank 2 at 127.0.0.1:{silent} did not answer when it started"}, probe.unknown
        assert probe.see({0: {"rank": 0, "host": "a", "probe_port": ports[0]}}) == []  # seen once


def test_a_node_is_lost_only_while_another_answers() -> None:
    """A node whose ranks stay silent while another node answers is lost after LOST_S; a rank
    whose port is refused has ended, but its node is there; when no node answers (this node
    cut off) no node's loss can be told; a node answers while one of its ranks does."""
    answering, ended = probe_module.listen(), free_port()
    with silent_port() as silent:
        probe = loopback_probe()
        probe.targets = {
            "up": [("127.0.0.1", answering)],
            "ended": [("127.0.0.1", ended)],
            "gone": [("127.0.0.1", silent)],
        }
        now = time.time()
        assert probe.lost(now) == [] and probe.lost(now + probe_module.LOST_S + 1) == ["gone"]
        probe.silent = {"gone": time.time() - probe_module.LOST_S - 1}  # silent long enough already
        assert probe.confirm() == ["gone"]
        probe.targets = {"up": [("127.0.0.1", silent), ("127.0.0.1", answering)], "gone": [("127.0.0.1", silent)]}
        probe.silent = {}
        assert probe.lost(now) == [] and probe.lost(now + probe_module.LOST_S + 1) == ["gone"]
        probe = loopback_probe()
        probe.targets = {"a": [("127.0.0.1", silent)], "b": [("127.0.0.1", silent)]}
        assert probe.lost(now) == [] and probe.lost(now + 3600) == [] and probe.confirm() == []


# A process forked from a warm one (a pool's item, a local sweep's point) that computes on its
# main thread: its Activity is made there, as the bootstrap makes it.
FORKED = textwrap.dedent("""\
    import os, sys, time
    from tfrun.task.activity import Activity

    pid = os.fork()
    if pid == 0:
        activity = Activity()
        activity.sample()
        end = time.perf_counter() + 0.5
        while time.perf_counter() < end:
            pass
        os._exit(0 if activity.sample() else 3)
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status))
""")


def test_activity_of_a_forked_process_is_its_own_main_threads() -> None:
    """Python 3.11 keeps the parent's thread id as a forked child's main thread id: the CPU of
    a pool item's script went unseen, and a script busy in Python was taken for a hang."""
    out = subprocess.run([sys.executable, "-c", FORKED], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"the forked process's computing was not seen (exit {out.returncode}): {out.stderr}"


# A script busy in Python (it holds the GIL between its releases) in a process of many threads
# (TensorFlow's pools): tfrun's thread samples its activity. Each take of the GIL waits for the
# busy thread's switch interval, made long here as on a loaded machine.
GIL_BUSY = textwrap.dedent("""\
    import json, sys, threading, time
    from tfrun.task.activity import Activity

    sys.setswitchinterval(0.05)
    idle = threading.Event()
    for _ in range(100):
        threading.Thread(target=idle.wait, daemon=True).start()
    activity = Activity()
    took, found = [], []

    def sample():
        for _ in range(4):
            time.sleep(0.3)
            start = time.monotonic()
            found.append(activity.sample())
            took.append(time.monotonic() - start)

    sampler = threading.Thread(target=sample, name="tfrun-sampler")
    sampler.start()
    end = time.monotonic() + 40
    while sampler.is_alive() and time.monotonic() < end:
        pass
    idle.set()
    print(json.dumps({"took": took, "found": found}))
""")


def test_a_script_busy_in_python_is_seen_at_once_among_many_threads() -> None:
    """Seen from one read of its own thread's CPU: reading every thread's took a handoff of the
    GIL per file, seconds a sample under load (the heartbeat unwritten as long, and a healthy
    rank ended as hung)."""
    out = subprocess.run([sys.executable, "-c", GIL_BUSY], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert len(seen["found"]) == 4 and all(seen["found"][1:]), seen
    assert max(seen["took"][1:]) < 1.0, seen
