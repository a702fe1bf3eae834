"""Fixtures and rules shared by the tests.

The suite runs in parallel (``scripts/test``: pytest-xdist, ``--dist loadgroup``) against one
local Slurm cluster (``scripts/local-slurm``), as several users' jobs share a real one. What
keeps the tests from disturbing each other:

- a test's files are under its own ``tmp_path``; its Slurm jobs carry a name of its own
  (``job_name``), and only jobs of that name are ever cancelled;
- a test that asks for ``preempt_nodes`` or ``network_nodes`` runs on a pair of nodes that no
  other test uses (their partitions are for those tests alone): the preemption tests preempt
  whole nodes there, the network tests cut a node's link or change its ``/etc/hosts``. Each
  pair's tests run one after another, on one worker;
- a test marked ``alone`` changes the whole cluster (it restarts or reconfigures a daemon):
  while it runs, no other test that uses the cluster runs (a lock in the cluster's state dir,
  also kept by other test sessions on the same cluster); the ``alone`` tests run one after
  another, on one worker;
- tests that share a fixture of their module's own (module-scoped: a training run several
  tests look at) run one after another on one worker, so that it is made once.

The alone tests are handed out first, with a few tests that need no cluster for the other
workers meanwhile; then the longest work: the tests of those groups, the Slurm tests that
train, and the rest.
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import time
import uuid
from pathlib import Path
from typing import IO, Iterator

import pytest

from tests.helpers import LOCAL_SLURM, NETWORK_NODES, PREEMPT_NODES, SLURM_STATE, NodePair, cancel_jobs_named

# How long a test session waits, as it starts, for a cluster that another session has degraded
# for a moment (a node's link cut) before it calls the cluster down.
CLUSTER_UP_WITHIN_S = 120
PAIRS = {"preempt_nodes": PREEMPT_NODES, "network_nodes": NETWORK_NODES}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "alone: changes the whole Slurm cluster (restarts or reconfigures a daemon): "
        "runs while no other test uses the cluster",
    )
    # In parallel, however started (-n N): the groups below go to a worker whole, in the order
    # pytest_collection_modifyitems gives them (pytest-xdist's loadgroup, not reordered).
    if getattr(config.option, "numprocesses", None) and getattr(config.option, "dist", "no") in ("load", "no"):
        config.option.dist = "loadgroup"
        config.option.loadscopereorder = False
    # A worker parses the command line again, where --dist is not: told by the controller
    # (pytest_configure_node), it names each grouped test by its group as loadgroup's workers do.
    # Without this, the controller schedules every test on its own and a group's tests spread
    # over the workers, each waiting for the others' locks.
    if getattr(config, "workerinput", {}).get("tfrun_loadgroup"):
        config.option.loadgroup = True


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: object) -> None:
    """pytest-xdist's controller, for each worker it starts: whether tests go by group."""
    config = node.config  # type: ignore[attr-defined]
    node.workerinput["tfrun_loadgroup"] = config.getvalue("dist") == "loadgroup"  # type: ignore[attr-defined]


# --- which tests share what ------------------------------------------------------------------


def _module_fixtures(item: pytest.Item) -> list[str]:
    """The module-scoped fixtures of the item's own module that it uses."""
    info = getattr(item, "_fixtureinfo", None)
    found = []
    for name, defs in info.name2fixturedefs.items() if info else ():
        fixture = defs[-1]
        if (
            fixture.scope in ("module", "class")
            and fixture.baseid
            and fixture.baseid.split("::")[0] == item.nodeid.split("::")[0]
        ):
            found.append(name)
    return sorted(found)


def _group(item: pytest.Item) -> str | None:
    """The tests an item must run beside on one worker, one after another (None: any worker)."""
    if item.get_closest_marker("alone"):
        return "alone"
    for fixture, pair in PAIRS.items():
        if fixture in getattr(item, "fixturenames", ()):
            return f"nodes-{pair.partition}"
    shared = _module_fixtures(item)
    if shared:
        return f"{item.nodeid.split('::')[0]}::{'+'.join(shared)}"
    return None


def _rank(item: pytest.Item) -> int:
    """Lower first: the alone tests (before other tests' jobs are on the cluster), the tests on
    pairs of nodes (the longest groups), other groups and Slurm tests that train, the other Slurm
    tests (they mostly wait), the other tests that train, the rest."""
    slurm, slow = item.get_closest_marker("slurm") is not None, item.get_closest_marker("slow") is not None
    group = _group(item)
    if group == "alone":
        return 0
    if group in (f"nodes-{p.partition}" for p in PAIRS.values()):
        return 1
    return 2 if group or (slurm and slow) else 3 if slurm else RANK_LOCAL_TRAINING if slow else 5


