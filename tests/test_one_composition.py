"""One composition path: the same overrides give the same config through every entry.

``tfrun``, ``tfrun --dry-run``, ``tfrun.launch``, ``tfrun -m``, ``tfrun.sweep`` and
``tfrun --dry-run -m`` all compose through tfrun.config.compose over one search path, so
a project's config dir, its project defaults and the command line's overrides mean the same
everywhere. Each entry really runs here (a script that prints its argv, two tasks each).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import read_json, run_dir_from, run_tfrun, scratch_env

pytestmark = pytest.mark.slow

SCRIPT = "import sys\nprint('argv', sys.argv[1:])\n"
# A project's own compute option and project defaults: where the search paths used to differ.
COMPUTE = "defaults:\n  - /schema/compute/local@_here_\n  - _self_\ntasks_per_node: 2\n"
PROJECT = "# @package _global_\ntrainer:\n  from_project: 7\n"
API = """\
import json, sys, tfrun
overrides = json.loads(sys.argv[2])
runs = [tfrun.launch(overrides)] if sys.argv[1] == "launch" else tfrun.sweep(overrides)
print("RUN-DIR", runs[0].dir)
"""


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, list[str]]:
    (tmp_path / "conf" / "compute").mkdir(parents=True)
    (tmp_path / "conf" / "project").mkdir()
    (tmp_path / "conf" / "compute" / "mine.yaml").write_text(COMPUTE)
    (tmp_path / "conf" / "project" / "default.yaml").write_text(PROJECT)
    (tmp_path / "noop.py").write_text(SCRIPT)
    # a value with a comma needs quoting; a free-form trainer key and an added deps.env one
    return tmp_path, [
        "compute=mine",
        "entry.script=noop.py",
        "trainer.lr=0.25",
        "trainer.tag='a,b'",
        "+deps.env.FOO=bar",
    ]


def _api(tmp_path: Path, verb: str, overrides: list[str]) -> Path:
    result = subprocess.run(
        [sys.executable, "-c", API, verb, json.dumps(overrides)],
        cwd=tmp_path,
        env=scratch_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return Path(next(line.split(" ", 1)[1] for line in result.stdout.splitlines() if line.startswith("RUN-DIR ")))


def _cli(tmp_path: Path, *args: str) -> Path:
    result = run_tfrun(tmp_path, *args, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return run_dir_from(result.stderr)


def _dry(tmp_path: Path, *args: str) -> dict:
    result = run_tfrun(tmp_path, "--dry-run=json", *args)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    return data["runs"][0]["config"] if "runs" in data else data["config"]


def test_every_entry_composes_the_same_config(project: tuple[Path, list[str]]) -> None:
    tmp_path, overrides = project
    launched = {
        "tfrun": _cli(tmp_path, *overrides),
        "tfrun -m": _cli(tmp_path, "-m", *overrides),
        "tfrun.launch": _api(tmp_path, "launch", overrides),
        "tfrun.sweep": _api(tmp_path, "sweep", overrides),
    }
    configs = {entry: read_json(run_dir / "plan.json")["config"] for entry, run_dir in launched.items()}
    configs["tfrun --dry-run"] = _dry(tmp_path, *overrides)
    configs["tfrun --dry-run -m"] = _dry(tmp_path, "-m", *overrides)

    first = configs["tfrun"]
    assert first["trainer"] == {"lr": 0.25, "tag": "a,b", "from_project": 7}
    assert first["compute"]["tasks_per_node"] == 2 and first["deps"]["env"] == {"FOO": "bar"}
    assert first["entry"]["script"] == "noop.py"
    for entry, config in configs.items():
        assert config == first, f"{entry} composed another config than tfrun did"
    for entry, run_dir in launched.items():
        for name in ("config.yaml", "overrides.yaml"):
            assert (run_dir / ".hydra" / name).read_text() == (launched["tfrun"] / ".hydra" / name).read_text(), (
                f"{entry} wrote another .hydra/{name}"
            )
        assert read_json(run_dir / "status.json")["state"] == "COMPLETED", entry
        argv = "argv ['--from_project', '7', '--lr', '0.25', '--tag', 'a,b']"
        assert argv in (run_dir / "logs" / "rank1.log").read_text(), entry


def test_a_sweep_writes_what_hydras_own_sweeper_writes(tmp_path: Path) -> None:
    # tfrun's default sweeper checks a batch without composing the points it plans from resolved
    # values, and writes their .hydra files from those values: the files of Hydra's own are kept.
    (tmp_path / "noop.py").write_text(SCRIPT)
    sweep = ["-m", "entry.script=noop.py", "trainer.lr=0.1,0.2", "trainer.seed=1,2", "compute.tasks_per_node=1"]
    for name, extra in (("ours", []), ("hydras", ["hydra/sweeper=basic"])):
        result = run_tfrun(tmp_path, *sweep, *extra, f"hydra.sweep.dir={name}", timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    theirs_files = sorted(p.relative_to(tmp_path / "hydras") for p in (tmp_path / "hydras").rglob(".hydra/*.yaml"))
    assert len(theirs_files) == 4 * 3
    assert sorted(p.relative_to(tmp_path / "ours") for p in (tmp_path / "ours").rglob(".hydra/*.yaml")) == theirs_files
    for path in theirs_files:
        theirs = (tmp_path / "hydras" / path).read_text().replace("    - hydra/sweeper=basic\n", "")
        theirs = theirs.replace("hydras", "ours").replace("hydra/sweeper: basic", "hydra/sweeper: tfrun_basic")
        theirs = theirs.replace(
            "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
            "hydra_plugins.tfrun_launcher.tfrun_basic_sweeper.BasicSweeper",
        )
        assert (tmp_path / "ours" / path).read_text() == theirs, path
