"""deps=pip|conda|modules|container: plans (pure), real environment builds with uv, real
local runs and Slurm jobs whose script imports a package the base environment lacks.

The package is ``tabulate`` (``humanize`` where a second one is needed): small, pure
Python, and not installed in the environment running the tests (checked below). Every
test has its own cache under tmp_path (TFRUN_ENV_CACHE) unless sharing is the point.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

import tfrun
from tests.helpers import (
    read_json,
    run_dir_from,
    run_tfrun,
    scratch_env,
    stop,
    tfrun_command,
    wait_for,
)
from tfrun import deps
from tfrun.cli import render
from tfrun.config.compose import normalize_overrides
from tfrun.deps import cache as env_cache
from tfrun.deps import container
from tfrun.deps import modules as deps_modules
from tfrun.deps import plan as deps_plan
from tfrun.errors import ConfigError
from tfrun.plan import Plan
from tfrun.plan.planner import compose_plans

PACKAGE, OTHER = "tabulate", "humanize"
MISSING = "tfrun-no-such-package-xyz"
BUILD_TIMEOUT = 300  # a build resolves against the package index; others share the 2 cores
JOB_TIMEOUT = 300


def test_the_packages_are_not_in_the_base_environment() -> None:
    """Otherwise the runs below would prove nothing."""
    for name in (PACKAGE, OTHER):
        assert importlib.util.find_spec(name) is None, f"{name} is installed here: pick another package"


def plan_for(*overrides: str) -> Plan:
    plans = compose_plans(normalize_overrides(list(overrides)))
    assert len(plans) == 1
    return plans[0]


@pytest.fixture
def cache(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """In-process tests: the env cache in tmp_path, and a script that imports the package."""
    monkeypatch.setenv("TFRUN_ENV_CACHE", str(scratch / "cache"))
    write_importer(scratch, "train.py", PACKAGE)
    return scratch / "cache"


def write_importer(where: Path, name: str, module: str) -> Path:
    path = where / name
    path.write_text(
        textwrap.dedent(f"""\
        import sys
        import {module}
        print("IMPORTED", "{module}", {module}.__version__, sys.executable, flush=True)
    """)
    )
    return path


# --- plans: pure --------------------------------------------------------------------


def test_pip_plan_runs_every_task_with_the_environments_python(cache: Path) -> None:
    plan = plan_for("entry.script=train.py", "deps=pip", f"deps.pip_packages=[{PACKAGE}]")
    dp = deps.DepsPlan.from_dict(plan.deps)
    assert dp.kind == "pip" and re.fullmatch(r"pip-[0-9a-f]{16}", str(dp.key))
    assert dp.path == str(cache / str(dp.key)) and not dp.cached
    assert plan.python == f"{dp.path}/bin/python" == plan.command[0]
    assert plan.command[1:4] == ["-u", "-m", "tfrun.bootstrap"]
    create, install = dp.steps
    assert create[:2] == ["uv", "venv"] and "--system-site-packages" in create and create[-1] == "{env}"
    assert install[:5] == ["uv", "pip", "install", "--python", "{env}/bin/python"]
    assert install[-1] == PACKAGE and "--constraint" in install  # the base's packages keep their versions
    text = render.plan_text(plan)
    assert f"env:      {dp.key} (not built yet: built before the tasks start)" in text
    assert f"env path: {dp.path}" in text


def test_the_key_covers_packages_versions_and_requirements_content(cache: Path) -> None:
    def key(*extra: str) -> str:
        return str(plan_for("entry.script=train.py", "deps=pip", *extra).deps["key"])

    first = key(f"deps.pip_packages=[{PACKAGE}]")
    assert key(f"deps.pip_packages=[{PACKAGE}]") == first  # stable
    assert key(f"deps.pip_packages=['{PACKAGE}==0.9.0']") != first
    assert key(f"deps.pip_packages=[{PACKAGE},{OTHER}]") != first
    assert key(f"deps.pip_packages=[{PACKAGE}]", "deps.base=isolated") != first
    Path("req.txt").write_text(f"{PACKAGE}\n")
    with_file = key("deps.requirements=req.txt")
    Path("req.txt").write_text(f"{PACKAGE}>=0.9\n")
    assert key("deps.requirements=req.txt") != with_file


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["deps=pip"], ["deps.pip_packages=[]", "at least one package"]),
        (["deps=pip", "deps.pip_packages=[x]", "deps.base=venv"], ["deps.base='venv'", "inherit, isolated"]),
        (["deps=pip", "deps.pip_packages=[x]", "deps.build_on=node"], ["deps.build_on='node'", "login, job"]),
        (["deps=pip", "deps.requirements=nope.txt"], ["deps.requirements='nope.txt'", "an existing file"]),
        (["deps=conda"], ["deps.conda_packages=[]", "at least one package"]),
        (["deps=modules"], ["deps.modules=[]", "at least one module name"]),
        (["deps=container"], ["deps.image='???'", "a .sif image file or a URI"]),
        (["deps=container", "deps.image=missing.sif"], ["deps.image='missing.sif'", "an existing file"]),
        (
            ["deps=container", "deps.image=docker://x", "deps.runtime=docker"],
            ["deps.runtime='docker'", "apptainer, singularity"],
        ),
    ],
)
def test_bad_deps_are_config_errors_naming_key_and_value(cache: Path, overrides: list[str], words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        plan_for("entry.script=train.py", *overrides)
    for word in words:
        assert word in str(info.value)


def test_conda_spec_and_commands(cache: Path) -> None:
    plan = plan_for(
        "entry.script=train.py",
        "deps=conda",
        "deps.conda_exe=micromamba",
        "deps.conda_packages=[numpy,tabulate]",
        "deps.channels=[conda-forge]",
        "deps.pip_packages=[humanize]",
    )
    dp = deps.DepsPlan.from_dict(plan.deps)
    version = ".".join(deps_plan.interpreter(sys.executable)["version"].split(".")[:2])
    assert dp.spec["packages"] == ["numpy", "tabulate", f"python={version}"]  # tfrun's Python version added
    assert dp.steps == [
        [
            "micromamba",
            "create",
            "--yes",
            "--prefix",
            "{env}",
            "--channel",
            "conda-forge",
            "numpy",
            "tabulate",
            f"python={version}",
        ],
        ["uv", "pip", "install", "--python", "{env}/bin/python", "humanize"],
    ]
    assert plan.python == f"{dp.path}/bin/python" and dp.key and dp.key.startswith("conda-")
    assert set(dp.spec["runtime"]) >= {"tfrun", "submitit", "cloudpickle"}  # linked into the env

    Path("environment.yml").write_text("name: x\ndependencies:\n  - python=3.11\n  - numpy\n")
    spec = {**dp.spec, "packages": ["tabulate"], "environment_file": {"path": "/p/environment.yml"}}
    assert deps_plan.conda_steps("/opt/bin/conda", spec) == [
        ["/opt/bin/conda", "env", "create", "--prefix", "{env}", "--file", "/p/environment.yml"],
        ["/opt/bin/conda", "install", "--yes", "--prefix", "{env}", "--channel", "conda-forge", "tabulate"],
    ]
    assert deps_plan.conda_steps("mamba", {**spec, "environment_file": None})[0][:3] == ["mamba", "create", "--yes"]
    with_file = plan_for("entry.script=train.py", "deps=conda", "deps.environment_file=environment.yml")
    assert "python=" not in " ".join(with_file.deps["spec"]["packages"])  # the file says which python
    Path("environment.yml").write_text("name: x\ndependencies:\n  - python=3.11\n  - numpy<2\n")
    changed = plan_for("entry.script=train.py", "deps=conda", "deps.environment_file=environment.yml")
    assert changed.deps["key"] != with_file.deps["key"]


def test_modules_become_setup_lines_of_the_job_before_srun(cache: Path) -> None:
    plan = plan_for(
        "entry.script=train.py",
        "compute=slurm",
        "deps=modules",
        "deps.purge=true",
        "deps.modules=[cuda/12.4,cudnn]",
        "compute.setup=[echo site]",
    )
    sbatch = plan.request["sbatch"]
    lines = sbatch.splitlines()
    expected = ["echo site", "module purge", "module load cuda/12.4", "module load cudnn"]
    start = lines.index("echo site")
    assert lines[start : start + 4] == expected
    assert start < next(i for i, ln in enumerate(lines) if ln.startswith("srun "))
    local = plan_for("entry.script=train.py", "deps=modules", "deps.modules=[cuda/12.4]")
    assert local.deps["modules"] == ["module load cuda/12.4"] and local.deps["setup"] == []


def test_module_changes_keep_the_launchers_path() -> None:
    before = {"PATH": "/usr/bin:/bin", "HOME": "/h"}
    after = {"PATH": "/opt/cuda/bin:/usr/bin:/bin", "HOME": "/h", "CUDA_HOME": "/opt/cuda", "SHLVL": "2"}
    changed = deps_modules.module_changes(before, after, {"PATH": "/venv/bin:/usr/bin:/bin"})
    assert changed == {"PATH": "/opt/cuda/bin:/venv/bin:/usr/bin:/bin", "CUDA_HOME": "/opt/cuda"}


def test_container_command_line_locally_and_on_slurm(cache: Path) -> None:
    Path("tf.sif").write_bytes(b"not really an image; the plan does not open it")
    plan = plan_for("entry.script=train.py", "deps=container", "deps.image=tf.sif", "deps.binds=[/data:/data:ro]")
    image = str(Path("tf.sif").resolve())
    assert plan.command[:2] == ["apptainer", "exec"] and "--nv" not in plan.command
    at = plan.command.index(image)
    assert plan.command[at + 1 :] == ["python3", "-u", "-m", "tfrun.bootstrap", plan.run_dir]
    binds = plan.command[plan.command.index("--bind") + 1].split(",")
    assert binds[0] == "/data:/data:ro"
    assert os.path.dirname(plan.run_dir) in binds and plan.source_dir in binds
    tfrun_dir = str(Path(tfrun.__file__).parent)
    assert f"{tfrun_dir}:{container.CONTAINER_LIB}/tfrun:ro" in binds
    assert plan.command[plan.command.index("--env") + 1] == f"PYTHONPATH={container.CONTAINER_LIB}"

    gpu = plan_for(
        "entry.script=train.py",
        "compute=slurm_gpu",
        "deps=container",
        "deps.image=docker://tf/tf:2.21",
        "deps.runtime=singularity",
    )
    srun = gpu.request["srun"]
    assert " singularity exec --nv --bind " in srun
    assert srun.endswith(
        f"docker://tf/tf:2.21 python3 -u -m tfrun.task.held -u -m submitit.core._submit {gpu.run_dir}/.submitit"
    )


def test_build_on_job_puts_the_build_in_the_jobs_setup(cache: Path) -> None:
    plan = plan_for(
        "entry.script=train.py", "compute=slurm", "deps=pip", f"deps.pip_packages=[{PACKAGE}]", "deps.build_on=job"
    )
    key = plan.deps["key"]
    line = f"-m tfrun.deps build {cache}/.specs/{key}.json || exit 1"
    assert any(ln.endswith(line) for ln in plan.request["sbatch"].splitlines())
    assert f"{cache}/{key}/bin/python -u -m tfrun.task.held -u -m submitit.core._submit" in plan.request["srun"]


# --- real builds and runs: local ------------------------------------------------------


def env_run(
    tmp_path: Path, cache: Path, *args: str, timeout: float = BUILD_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    return run_tfrun(tmp_path, *args, timeout=timeout, TFRUN_ENV_CACHE=str(cache))


def cache_entries(cache: Path) -> list[str]:
    """What is in the cache besides its lock files and its records of the runs that use an
    environment: finished envs and any build leftovers."""
    return sorted(p.name for p in cache.iterdir() if p.name not in (".locks", ".users")) if cache.exists() else []


@pytest.mark.slow
def test_pip_run_builds_once_then_hits_the_cache_without_installing(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    write_importer(tmp_path, "train.py", PACKAGE)
    args = ("entry.script=train.py", "deps=pip", f"deps.pip_packages=[{PACKAGE}]")

    first = env_run(tmp_path, cache, *args)
    assert first.returncode == 0, first.stderr
    key = re.search(
        r"^tfrun: building environment (pip-[0-9a-f]{16}) \(uv pip install 1 package\) \.\.\.$", first.stderr, re.M
    )
    assert key, first.stderr
    env = cache / key.group(1)
    assert f"tfrun: environment {env.name} ready in" in first.stderr
    assert re.search(rf"^IMPORTED {PACKAGE} \S+ {env}/bin/python$", first.stdout, re.M), first.stdout
    assert cache_entries(cache) == [env.name]
    run_dir = run_dir_from(first.stderr)
    assert read_json(run_dir / "plan.json")["python"] == f"{env}/bin/python"
    assert f"uv pip install --python {cache}/.tmp-{env.name}-" in (run_dir / "logs" / "deps.log").read_text()
    build_log, meta = env / env_cache.BUILD_LOG, read_json(env / env_cache.META)
    stamp = build_log.stat().st_mtime_ns
    assert f"+ {PACKAGE}==" in build_log.read_text()

    dry = env_run(tmp_path, cache, "--dry-run", *args)
    assert f"env:      {env.name} (cached)" in dry.stdout and "build:" not in dry.stdout

    second = env_run(tmp_path, cache, *args)
    assert second.returncode == 0, second.stderr
    assert f"tfrun: environment {env.name} cached: {env}" in second.stderr
    assert "building environment" not in second.stderr
    assert re.search(rf"^IMPORTED {PACKAGE} \S+ {env}/bin/python$", second.stdout, re.M)
    # no install step ran: the build's own log and record are untouched, the run's log holds no command
    assert build_log.stat().st_mtime_ns == stamp and read_json(env / env_cache.META) == meta
    second_log = run_dir_from(second.stderr) / "logs" / "deps.log"
    assert not second_log.exists() or "$ " not in second_log.read_text()
    assert cache_entries(cache) == [env.name]


@pytest.mark.slow
def test_two_concurrent_runs_build_the_new_environment_once(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    write_importer(tmp_path, "train.py", OTHER)
    command = [*tfrun_command(), "entry.script=train.py", "deps=pip", f"deps.pip_packages=[{OTHER}]"]
    env = scratch_env(tmp_path, TFRUN_ENV_CACHE=str(cache))
    procs = [
        subprocess.Popen(
            command,
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=BUILD_TIMEOUT) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
        assert f"IMPORTED {OTHER}" in out
    stderr = "".join(err for _, err in outputs)
    assert stderr.count("tfrun: building environment") == 1, stderr
    waited = re.search(r"another process is building it|was built by another process|cached: ", stderr)
    assert waited, stderr
    assert len(cache_entries(cache)) == 1 and cache_entries(cache)[0].startswith("pip-")


def test_a_package_that_does_not_exist_fails_with_uvs_message_and_leaves_nothing(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    write_importer(tmp_path, "train.py", PACKAGE)
    result = env_run(tmp_path, cache, "entry.script=train.py", "deps=pip", f"deps.pip_packages=[{PACKAGE},{MISSING}]")
    assert result.returncode == 2, result.stderr
    assert "tfrun: error: deps=pip" in result.stderr
    assert "`uv pip install` said:\n  | error: No solution found" in result.stderr
    assert f"{MISSING} was not found in the package registry" in result.stderr  # uv's own words
    assert "Nothing was started" in result.stderr and "IMPORTED" not in result.stdout
    assert cache_entries(cache) == []  # no env, no half-built temp dir
    run_dir = next((tmp_path / "runs").iterdir())
    status = read_json(run_dir / "status.json")
    assert status["state"] == "FAILED" and MISSING in status["reason"]
    assert not (run_dir / "logs" / "rank0.log").exists()


def test_conda_without_a_conda_tool_says_so_and_how_to_fix(tmp_path: Path) -> None:
    if deps_plan.find_conda():
        pytest.skip("a conda tool is installed here: test_conda_builds_for_real runs instead")
    write_importer(tmp_path, "train.py", PACKAGE)
    result = env_run(
        tmp_path, tmp_path / "cache", "entry.script=train.py", "deps=conda", "deps.conda_packages=[tabulate]"
    )
    assert result.returncode == 2, result.stderr
    assert "deps=conda needs micromamba, mamba or conda, and none of them is on PATH" in result.stderr
    assert "deps.conda_exe=" in result.stderr and "building environment" not in result.stderr
    assert cache_entries(tmp_path / "cache") == []


@pytest.mark.slow
def test_conda_builds_for_real(tmp_path: Path) -> None:
    tool = deps_plan.find_conda()
    if not tool:
        # Holds on CI too: no conda tool is packaged for Debian 12 or on PyPI, and conda
        # channels (conda-forge) are not reachable from these machines' network.
        pytest.skip(
            "no micromamba, mamba or conda here (which micromamba mamba conda: none), and no conda "
            "channel reachable; test_conda_without_a_conda_tool_says_so_and_how_to_fix runs instead"
        )
    write_importer(tmp_path, "train.py", PACKAGE)
    result = env_run(
        tmp_path,
        tmp_path / "cache",
        "entry.script=train.py",
        "deps=conda",
        "deps.conda_packages=[tabulate]",
        "deps.channels=[conda-forge]",
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    assert f"IMPORTED {PACKAGE}" in result.stdout


def test_container_without_a_runtime_says_so(tmp_path: Path) -> None:
    if shutil.which("apptainer"):
        pytest.skip("apptainer is installed here: the real run needs an image (TFRUN_TEST_IMAGE)")
    write_importer(tmp_path, "train.py", PACKAGE)
    (tmp_path / "tf.sif").write_bytes(b"x")
    result = env_run(tmp_path, tmp_path / "cache", "entry.script=train.py", "deps=container", "deps.image=tf.sif")
    assert result.returncode == 2, result.stderr
    assert "deps.runtime=apptainer: `apptainer` is not on PATH" in result.stderr


@pytest.mark.slow
def test_container_runs_for_real(tmp_path: Path) -> None:
    image = os.environ.get("TFRUN_TEST_IMAGE")
    if not (shutil.which("apptainer") or shutil.which("singularity")) or not image:
        # Holds on CI too: Debian 12 packages neither runtime, and an image with Python would
        # have to come from a registry these machines cannot reach.
        pytest.skip(
            "needs apptainer/singularity (not packaged for Debian 12) and an image with Python in "
            "TFRUN_TEST_IMAGE; test_container_without_a_runtime_says_so runs instead"
        )
    runtime = "apptainer" if shutil.which("apptainer") else "singularity"
    (tmp_path / "train.py").write_text("import sys\nprint('IN', sys.executable)\n")
    result = env_run(
        tmp_path,
        tmp_path / "cache",
        "entry.script=train.py",
        "deps=container",
        f"deps.image={image}",
        f"deps.runtime={runtime}",
    )
    assert result.returncode == 0, result.stderr


def test_modules_locally_without_a_module_command_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text("print('ran')\n")
    home = tmp_path / "home"
    home.mkdir()
    result = run_tfrun(tmp_path, "entry.script=train.py", "deps=modules", "deps.modules=[cuda/12.4]", HOME=str(home))
    if "loaded modules" in result.stderr:
        pytest.skip("this machine has a module command")
    assert result.returncode == 2, result.stderr
    assert "deps=modules: there is no `module` command on this machine" in result.stderr


def test_modules_locally_are_loaded_in_a_login_shell_before_the_tasks(tmp_path: Path) -> None:
    """A stand-in for Lmod: a `module` shell function defined in the login profile, as sites do."""
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bash_profile").write_text(
        textwrap.dedent("""\
        export PATH=/usr/bin:/bin   # profiles reset PATH: the tasks must keep the launcher's
        module() {
          [ "$1" = load ] || return 0
          case "$2" in nosuch*) echo "Lmod has detected the following error: unknown module $2" >&2; return 1;; esac
          export LOADEDMODULES="${LOADEDMODULES:+$LOADEDMODULES:}$2" PATH="/opt/$2/bin:$PATH"
        }
    """)
    )
    (tmp_path / "train.py").write_text(
        "import os\nprint('MODS', os.environ.get('LOADEDMODULES'), os.environ['PATH'])\n"
    )
    result = run_tfrun(
        tmp_path, "entry.script=train.py", "deps=modules", "deps.modules=[gcc/12,cuda/12.4]", HOME=str(home)
    )
    assert result.returncode == 0, result.stderr
    mods, path = re.search(r"^MODS (\S+) (\S+)$", result.stdout, re.M).groups()
    assert mods == "gcc/12:cuda/12.4"
    assert path.startswith("/opt/cuda/12.4/bin:/opt/gcc/12/bin:") and path.endswith(os.environ["PATH"])
    bad = run_tfrun(tmp_path, "entry.script=train.py", "deps=modules", "deps.modules=[nosuch/1]", HOME=str(home))
    assert bad.returncode == 2 and "unknown module nosuch/1" in bad.stderr, bad.stderr

    # From Python (a notebook): the run's tasks get the modules, the notebook's own process does not.
    notebook = (
        "import os, tfrun\n"
        "run = tfrun.launch(['entry.script=train.py', 'deps=modules', 'deps.modules=[gcc/12]'])\n"
        "print('STATE', run.status(), 'NOTEBOOK', os.environ.get('LOADEDMODULES'))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", notebook],
        cwd=tmp_path,
        env=scratch_env(tmp_path, HOME=str(home)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "STATE COMPLETED NOTEBOOK None" in result.stdout, result.stdout + result.stderr
    assert re.search(r"^MODS gcc/12 ", result.stdout, re.M), result.stdout


# --- tfrun env list / prune -------------------------------------------------------------


@pytest.mark.slow
def test_env_list_and_prune(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    for module in (PACKAGE, OTHER):
        write_importer(tmp_path, f"use_{module}.py", module)  # not {module}.py: that would shadow it
        result = env_run(tmp_path, cache, f"entry.script=use_{module}.py", "deps=pip", f"deps.pip_packages=[{module}]")
        assert result.returncode == 0, result.stderr
    keys = sorted(p.name for p in cache.iterdir() if p.name.startswith("pip-"))
    assert len(keys) == 2

    listed = env_run(tmp_path, cache, "env", "list", timeout=60)
    assert listed.returncode == 0, listed.stderr
    for key in keys:
        assert re.search(
            rf"^{key}\s+pip\s+[\d.]+ [kM]B\s+\d{{4}}-\d\d-\d\d \d\d:\d\d \(just now\)\s+\S+$", listed.stdout, re.M
        ), listed.stdout
    assert re.search(rf"\(just now\)\s+{PACKAGE}$", listed.stdout, re.M)
    assert "2 environment(s)" in listed.stdout and str(cache) in listed.stdout

    leftover = cache / f".tmp-{keys[0]}-999999"  # what a build killed by SIGKILL leaves
    leftover.mkdir()
    pruned = env_run(tmp_path, cache, "env", "prune", timeout=60)
    assert pruned.returncode == 0 and not leftover.exists() and "removed 0, kept 2" in pruned.stdout

    old = cache / keys[0] / env_cache.LAST_USED
    three_days_ago = time.time() - 3 * 86400
    os.utime(old, (three_days_ago, three_days_ago))
    pruned = env_run(tmp_path, cache, "env", "prune", "--older-than", "2", timeout=60)
    assert f"tfrun: removed {keys[0]}" in pruned.stdout and "removed 1, kept 1" in pruned.stdout
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith("pip-")) == [keys[1]]

    pruned = env_run(tmp_path, cache, "env", "prune", "--all", timeout=60)
    assert f"tfrun: removed {keys[1]}" in pruned.stdout and "removed 1, kept 0" in pruned.stdout
    assert cache_entries(cache) == []


# A script that holds its environment until told to end: `go` in its run dir.
HOLDS = f"""
import os, pathlib, time, {PACKAGE}
run_dir = pathlib.Path(os.environ["TFRUN_RUN_DIR"])
(run_dir / "started").touch()
deadline = time.time() + 240
while not (run_dir / "go").exists() and time.time() < deadline:
    time.sleep(0.2)
