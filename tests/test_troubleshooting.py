"""docs/troubleshooting.md's errors are the ones tfrun gives: each row of "Before anything
starts" is made to happen here, as a user would meet it, and its message must match the row's
(``...`` in a row stands for any text). A row added without a way to make it happen fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import REPO, run_tfrun

PAGE = REPO / "docs" / "troubleshooting.md"
SCRIPT = "entry.script=train.py"

# Row (the start of its message) -> the command line that makes it happen.
MADE = {
    "compute=slurmm is not an option": ["compute=slurmm", SCRIPT],
    "compute.partition is not a key": ["compute.partition=debug", SCRIPT],
    "compute.additional_parameters is not a key": ["compute.additional_parameters.foo=1", SCRIPT],
    "compute.nodes='two'": ["compute.nodes=two", SCRIPT],
    "trainer.cfg=": ["trainer.cfg={a: 1}", SCRIPT],
    "entry.script='train.py'": ["entry.script=train.py", "entry.source_dir=."],  # run where there is none
    "entry.source_dir=": ["entry.source_dir=/nonexistent", SCRIPT],
    "compute.tasks_per_node=0": ["compute.tasks_per_node=0", SCRIPT],
    "compute.gpus_per_node=3": ["compute.gpus_per_node=3", "compute.tasks_per_node=2", SCRIPT],
    "backend=ps with worker_count=2": ["backend=ps", SCRIPT],
    "backend.chief_timeout_s=": ["backend=ps", "compute.tasks_per_node=4", "backend.chief_timeout_s=5", SCRIPT],
    "backend.controller='mpi'": ["backend=horovod", "backend.controller=mpi", SCRIPT],
    "export.opset=5": ["export=onnx", "export.opset=5", SCRIPT],
    "deps.pip_packages=[]": ["deps=pip", SCRIPT],
    "deps=conda needs": ["deps=conda", "deps.conda_packages=[numpy]", SCRIPT],
    "deps=modules: there is no": ["deps=modules", "deps.modules=[cuda]", SCRIPT],
    "deps.runtime=apptainer": ["deps=container", "deps.image=docker://python:3.11", "deps.runtime=apptainer", SCRIPT],
    "deps.image='/nope.sif'": ["deps=container", "deps.image=/nope.sif", SCRIPT],
    "deps.cache_dir=": ["deps=pip", "deps.pip_packages=[tabulate]", "deps.cache_dir=/proc/nonexistent", SCRIPT],
    "entry.python=": ["entry.python=/nonexistent/python3", SCRIPT],
    "Slurm rejected the job": ["compute=slurm", "compute.partition=nope", SCRIPT],
}
# Rows this machine cannot show, and why.
NOT_HERE = {
    "backend=horovod needs Horovod": "Horovod is installed here (the test command builds it)",
    "export=onnx needs tf2onnx": "the onnx extra is installed here (tests/test_verbs.py hides it for the verbs)",
    "deps=pip (...): building environment": "it needs a package index to fail against; nothing is downloaded in tests",
    "deps=pip builds its environment with uv": "uv is installed here",
}


def rows() -> list[str]:
    """The messages of the section's table, in page order."""
    section = PAGE.read_text().split("## Before anything starts", 1)[1].split("\n## ", 1)[0]
    return [m.group(1) for m in re.finditer(r"^\| `([^`]+)`", section, re.M)]


def _case(message: str) -> str | None:
    return next((key for key in [*MADE, *NOT_HERE] if message.startswith(key)), None)


def test_every_row_is_made_here_or_says_why_not() -> None:
    found = rows()
    assert len(found) >= 20, found
    assert [m for m in found if _case(m) is None] == [], "add a way to make these rows happen to MADE"
    assert all(any(m.startswith(k) for m in found) for k in [*MADE, *NOT_HERE]), "a case whose row is gone"


def _params() -> list:
    made = [m for m in rows() if _case(m) in MADE]
    return [
        pytest.param(m, id=m[:40], marks=[pytest.mark.slurm] if "compute=slurm" in MADE[_case(m) or ""] else [])
        for m in made
    ]


@pytest.mark.parametrize("message", _params())
def test_a_row_is_the_error_tfrun_gives(message: str, tmp_path: Path) -> None:
    case = _case(message) or ""
    if case != "entry.script='train.py'":  # that row's script is the one not there
        (tmp_path / "train.py").write_text("print('trained')\n")
    result = run_tfrun(tmp_path, *MADE[case], timeout=120)
    errors = [line for line in result.stderr.splitlines() if line.startswith("tfrun: error: ")]
    assert result.returncode == 2 and len(errors) == 1, result.stdout + result.stderr
    assert "trained" not in result.stdout and "Traceback" not in result.stderr
    shown = errors[0].removeprefix("tfrun: error: ").replace("`", "")
    pattern = ".*".join(re.escape(part.strip()) for part in message.split("..."))
    assert re.match(pattern, shown), f"the page says:\n  {message}\ntfrun says:\n  {shown}"