RANK_LOCAL_TRAINING = 4  # _rank of a test that trains but needs no cluster


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    groups = {item.nodeid: _group(item) for item in items}
    for item in items:
        if groups[item.nodeid]:
            item.add_marker(pytest.mark.xdist_group(groups[item.nodeid]))
        if item.get_closest_marker("slurm") or item.get_closest_marker("alone"):
            item.add_marker(pytest.mark.usefixtures("cluster"))
    # A group's tests stay together, in file order, at the place of its first-ranked test.
    rank: dict[str, float] = {}
    for item in items:
        key = groups[item.nodeid] or item.nodeid
        rank[key] = min(rank.get(key, 9), _rank(item))
    # While the alone tests run first, the other workers must not wait at the turnstile: they
    # are handed tests that need no cluster (the first few that train), 3 each.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "alone" in rank:
        beside = [key for key in rank if rank[key] == RANK_LOCAL_TRAINING][: 3 * (workers - 1)]
        rank.update(dict.fromkeys(beside, 0.5))
    items.sort(key=lambda item: rank[groups[item.nodeid] or item.nodeid])
    if not config.getoption("collectonly") and any(item.get_closest_marker("slurm") for item in items):
        config.stash[_CLUSTER] = _cluster_problem()


# --- the cluster -------------------------------------------------------------------------------

_CLUSTER = pytest.StashKey[str | None]()


