"""One place for each name: a run dir's files are spelled only in tfrun/paths.py, tfrun's
environment variables only in tfrun/variables.py. Every other module asks them, so a file or
a variable is renamed in one place and no reader is left behind."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.helpers import REPO

SOURCES = sorted([*(REPO / "tfrun").rglob("*.py"), *(REPO / "launchers").rglob("*.py")])


def _file_names() -> set[str]:
    """The file names tfrun/paths.py spells (the literals it joins to a run or sweep dir)."""
    tree = ast.parse((REPO / "tfrun" / "paths.py").read_text())
    names = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
             and re.fullmatch(r"[\w.\-]+\.(json|jsonl|lock|log|db|journal)|cancel-requested", node.value)}
    assert {"plan.json", "status.json", "sweep.json", "metrics.jsonl", "cancel-requested"} <= names, names
    return names


def _literals(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def test_a_run_dirs_files_are_named_only_in_paths() -> None:
    names = _file_names()
    found = [f"{path.relative_to(REPO)}:{line}: {value!r}" for path in SOURCES if path.name != "paths.py"
             for line, value in _literals(path) if value in names]
    assert not found, "spell these through tfrun.paths (RunPaths, SweepPaths):\n" + "\n".join(found)


def test_tfrun_variables_are_named_only_in_variables() -> None:
    found = [f"{path.relative_to(REPO)}:{line}: {value!r}" for path in SOURCES if path.name != "variables.py"
             for line, value in _literals(path) if re.fullmatch(r"TFRUN_[A-Z0-9_]+", value)]
    assert not found, "name these through tfrun.variables:\n" + "\n".join(found)
