"""The documentation stays true: it builds with ``mkdocs build --strict``, its generated
reference matches the code, and every command of the Quickstart runs as written.

The Quickstart's fenced ``bash`` blocks run in order in one bash session (so ``cd`` and
files written by one block carry to the next), in a scratch dir with TFRUN_RUNS_DIR
set. An HTML comment right before a block tags it (it does not show in the site):

- no tag: run by the local test;
- ``<!-- test: both -->``: run by the local and the Slurm test (setup both need);
- ``<!-- test: slurm -->``: run by the Slurm test only, against the local cluster;
- ``checkout``: run in the tfrun checkout these tests belong to, not the scratch dir.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from tests.helpers import REPO, private_venv, scratch_env, tfrun_command

QUICKSTART = REPO / "docs" / "quickstart.md"
_TAG = re.compile(r"^<!--\s*test:\s*([\w\s]+?)\s*-->$")


def bash_blocks(markdown: str) -> list[tuple[set[str], str]]:
    """(tags, code) of every fenced bash block, in page order."""
    blocks, lines, i = [], markdown.splitlines(), 0
    previous = ""
    while i < len(lines):
        line = lines[i]
        if line.strip() == "```bash":
            match = _TAG.match(previous.strip())
            end = lines.index("```", i + 1)
            blocks.append((set(match.group(1).split()) if match else set(), "\n".join(lines[i + 1:end])))
            i, previous = end + 1, ""
            continue
        if line.strip():
            previous = line
        i += 1
    return blocks


def quickstart_script(kind: str) -> str:
    """The Quickstart's commands for the ``local`` or the ``slurm`` test, as one bash script."""
    parts = ["set -euo pipefail", "set -x"]
    for tags, code in bash_blocks(QUICKSTART.read_text()):
        wanted = ("both" in tags or "slurm" in tags) if kind == "slurm" else "slurm" not in tags
        if not wanted:
            continue
        if "checkout" in tags:
            code = f"(\ncd {shlex.quote(str(REPO))}\n{code}\n)"
        parts.append(code)
    return "\n".join(parts) + "\n"


@contextlib.contextmanager
def checkout_lock() -> Iterator[None]:
    """`pip install -e .` writes build files into the checkout: one test at a time does it."""
    path = Path(tempfile.gettempdir()) / f"tfrun-docs-checkout-{hashlib.sha256(bytes(REPO)).hexdigest()[:8]}.lock"
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def run_quickstart(tmp_path: Path, kind: str, timeout: float) -> subprocess.CompletedProcess[str]:
    script = tmp_path / f"quickstart-{kind}.sh"
    script.write_text(quickstart_script(kind))
    env = scratch_env(tmp_path)
    # `tfrun` and `pip` are those of a venv of the test's own over the one running the tests: the
    # Quickstart's `pip install -e .` goes there, not under the other tests running meanwhile.
    env["PATH"] = os.pathsep.join([str(private_venv(tmp_path / "venv")), env.get("PATH", "")])
    try:
        with checkout_lock():
            return subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=timeout)
    finally:
        runs = tmp_path / "runs"
        if runs.is_dir():  # nothing may be left queued or running when a command failed
            for entry in runs.iterdir():
                if entry.is_dir():
                    subprocess.run([*tfrun_command(), "cancel", str(entry)], env=env, capture_output=True,
                                   timeout=120)


def _explain(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n--- stdout (tail)\n{result.stdout[-4000:]}\n--- stderr (tail)\n{result.stderr[-6000:]}"


def test_quickstart_blocks_are_tagged_sensibly() -> None:
    blocks = bash_blocks(QUICKSTART.read_text())
    assert blocks, "the Quickstart has no bash blocks"
    known = {"both", "slurm", "checkout"}
    for tags, code in blocks:
        assert tags <= known, f"unknown test tag(s) {tags - known} before:\n{code}"
    assert any("slurm" in t for t, _ in blocks) and any(not t for t, _ in blocks)


def test_reference_is_up_to_date() -> None:
    result = subprocess.run([sys.executable, str(REPO / "docs" / "gen_reference.py"), "--check"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{result.stderr}\nrun: python docs/gen_reference.py"


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "quickstart" / "index.html").is_file()
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text()
    assert "tfrun.api.launch" in api, "mkdocstrings rendered no API"


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_quickstart_local(tmp_path: Path) -> None:
    result = run_quickstart(tmp_path, "local", timeout=1100)
    assert result.returncode == 0, _explain(result)
    assert "COMPLETED" in result.stderr


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.alone  # `scripts/local-slurm start` restarts the cluster where its configuration has changed
@pytest.mark.timeout(1200)
def test_quickstart_slurm(tmp_path: Path) -> None:
    result = run_quickstart(tmp_path, "slurm", timeout=1100)
    assert result.returncode == 0, _explain(result)
    assert re.search(r"tfrun: submitted job \d+", result.stderr), _explain(result)
