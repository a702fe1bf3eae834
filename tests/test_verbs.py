"""The verbs that act on runs (``tfrun runs|status|logs|cancel|...``) as a new user meets them:
which run is "the latest", what a run list shows, a rank or a path that is not there, and never
a traceback (bad input, a closed pipe, Ctrl-C, an optional extra that is not installed)."""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.helpers import run_dir_from, run_tfrun

# A script that records one metric, as a Keras fit would, in a fraction of a second.
TINY = """import sys
import tfrun
tfrun.log_metric("loss", 1.0 / len(sys.argv), step=0)
print("tiny", sys.argv[1:])
"""


def tiny_run(tmp_path: Path, *overrides: str) -> Path:
    """A completed local run of the tiny script; its run dir."""
    (tmp_path / "tiny.py").write_text(TINY)
    result = run_tfrun(tmp_path, "entry.script=tiny.py", *overrides)
    assert result.returncode == 0, result.stderr
    return run_dir_from(result.stderr)


def tiny_sweep(tmp_path: Path, *overrides: str) -> Path:
    """A completed local sweep of the tiny script over two points; its sweep dir."""
    (tmp_path / "tiny.py").write_text(TINY)
    result = run_tfrun(tmp_path, "-m", "entry.script=tiny.py", "trainer.a=1,2", *overrides)
    assert result.returncode == 0, result.stderr
    return run_dir_from(result.stderr).parent


def listed(tmp_path: Path, *args: str) -> list[str]:
    """The run ids ``tfrun runs`` lists, in its order."""
    result = run_tfrun(tmp_path, "runs", *args)
    assert result.returncode == 0, result.stderr
    return [line.split()[0] for line in result.stdout.splitlines()[1:]]


# --- which run is the latest ------------------------------------------------------------------

def test_runs_are_listed_and_found_in_the_order_they_were_launched(tmp_path: Path) -> None:
    """A sweep's points are listed where the sweep was launched, not after every single run
    (names sort a sweep last); the latest run is the one launched last, whatever verb wrote
    into an older one since (``tfrun plot`` writes its PNG into the run dir)."""
    first = tiny_run(tmp_path, "tfrun.name=first")
    time.sleep(1.1)
    sweep = tiny_sweep(tmp_path)
    time.sleep(1.1)
    last = tiny_run(tmp_path)

    order = listed(tmp_path)
    assert order == [first.name, f"{sweep.name}/0", f"{sweep.name}/1", last.name], order
    assert listed(tmp_path, "--last", "2") == [f"{sweep.name}/1", last.name]
    table = run_tfrun(tmp_path, "runs").stdout
    assert re.search(rf"^{first.name}\s+first\s+COMPLETED", table, re.M), table  # tfrun.name is shown

    plotted = run_tfrun(tmp_path, "plot", str(first), "--metric", "loss")
    assert plotted.returncode == 0, plotted.stderr
    status = run_tfrun(tmp_path, "status")
    assert status.stdout.startswith(f"run {last.name}: COMPLETED"), status.stdout

    newest = tiny_sweep(tmp_path)  # a sweep is the latest once it is launched last
    status = run_tfrun(tmp_path, "status")
    assert status.stdout.startswith(f"sweep {newest}: 2 run(s)"), status.stdout


def test_no_runs_says_where_it_looked(tmp_path: Path) -> None:
    result = run_tfrun(tmp_path, "runs")
    assert result.returncode == 0 and result.stdout == ""
    assert result.stderr.startswith(f"tfrun: no runs under {tmp_path / 'runs'}"), result.stderr


# --- logs ------------------------------------------------------------------------------------

def test_logs_of_a_rank_the_run_does_not_have_is_refused(tmp_path: Path) -> None:
    run = tiny_run(tmp_path)
    result = run_tfrun(tmp_path, "logs", "--rank", "5")
    assert result.returncode == 2, result
    assert result.stderr == f"tfrun: error: --rank 5: run {run.name} has 1 task (rank 0)\n"
    assert run_tfrun(tmp_path, "logs", "--rank", "0").stdout.rstrip().endswith("tiny []")


def test_logs_of_a_sweep_says_which_point_it_shows(tmp_path: Path) -> None:
    sweep = tiny_sweep(tmp_path)
    result = run_tfrun(tmp_path, "logs", sweep.name)
    assert result.returncode == 0, result.stderr
    assert "tiny ['--a', '1']" in result.stdout and "'2'" not in result.stdout
    assert f"{sweep} is a sweep of 2 run(s): the log of its first point, {sweep / '0'}" in result.stderr
    assert "tiny ['--a', '2']" in run_tfrun(tmp_path, "logs", f"{sweep.name}/1").stdout
