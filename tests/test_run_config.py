"""config/ hands plan/ one typed, checked run config per run, once: the plan floor reads its
attributes, and calls nothing of config/ while it builds a plan but that one hand-over."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
from pathlib import Path
from types import FrameType
from typing import Any, Callable

import pytest

from tests.helpers import REPO
from tfrun.errors import ConfigError
from tfrun.plan import planner

SCRIPT = str(REPO / "examples" / "digits" / "train.py")


def _is_property(frame: FrameType) -> bool:
    """A read of an attribute of the handed-over value (a property of a run config's section)."""
    owner, _, name = frame.f_code.co_qualname.rpartition(".")
    cls = getattr(sys.modules.get(frame.f_globals.get("__name__", "")), owner, None)
    return isinstance(cls, type) and isinstance(inspect.getattr_static(cls, name, None), property)


def _crossings(call: Callable[[], Any]) -> tuple[Any, list[str], list[Any]]:
    """(what ``call`` returned, every call from a frame of tfrun.plan into a function of
    tfrun.config, what build_plan got as its first argument each time)."""
    crossed: list[str] = []
    built: list[Any] = []

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event != "call" or frame.f_back is None:
            return
        caller, callee = frame.f_back.f_globals.get("__name__", ""), frame.f_globals.get("__name__", "")
        if callee == "tfrun.plan.build" and frame.f_code.co_name == "build_plan":
            built.append(frame.f_locals[frame.f_code.co_varnames[0]])
        if caller.startswith("tfrun.plan") and callee.startswith("tfrun.config") and not _is_property(frame):
            crossed.append(f"{callee}.{frame.f_code.co_qualname}")

    sys.setprofile(profile)
    try:
        result = call()
    finally:
        sys.setprofile(None)
    return result, crossed, built


def _is_run_config(value: Any) -> bool:
    return type(value).__module__ == "tfrun.config.run_config" and type(value).__name__ == "RunConfig"


def test_a_single_run_crosses_from_plan_into_config_once(tmp_path: Path) -> None:
    planned, crossed, built = _crossings(
        lambda: planner.plan_run(
            [
                f"entry.script={SCRIPT}",
                "backend=ps",
                "compute=slurm",
                "compute.nodes=2",
                "compute.tasks_per_node=2",
                f"hydra.run.dir={tmp_path / 'run'}",
            ]
        )
    )
    assert crossed == ["tfrun.config.composition.single"]
    assert len(built) == 1 and _is_run_config(built[0]), [type(b) for b in built]
    run = built[0]
    assert dataclasses.is_dataclass(run) and run.compute.nodes == 2 and run.backend.name == "ps"
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.compute.nodes = 3
    assert planned.plan.config == dict(run.data)  # plan.json's config: the plain data, as it was


def test_a_grid_sweep_crosses_from_plan_into_config_once(tmp_path: Path) -> None:
    """Every point is composed (or resolved from its base) and checked in config/; the batch
    crosses into plan/ in one hand-over, its points typed."""
    planned, crossed, built = _crossings(
        lambda: planner.plan_sweep(
            [
                f"entry.script={SCRIPT}",
                "trainer.lr=0.1,0.2",
                "compute.nodes=1,2",
                f"hydra.sweep.dir={tmp_path / 'sweep'}",
            ]
        )
    )
    assert crossed == ["tfrun.config.composition.grid"]
    assert len(built) == len(planned) == 4 and all(_is_run_config(run) for run in built)
    assert [(run.compute.nodes, run.trainer["lr"]) for run in built] == [(1, 0.1), (2, 0.1), (1, 0.2), (2, 0.2)]


def _root(node: ast.AST) -> str | None:
    while isinstance(node, (ast.Subscript, ast.Attribute, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def _config_keys(function: ast.FunctionDef) -> list[str]:
    """String-keyed reads of the function's first argument, or of a name bound from it."""
    config = {function.args.args[0].arg}
    for node in ast.walk(function):  # names bound from the config: compute, entry = cfg[...], ...
        if not isinstance(node, ast.Assign):
            continue
        values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
        targets = node.targets[0].elts if isinstance(node.targets[0], ast.Tuple) else node.targets
        for target, value in zip(targets, values):
            if (
                isinstance(target, ast.Name)
                and isinstance(value, (ast.Subscript, ast.Attribute))
                and _root(value) in config
            ):
                config.add(target.id)
    return [
        ast.unparse(node)
        for node in ast.walk(function)
        if isinstance(node, ast.Subscript)
        and isinstance(node.slice, ast.Constant)
        and isinstance(node.slice.value, str)
        and _root(node) in config
    ]


def test_the_plan_builder_reads_attributes_and_imports_no_composition() -> None:
    """build_plan decides from the typed value (no ``cfg["compute"]["nodes"]``), and plan/
    imports of config/ only the hand-over and the typed value, never composing or checking."""
    source = (REPO / "tfrun" / "plan" / "build.py").read_text()
    build = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and n.name == "build_plan")
    assert _config_keys(build) == []
    assert ast.unparse(build.args.args[0].annotation) == "RunConfig"
    imported = set()
    for path in (REPO / "tfrun" / "plan").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tfrun.config"):
                imported |= (
                    {node.module} if node.module != "tfrun.config" else {f"tfrun.config.{a.name}" for a in node.names}
                )
    assert imported <= {"tfrun.config.composition", "tfrun.config.run_config"}, sorted(imported)


def test_bad_input_raises_before_a_plan_with_the_key_and_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"compute\.tasks_per_node.*0"):
        planner.plan_run([f"entry.script={SCRIPT}", "compute.tasks_per_node=0", f"hydra.run.dir={tmp_path / 'run'}"])
