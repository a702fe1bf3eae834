"""Bad input through the real ``tfrun`` command: exit 2, one message naming the key and the
value, no traceback, nothing started, with and without ``--dry-run``."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import run_tfrun
from tfrun.config.schema import LocalComputeConfig

LOCAL_COMPUTE_KEYS = [f.name for f in dataclasses.fields(LocalComputeConfig)]

# id -> (argv after `tfrun`, strings the message must contain)
CASES = {
    "unknown compute option": (["compute=foo"], ["compute", "foo", "local"]),
    "unknown backend option": (["backend=bar"], ["backend", "bar", "none"]),
    "unknown compute key": (["compute.foo=1"], ["compute.foo", *LOCAL_COMPUTE_KEYS]),
    "unknown top-level key": (["foo=1"], ["foo", "compute", "trainer", "entry"]),
    # A free-form mapping's entries are added as typed (test below), but only where it exists.
    "mapping the compute option lacks": (
        ["compute.additional_parameters={nodelist:node1}"],
        ["compute.additional_parameters", "not a key of compute", *LOCAL_COMPUTE_KEYS],
    ),
    "wrong type": (["compute.nodes=abc"], ["compute.nodes", "abc", "int"]),
    "wrong type bool": (["backend.legacy_keras=maybe"], ["backend.legacy_keras", "maybe", "bool"]),
    "script null": (["entry.script=null"], ["entry.script", "None"]),
    "script empty": (["entry.script="], ["entry.script", "''"]),
    "script left missing": (["entry.script=???"], ["entry.script", "???", "path of your training script"]),
    "script does not exist": (["entry.script=nope.py"], ["entry.script", "nope.py", "existing file"]),
    "script dir does not exist": (["entry.source_dir=nowhere"], ["entry.source_dir", "nowhere"]),
    "zero tasks per node": (["compute.tasks_per_node=0"], ["compute.tasks_per_node", "0", ">= 1"]),
    "negative nodes": (["compute.nodes=-1"], ["compute.nodes", "-1"]),
    "unknown target": (["compute.target=mars"], ["compute.target", "mars", "local", "slurm"]),
    "bad flag style": (["entry.flag_style=snake"], ["entry.flag_style", "snake", "dashes"]),
    "gpus not divisible": (
        ["compute.gpus_per_node=3", "compute.tasks_per_node=2"],
        ["compute.gpus_per_node", "3", "tasks_per_node"],
    ),
    "bad dry-run mode": (["--dry-run=yaml"], ["--dry-run", "yaml", "json"]),
    # Trainer values are argv entries: any text goes (tests/test_values.py), but not a mapping.
    "mapping value": (["trainer.x={a:1}"], ["trainer.x", "mapping"]),
    "list in a list": (["trainer.x=[[1,2]]"], ["trainer.x", "[1, 2]", "a scalar or a list of scalars"]),
    "unknown bool style": (["entry.bool_style=switch"], ["entry.bool_style", "switch", "flag", "value"]),
    "unknown pack mode": (["compute=slurm", "compute.pack=yes"], ["compute.pack", "yes", "off", "auto"]),
    "zero pack size": (["compute=slurm", "compute.pack_size=0"], ["compute.pack_size", "0", ">= 1"]),
    "negative pack slots": (["compute=slurm", "compute.pack_slots=-2"], ["compute.pack_slots", "-2", ">= 1"]),
    "auto packing without parallelism": (
        ["compute=slurm", "compute.pack=auto", "compute.array_parallelism=0", "-m", "trainer.x=1,2"],
        ["compute.array_parallelism", "0", ">= 1"],
    ),
    "negative requeues": (["compute=slurm", "compute.max_requeues=-1"], ["compute.max_requeues", "-1", ">= 0"]),
    "non-trainer parse error": (["compute.nodes=$(ls)"], ["compute.nodes", "$(ls)"]),
    "unquoted tilde": (
        ["entry.source_dir=~/data"],
        ["entry.source_dir", "~/data", "quote it", "\"entry.source_dir='~/data'\""],
    ),
    # A key of another option of the group: that option is named.
    "key of another option": (
        ["compute.partition=debug"],
        ["compute.partition", "not a key of compute=local", "partition is a key of compute=slurm"],
    ),
    "entry of a mapping of another option": (
        ["compute.additional_parameters.gres=gpu:2"],
        [
            "compute.additional_parameters",
            "not a key of compute=local",
            "additional_parameters is a key of compute=slurm",
        ],
    ),
    "key of a deps option": (["deps.pip_packages=[tabulate]"], ["deps.pip_packages", "deps=none", "deps=pip"]),
    # Sweep syntax where no sweep runs: what to add.
    "interval without the tuning sweeper": (
        ["-m", "trainer.lr=interval(0.001,0.1)"],
        ["trainer.lr=interval(0.001,0.1)", "hydra/sweeper=tfrun", "-m", "tfrun.objective"],
    ),
    "interval without -m": (
        ["trainer.lr=interval(0.001,0.1)"],
        ["trainer.lr=interval(0.001,0.1)", "-m", "hydra/sweeper=tfrun"],
    ),
    "choice without -m": (["trainer.lr=choice(0.1,0.2)"], ["trainer.lr=choice(0.1,0.2)", "add -m"]),
    "comma sweep without -m": (["compute.nodes=1,2"], ["compute.nodes=1,2", "add -m", "compute.nodes=[1,2]"]),
    # A list item Hydra's grammar cannot read, in a key that is no list of text: how to quote one item.
    "list item to quote": (["compute.nodes=[1,>2]"], ["compute.nodes", "[1,>2]", '"b>=4"']),
}
# id -> strings the message must not contain (it must not contradict itself, nor show tfrun's own rewrites).
ABSENT = {
    "entry of a mapping of another option": ["allowed keys: additional_parameters"],
    "interval without -m": ["++", "BasicSweeper", "INTERVAL_SWEEP"],
    "interval without the tuning sweeper": ["BasicSweeper", "INTERVAL_SWEEP"],
    "choice without -m": ["++", "requires --multirun"],
}


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_error(tmp_path: Path, case: str, dry_run: bool) -> None:
    argv, wanted = CASES[case]
    before = set(tmp_path.rglob("*"))
    result = run_tfrun(tmp_path, *(["--dry-run"] if dry_run else []), *argv, timeout=60)

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stdout == ""
    assert result.stderr.startswith("tfrun: error: ")
    assert result.stderr.count("tfrun: error:") == 1
    for text in wanted:
        assert text in result.stderr, f"{text!r} missing from:\n{result.stderr}"
    for text in ABSENT.get(case, []):
        assert text not in result.stderr, f"{text!r} in:\n{result.stderr}"
    # Nothing was started: no run dir, no plan, no rank log.
    assert set(tmp_path.rglob("*")) == before == set()


def test_good_values_pass_unchanged(tmp_path: Path) -> None:
    """What real flags look like reaches the script byte for byte."""
    result = run_tfrun(
        tmp_path,
        "--dry-run=json",
        "trainer.name=a/b:c+d",
        "trainer.lr=0.001",
        "trainer.tags=[x,y]",
        "trainer.path='~/data'",
        "trainer.opt='k=v@1%'",
    )
    assert result.returncode == 0, result.stderr
    argv = json.loads(result.stdout)["tasks"][0]["argv"][1:]
    assert argv == ["--name", "a/b:c+d", "--lr", "0.001", "--tags", "x", "y", "--path", "~/data", "--opt", "k=v@1%"]


def test_a_list_item_with_a_version_needs_no_quoting(tmp_path: Path) -> None:
    """The README's ``'deps.pip_packages=[tabulate,humanize>=4]'``: an item Hydra's grammar
    cannot read (``>``) in a list of text is taken as that text; quoted, it is the same."""
    packages = []
    for value in ("[tabulate,humanize>=4]", '[tabulate,"humanize>=4"]', "[tabulate, humanize>=4]"):
        result = run_tfrun(tmp_path, "--dry-run=json", "deps=pip", f"deps.pip_packages={value}")
        assert result.returncode == 0, result.stderr
        plan = json.loads(result.stdout)
        packages.append((plan["config"]["deps"]["pip_packages"], plan["deps"]["key"]))
    assert packages == [(["tabulate", "humanize>=4"], packages[0][1])] * 3


def test_free_form_mappings_take_entries_as_typed(tmp_path: Path) -> None:
    """The README's ``compute.additional_parameters={...}``, ``deps.env`` and ``tfrun.tags``:
    a whole mapping or one entry, no ``+`` needed."""
    result = run_tfrun(
        tmp_path,
        "--dry-run=json",
        "compute=slurm",
        "compute.additional_parameters={nodelist:node1}",
        "compute.additional_parameters.exclusive=true",
        "deps.env={A:1}",
        "deps.env.B=two",
        "tfrun.tags={team:vision}",
        "tfrun.tags.stage=dev",
    )
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    sbatch = plan["request"]["sbatch"].splitlines()
    assert "#SBATCH --nodelist=node1" in sbatch and "#SBATCH --exclusive" in sbatch, sbatch
    assert {k: v for k, v in plan["tasks"][0]["env"].items() if k in ("A", "B")} == {"A": "1", "B": "two"}
    assert plan["config"]["tfrun"]["tags"] == {"team": "vision", "stage": "dev"}


# --- the console script's exit ---------------------------------------------------------------

# tfrun's console() around a main() that, like a command using a tracking library, registers an
# exit handler and leaves a (non-daemon) thread finishing its work, and keeps an object whose
# __del__ only the interpreter's teardown of modules would call.
CONSOLE = """
import atexit, pathlib, sys, threading, time
from tfrun.cli import main as cli
out = pathlib.Path(sys.argv[1])
real_main = cli.main

class Teardown:
    def __del__(self):
        (out / "teardown").write_text("ran")

def main():
    atexit.register(lambda: (out / "handler").write_text("ran"))
    threading.Thread(target=lambda: (time.sleep(0.5), (out / "thread").write_text("ran"))).start()
    cli.kept_until_teardown = Teardown()
    real_main(sys.argv[2:])

cli.main = main
cli.console()
"""


@pytest.mark.parametrize("argv, code", [(["runs"], 0), (["compute.nodes=abc", "--dry-run"], 2)])
def test_the_console_exits_with_the_code_after_handlers_and_threads_but_skips_the_teardown(
    tmp_path: Path, argv: list[str], code: int
) -> None:
    env = {**os.environ, "TFRUN_RUNS_DIR": str(tmp_path / "runs")}
    done = subprocess.run(
        [sys.executable, "-c", CONSOLE, str(tmp_path), *argv],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == code, done.stderr
    assert (tmp_path / "handler").exists(), "an exit handler registered by the command did not run"
    assert (tmp_path / "thread").exists(), "the process ended before a thread of the command finished"
    assert not (tmp_path / "teardown").exists(), "the interpreter tore its modules down (~50 ms per command)"
