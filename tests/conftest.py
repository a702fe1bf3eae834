"""Fixtures shared by the tests."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


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
