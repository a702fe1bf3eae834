"""The package's floors hold: import-linter's contracts (pyproject.toml) pass, every module
of tfrun is on a floor, and what runs inside a task imports no Hydra, OmegaConf or
submitit (nor TensorFlow until a script asks for it)."""

from __future__ import annotations

import ast
import pkgutil
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import tfrun
from tests.helpers import REPO

CONTRACTS = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def _contract(contract_id: str) -> dict:
    return next(c for c in CONTRACTS if c["id"] == contract_id)


def test_lint_imports_keeps_every_contract() -> None:
    lint = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    result = subprocess.run([lint, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken." in result.stdout, result.stdout[-2000:]


def test_every_module_of_tfrun_is_on_a_floor() -> None:
    """A new module or package must be placed on a floor, or the floors contract would not see it."""
    floors = {name.strip() for layer in _contract("floors")["layers"] for name in layer.replace(":", "|").split("|")}
    top = {f"tfrun.{m.name}" for m in pkgutil.iter_modules(tfrun.__path__)}
    assert top - floors == set(), f"modules on no floor: {sorted(top - floors)}"
    assert floors - top == set(), f"floors naming no module: {sorted(floors - top)}"


ISOLATED = """\
import importlib, sys
for name in {modules!r}:
    importlib.import_module(name)
bad = sorted({{m.split(".")[0] for m in sys.modules}} & {forbidden!r})
print("FOUND", bad)
sys.exit(1 if bad else 0)
"""


def _imports_in_fresh_interpreter(modules: list[str], forbidden: set[str]) -> subprocess.CompletedProcess[str]:
    code = ISOLATED.format(modules=modules, forbidden=forbidden)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)


def test_the_bootstrap_imports_no_hydra_omegaconf_or_submitit() -> None:
    result = _imports_in_fresh_interpreter(["tfrun.bootstrap"], {"hydra", "omegaconf", "submitit"})
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_pool_slots_agent_imports_no_hydra_omegaconf_submitit_or_tensorflow() -> None:
    """Every item of a pool is forked from its slot's agent: what the agent imports, every item
    has (TensorFlow only when the pool imports it ahead, for the items' script)."""
    result = _imports_in_fresh_interpreter(
        ["tfrun.targets.pool.agent"], {"hydra", "omegaconf", "submitit", "tensorflow"}
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _package_modules(package: str) -> list[str]:
    module = __import__(package, fromlist=["__path__"])
    return [package, *(f"{package}.{m.name}" for m in pkgutil.iter_modules(module.__path__) if m.name != "__main__")]


@pytest.mark.parametrize("package", ["tfrun.task", "tfrun.backends", "tfrun.tracking"])
def test_what_runs_in_a_task_imports_no_hydra_nor_tensorflow(package: str) -> None:
    """Every module of the floors a task uses: no Hydra, OmegaConf, submitit, and TensorFlow
    only inside the functions that need it (a parameter server's bootstrap imports it late)."""
    forbidden = {"hydra", "omegaconf", "submitit", "tensorflow", "keras", "tf_keras", "horovod"}
    result = _imports_in_fresh_interpreter(_package_modules(package), forbidden)
    assert result.returncode == 0, result.stdout + result.stderr


# A run's life (start, follow, settle, report, sync, cancel, signal) is the runner's: these are
# the calls that do one of those, made anywhere else only by the targets that implement them.
LIFE = re.compile(
    r"(^|\.)(print_outcome|sync_if_asked|settle|refresh_items|cancel_items)$"
    r"|^(local|slurm)\.(run|run_many|launch|cancel|scancel)$"
    r"|^targets\.(get|of)\(.*\)\.(run|run_many|submit|poll|cancel|signal)$"
    r"|^targets\.POOL\."
)
LIFE_HOMES = ("tfrun/runner/", "tfrun/targets/")


def test_nothing_outside_the_runner_starts_follows_or_settles_a_run() -> None:
    """The command line, the API, the estimator, the Hydra plugins and the tuning study call
    the runner (tfrun.runner: launch, control.refresh/cancel, sweeps) for a run's life."""
    found = []
    for path in sorted([*(REPO / "tfrun").rglob("*.py"), *(REPO / "launchers").rglob("*.py")]):
        where = path.relative_to(REPO).as_posix()
        if where.startswith(LIFE_HOMES):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and LIFE.search(ast.unparse(node.func)):
                found.append(f"{where}:{node.lineno}: {ast.unparse(node.func)}")
    assert found == [], "\n".join(found)