print("IMPORTED", "{PACKAGE}", flush=True)
"""


def _kept_in_use(cache: Path, tmp_path: Path, env: Path, run_dir: Path) -> None:
    pruned = env_run(tmp_path, cache, "env", "prune", "--all", timeout=120)
    assert pruned.returncode == 0, pruned.stderr
    assert (
        f"tfrun: kept {env.name} ({run_dir.name}): a run that uses it is queued, running or requeued" in pruned.stdout
    ), pruned.stdout
    assert "removed 0, kept 1" in pruned.stdout and env_cache.is_complete(env)


@pytest.mark.slow
def test_prune_keeps_an_environment_a_running_local_run_uses(tmp_path: Path) -> None:
    """--all keeps it while the run runs, and while a task of it outlives its killed
    launcher; then it goes."""
    cache = tmp_path / "cache"
    (tmp_path / "holds.py").write_text(HOLDS)
    proc = subprocess.Popen(
        [*tfrun_command(), "entry.script=holds.py", "deps=pip", f"deps.pip_packages=[{PACKAGE}]"],
        cwd=tmp_path,
        env=scratch_env(tmp_path, TFRUN_ENV_CACHE=str(cache)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: any((tmp_path / "runs").glob("*/started")) or proc.poll() is not None,
            BUILD_TIMEOUT,
            "the run to start",
        )
        run_dir = next((tmp_path / "runs").glob("*/started")).parent
        env = Path(read_json(run_dir / "plan.json")["deps"]["path"])
        _kept_in_use(cache, tmp_path, env, run_dir)
        proc.kill()  # the launcher dies; its task (a session of its own) goes on
        proc.wait()
        _kept_in_use(cache, tmp_path, env, run_dir)
        (run_dir / "go").touch()
        task = read_json(run_dir / "ranks" / "0.json")["pid"]
        wait_for(lambda: not psutil.pid_exists(task), 60, "the task to end")
    finally:
        stop(proc)
    pruned = env_run(tmp_path, cache, "env", "prune", "--all", timeout=120)
    assert f"tfrun: removed {env.name}" in pruned.stdout and not env.exists(), pruned.stdout
    assert not (cache / ".users" / env.name).exists()


# --- Slurm ----------------------------------------------------------------------------


def job_names_in_queue(name: str) -> list[str]:
    out = subprocess.run(
        ["squeue", "-h", f"--name={name}", "-o", "%i"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    return out.split()


def jobs_ever_submitted(name: str) -> list[str]:
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-S", "now-1hours", f"--name={name}", "-o", "JobID"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return out.split()


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize("build_on", ["login", "job"])
def test_pip_slurm_job_imports_the_package(tmp_path: Path, job_name: str, build_on: str) -> None:
    cache = tmp_path / "cache"  # tmp_path: the local cluster's nodes share this filesystem
    module = PACKAGE if build_on == "login" else OTHER
    write_importer(tmp_path, "train.py", module)
    extra = []
    if build_on == "job":
        # The local cluster's nodes, like many clusters' compute nodes, reach no package index:
        # the job builds from a wheelhouse on the shared filesystem, filled from the login side.
        wheels = tmp_path / "wheels"
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), module],
            check=True,
            capture_output=True,
            timeout=BUILD_TIMEOUT,
        )
        extra = [f"deps.install_args=[--offline,--find-links,{wheels}]"]
    result = env_run(
        tmp_path,
        cache,
        "entry.script=train.py",
        "compute=slurm",
        f"compute.job_name={job_name}",
        "deps=pip",
        f"deps.pip_packages=[{module}]",
        f"deps.build_on={build_on}",
        *extra,
        timeout=BUILD_TIMEOUT + JOB_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    run_dir = run_dir_from(result.stderr)
    env = Path(read_json(run_dir / "plan.json")["deps"]["path"])
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert re.search(rf"^IMPORTED {module} \S+ {env}/bin/python$", log, re.M), log
    job_log = "".join(p.read_text() for p in (run_dir / ".submitit").glob("*_0_log.out"))
    if build_on == "login":  # built before submission, by tfrun itself
        assert f"tfrun: building environment {env.name}" in result.stderr
        assert "building environment" not in job_log
    else:  # built by the job's setup line; its output is in the job's log in the run dir
        assert f"tfrun: environment {env.name} is built in the job (build_on=job)" in result.stderr
        assert f"tfrun: building environment {env.name}" in job_log and f"+ {OTHER}==" in job_log
    assert env_cache.is_complete(env)


@pytest.mark.slurm
def test_pip_slurm_with_a_missing_package_submits_nothing(tmp_path: Path, job_name: str) -> None:
    cache = tmp_path / "cache"
    write_importer(tmp_path, "train.py", PACKAGE)
    result = env_run(
        tmp_path,
        cache,
        "entry.script=train.py",
        "compute=slurm",
        f"compute.job_name={job_name}",
        "deps=pip",
        f"deps.pip_packages=[{MISSING}]",
    )
    assert result.returncode == 2, result.stderr
    assert f"{MISSING} was not found in the package registry" in result.stderr
    assert "submitted job" not in result.stderr
    assert job_names_in_queue(job_name) == [] and jobs_ever_submitted(job_name) == []
    assert cache_entries(cache) == []


@pytest.mark.slurm
@pytest.mark.slow
def test_prune_never_removes_an_environment_a_queued_or_running_job_uses(tmp_path: Path, job_name: str) -> None:
    """A held job (queued), then released (running): --all keeps its environment; once the
    job has ended, --all removes it."""
    cache = tmp_path / "cache"
    (tmp_path / "holds.py").write_text(HOLDS)
    submitted = env_run(
        tmp_path,
        cache,
        "entry.script=holds.py",
        "deps=pip",
        f"deps.pip_packages=[{PACKAGE}]",
        "compute=slurm",
        f"compute.job_name={job_name}",
        "compute.wait=false",
        "compute.additional_parameters={hold:true}",
    )
    assert submitted.returncode == 0, submitted.stderr
    run_dir = run_dir_from(submitted.stderr)
    env = Path(read_json(run_dir / "plan.json")["deps"]["path"])
    job = read_json(run_dir / "status.json")["job_ids"][-1]
    assert job_names_in_queue(job_name) == [job]
    _kept_in_use(cache, tmp_path, env, run_dir)  # queued

    subprocess.run(["scontrol", "release", job], check=True, capture_output=True, timeout=60)
    wait_for(lambda: (run_dir / "started").exists(), JOB_TIMEOUT, "the job to start")
    _kept_in_use(cache, tmp_path, env, run_dir)  # running

    (run_dir / "go").touch()
    wait_for(
        lambda: "COMPLETED" in run_tfrun(tmp_path, "status", str(run_dir), timeout=60).stdout,
        JOB_TIMEOUT,
        "the job to complete",
    )
    assert f"IMPORTED {PACKAGE}" in (run_dir / "logs" / "rank0.log").read_text()
    pruned = env_run(tmp_path, cache, "env", "prune", "--all", timeout=120)
    assert f"tfrun: removed {env.name}" in pruned.stdout and "removed 1, kept 0" in pruned.stdout, pruned.stdout
    assert not env.exists()
