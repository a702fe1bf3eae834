"""The run directory's files under concurrent writers: no update lost, no half-written file."""
from __future__ import annotations

import multiprocessing
from pathlib import Path

from tfrun import rundir

WRITERS, UPDATES = 8, 200


def _writer(run_dir: str, who: int) -> None:
    for i in range(UPDATES):
        rundir.update_status(run_dir, **{f"field{who}": i, f"seen{who}_{i % 7}": True})


def test_concurrent_status_updates_lose_nothing(tmp_path: Path) -> None:
    """8 processes merge different fields into one status.json, 200 times each."""
    rundir.update_status(tmp_path, state="RUNNING")
    ctx = multiprocessing.get_context("spawn")  # separate interpreters, as the launcher, follower and verbs are
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), who)) for who in range(WRITERS)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    status = rundir.read_status(tmp_path)
    assert status["state"] == "RUNNING"
    for who in range(WRITERS):
        assert status[f"field{who}"] == UPDATES - 1, who
        assert all(status[f"seen{who}_{k}"] for k in range(7)), who
