"""The suite's own scheduling (tests/conftest.py): the groups of tests that must share a worker
do, when the suite runs in parallel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def made_once_for_the_module() -> str:
    return "made once"


@pytest.mark.parametrize("n", range(4))
def test_a_user_of_a_module_fixture(made_once_for_the_module: str, n: int) -> None:
    """Trivial on its own: the next test runs these four in a parallel session of their own."""
    assert made_once_for_the_module == "made once"


def test_tests_that_share_a_module_fixture_run_on_one_worker(tmp_path: Path) -> None:
    """Each worker re-reads the command line, where the controller's ``--dist loadgroup`` (set by
    the conftest) is not: the workers named no test by its group, and a group's tests went to
    every worker (the node pairs' tests then waited on each other's locks)."""
    timeline = tmp_path / "timeline.txt"
    env = {**os.environ, "TEST_FILE_TIMES": "1", "TEST_TIMELINE": str(timeline)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-n",
            "2",
            "-p",
            "no:cacheprovider",
            "--basetemp",
            str(tmp_path / "basetemp"),
            f"{Path(__file__).relative_to(ROOT)}::test_a_user_of_a_module_fixture",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    workers = {line.split()[2] for line in timeline.read_text().splitlines()}
    assert len(timeline.read_text().splitlines()) == 4 and len(workers) == 1, timeline.read_text()
