"""One place for each name: a run dir's files are spelled only in tfrun/paths.py, tfrun's
environment variables only in tfrun/variables.py, a run's states only in tfrun/states.py. Every
other module asks them, so a file, a variable or a state is renamed in one place and no reader
is left behind."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.helpers import REPO
from tfrun.states import RunState

SOURCES = sorted([*(REPO / "tfrun").rglob("*.py"), *(REPO / "launchers").rglob("*.py")])
# Another tool's own words, some spelled like a run state (Slurm's PENDING, MLflow's FAILED): they
# are written in module-level names of that tool's vocabulary (SLURM_TO_RUN_STATE, MLFLOW_FAILED).
OTHER_VOCABULARY = re.compile(r"_?(SLURM|MLFLOW|OPTUNA)_[A-Z0-9_]+")


def _file_names() -> set[str]:
    """The file names tfrun/paths.py spells (the literals it joins to a run or sweep dir)."""
    tree = ast.parse((REPO / "tfrun" / "paths.py").read_text())
    names = {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and re.fullmatch(r"[\w.\-]+\.(json|jsonl|lock|log|db|journal)|cancel-requested", node.value)
    }
    assert {"plan.json", "status.json", "sweep.json", "metrics.jsonl", "cancel-requested"} <= names, names
    return names


def _literals(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    ]


def test_a_run_dirs_files_are_named_only_in_paths() -> None:
    names = _file_names()
    found = [
        f"{path.relative_to(REPO)}:{line}: {value!r}"
        for path in SOURCES
        if path.name != "paths.py"
        for line, value in _literals(path)
        if value in names
    ]
    assert not found, "spell these through tfrun.paths (RunPaths, SweepPaths):\n" + "\n".join(found)


def test_tfrun_variables_are_named_only_in_variables() -> None:
    found = [
        f"{path.relative_to(REPO)}:{line}: {value!r}"
        for path in SOURCES
        if path.name != "variables.py"
        for line, value in _literals(path)
        if re.fullmatch(r"TFRUN_[A-Z0-9_]+", value)
    ]
    assert not found, "name these through tfrun.variables:\n" + "\n".join(found)


def _other_vocabulary(tree: ast.Module) -> tuple[set[str], set[int]]:
    """The module-level names of another tool's vocabulary, and the ids of the nodes their values hold."""
    names: set[str] = set()
    nodes: set[int] = set()
    for statement in tree.body:
        if isinstance(statement, ast.Assign):
            targets, value = statement.targets, statement.value
        elif isinstance(statement, ast.AnnAssign) and statement.value is not None:
            targets, value = [statement.target], statement.value
        else:
            continue
        found = {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        if found and all(OTHER_VOCABULARY.fullmatch(name) for name in found):
            names |= found
            # A mapping from the tool's words holds them as its keys: its values are tfrun's (RunState).
            held = [k for k in value.keys if k is not None] if isinstance(value, ast.Dict) else [value]
            nodes |= {id(node) for part in held for node in ast.walk(part)}
    return names, nodes


def test_run_states_are_spelled_only_in_states() -> None:
    words = {state.value for state in RunState}
    found, vocabulary = [], set()
    for path in SOURCES:
        if path == REPO / "tfrun" / "states.py":
            continue
        tree = ast.parse(path.read_text())
        names, allowed = _other_vocabulary(tree)
        vocabulary |= names
        found += [
            f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value in words and id(node) not in allowed
        ]
    # Slurm's and MLflow's words that are spelled like a run state are found as their own.
    assert {"SLURM_TO_RUN_STATE", "SLURM_PREEMPTED", "MLFLOW_RUNNING", "MLFLOW_FAILED"} <= vocabulary, vocabulary
    assert not found, (
        "name a run's state through tfrun.states.RunState, or another tool's word in a module-level "
        "name of its vocabulary (SLURM_..., MLFLOW_..., OPTUNA_...):\n" + "\n".join(found)
    )