def _cluster_problem() -> str | None:
    """Why the local cluster cannot run the tests (None: it can). Asked once, as the session
    starts, before any of its own tests can have changed the cluster."""
    deadline = time.monotonic() + CLUSTER_UP_WITHIN_S
    while True:
        try:
            out = subprocess.run([str(LOCAL_SLURM), "status"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return (
                f"cannot ask whether the local Slurm cluster is up ({exc}); start it with `scripts/local-slurm start`"
            )
        if out.returncode == 0:
            return None
        # Every daemon up but a node not usable: another session may have cut its link for a moment.
        if (
            "nodes: not all usable" in out.stdout
            and not re.search(r"^\S+\s+down$", out.stdout, re.M)
            and time.monotonic() < deadline
        ):
            time.sleep(2)
            continue
        return (
            "the local Slurm cluster is not up: start it with `scripts/local-slurm start` (scripts/test does). "
            f"`scripts/local-slurm status` said:\n{out.stdout}{out.stderr}"
        )


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest) -> None:
    """The local cluster must be up; a missing cluster is a failure, never a skip."""
    problem = request.config.stash.get(_CLUSTER, None)
    if problem:
        pytest.fail(problem, pytrace=False)


@pytest.fixture
def job_name(request: pytest.FixtureRequest, cluster: None) -> Iterator[str]:
    """A job name no other test uses; afterwards, whatever still runs under it (or under a name
    that starts with it: a preempting job, another account's) is cancelled."""
    module = request.node.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    name = f"tfrun-{module}-{uuid.uuid4().hex[:8]}"
    yield name
    cancel_jobs_named(name)


@pytest.fixture
def preempt_nodes(cluster: None) -> NodePair:
    """node4 and node5, with partitions preempt, preempt-low and preempt-scavenge: this test's
    alone while it runs (see the module's docstring)."""
    return PREEMPT_NODES


@pytest.fixture
def network_nodes(cluster: None) -> NodePair:
    """node6 and node7, with partition network: this test's alone while it runs."""
    return NETWORK_NODES


# --- locks: a test that changes the whole cluster runs alone -----------------------------------


class ClusterLocks:
    """flock(2) locks in the cluster's state dir, shared by every test session on the cluster.

    A test that uses the cluster holds ``cluster.lock`` shared; an ``alone`` test holds it
    exclusive. Every taker passes ``turnstile.lock`` first, which an alone test keeps while it
    waits for the others to end: tests that come later wait behind it instead of overtaking it.
    A test on a pair of nodes also holds that pair's lock. The kernel drops a process's locks
    when it dies.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.files: dict[str, IO[str]] = {}
        self.held: tuple[str, ...] = ()

    def _lock(self, name: str, mode: int) -> None:
        if name not in self.files:
            self.files[name] = open(self.folder / f"tests-{name}.lock", "a")
        fcntl.flock(self.files[name], mode)

    def _unlock(self, name: str) -> None:
        fcntl.flock(self.files[name], fcntl.LOCK_UN)

    def take(self, wanted: tuple[str, ...]) -> None:
        if wanted == self.held:
            return
        self.release()
        if not wanted:
            return
        self._lock("turnstile", fcntl.LOCK_EX)
        try:
            self._lock("cluster", fcntl.LOCK_EX if "alone" in wanted else fcntl.LOCK_SH)
        finally:
            if "alone" not in wanted:
                self._unlock("turnstile")
        for pair in wanted[1:]:
            self._lock(pair, fcntl.LOCK_EX)
        self.held = wanted

    def release(self) -> None:
        for name in reversed(self.held[1:]):
            self._unlock(name)
        if self.held:
            self._unlock("cluster")
            if "alone" in self.held:
                self._unlock("turnstile")
        self.held = ()


def _locks_for(item: pytest.Item | None) -> tuple[str, ...]:
    """("alone",), or ("shared", pairs...) for a test that uses the cluster, or ()."""
    if item is None:
        return ()
    if item.get_closest_marker("alone"):
        return ("alone",)
    if not item.get_closest_marker("slurm"):
        return ()
    return (
        "shared",
        *(f"nodes-{pair.partition}" for fixture, pair in PAIRS.items() if fixture in getattr(item, "fixturenames", ())),
    )


_LOCKS = pytest.StashKey[ClusterLocks]()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Outside the test's own time (and its timeout): wait for the locks it needs."""
    locks = item.config.stash.get(_LOCKS, None)
    if locks is None and SLURM_STATE.is_dir():
        locks = item.config.stash[_LOCKS] = ClusterLocks(SLURM_STATE)
    wanted = _locks_for(item)
    if locks is not None:
        locks.take(wanted)
    try:
        yield
    finally:
        # An alone test keeps the cluster for the next one if that is alone too.
        if locks is not None and not (wanted == ("alone",) and _locks_for(nextitem) == wanted):
            locks.release()


# --- in-process tests --------------------------------------------------------------------------


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """In-process tests: cwd and TFRUN_RUNS_DIR inside tmp_path, no TFRUN_/SLURM_ vars."""
    for key in list(os.environ):
        if key.startswith(("TFRUN_", "SLURM_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("TFRUN_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.chdir(tmp_path)
    from tfrun.config import resolvers

    resolvers.reset_run_id()
    return tmp_path


@pytest.fixture(autouse=True)
def _ports_claimed_in_the_session(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Where helpers.free_port claims the ports tests' servers listen on: one folder for every
    worker of the session (xdist gives each worker a basetemp under the session's)."""
    import tests.helpers as helpers

    if helpers.PORTS_DIR is None:
        base = tmp_path_factory.getbasetemp()
        helpers.PORTS_DIR = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "ports"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config) -> None:
    """With TEST_FILE_TIMES=1 (scripts/test sets it): each test file's time, its tests'
    set-up, call and tear-down summed over every worker, longest first; what to look at when
    the suite grows slow."""
    if not os.environ.get("TEST_FILE_TIMES"):
        return
    seconds: dict[str, float] = {}
    tests: dict[str, set[str]] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            if isinstance(report, pytest.TestReport):
                name = report.nodeid.split("::")[0]
                seconds[name] = seconds.get(name, 0.0) + report.duration
                tests.setdefault(name, set()).add(report.nodeid)
    if not seconds:
        return
    if os.environ.get("TEST_TIMELINE"):
        _write_timeline(terminalreporter, Path(os.environ["TEST_TIMELINE"]))
    terminalreporter.section("time per test file (s, summed over the workers)")
    for name, spent in sorted(seconds.items(), key=lambda item: -item[1]):
        terminalreporter.write_line(f"{spent:8.0f}  {len(tests[name]):4d} tests  {name}")
    terminalreporter.write_line(f"{sum(seconds.values()):8.0f}  {sum(map(len, tests.values())):4d} tests  in all")


def _write_timeline(terminalreporter: pytest.TerminalReporter, path: Path) -> None:
    """Each test's start, end and worker, one line each (TEST_TIMELINE=FILE): the chains of a
    parallel run, and which test ended it."""
    spans: dict[str, tuple[float, float, str]] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            if isinstance(report, pytest.TestReport):
                worker = getattr(getattr(getattr(report, "node", None), "gateway", None), "id", "-")
                start, stop, _ = spans.get(report.nodeid, (report.start, report.stop, worker))
                spans[report.nodeid] = (min(start, report.start), max(stop, report.stop), worker)
    ordered = sorted(spans.items(), key=lambda item: item[1][0])
    path.write_text("".join(f"{start:.1f} {stop:.1f} {worker} {nodeid}\n" for nodeid, (start, stop, worker) in ordered))
