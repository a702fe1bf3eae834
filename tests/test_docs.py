"""The documentation stays true: it builds with ``mkdocs build --strict``, its generated
reference matches the code, every command of README.md, the Quickstart and the guides runs as
written and does what the page says (``tests/doc_pages.py``: how a page marks what its commands
need and print).

Each page is a test of its own (``local``, and ``slurm`` for its commands that need a cluster),
in a project dir of its own, so pages can run side by side.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import doc_pages
from tests.helpers import REPO

PARTS = doc_pages.page_parts()


def _id(part: tuple[Path, str]) -> str:
    return f"{part[0].relative_to(REPO)}-{part[1]}"


def test_every_page_marks_its_commands_sensibly() -> None:
    """Markers parse (an unknown directive, a skip without a reason, an ``exit for`` that names
    no command fail here), every command that is not run says why, and placeholders are few."""
    for page in doc_pages.PAGES:
        for block in doc_pages.blocks(page):
            assert block.commands, f"{block.where}: a bash block without a command"
            for command in block.commands:
                assert command.text.strip()
    assert {k for _, k in PARTS} == {"local", "slurm"}
    assert doc_pages.matches(
        ["tfrun: serving .../model.onnx at http://127.0.0.1:8080", "...", "end"],
        ["tfrun: serving /x/model.onnx at http://127.0.0.1:8080", "a", "b", "end", "more"],
    )
    assert not doc_pages.matches(["tfrun: run ... COMPLETED"], ["noise", "tfrun: run x COMPLETED"])


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("part", [p for p in PARTS if p[1] == "local"], ids=_id)
def test_page_commands_run_as_written(part: tuple[Path, str], tmp_path: Path) -> None:
    doc_pages.run_page(part[0], "local", tmp_path / "project")


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("part", [p for p in PARTS if p[1] == "slurm"], ids=_id)
def test_page_commands_run_as_written_on_slurm(part: tuple[Path, str], tmp_path: Path) -> None:
    doc_pages.run_page(part[0], "slurm", tmp_path / "project")


def test_reference_is_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "docs" / "gen_reference.py"), "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{result.stderr}\nrun: python docs/gen_reference.py"


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "quickstart" / "index.html").is_file()
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text()
    assert "tfrun.api.launch" in api, "mkdocstrings rendered no API"
