"""The acting half of :mod:`tfrun.deps`: making a planned environment ready before any task
starts (:func:`prepare`, which the launchers call), building ``deps=pip|conda``
environments (:func:`ensure`), and ``python -m tfrun.deps build SPEC`` (a job's setup line,
with ``deps.build_on=job``).

A build runs under the key's file lock, in a temporary dir that is renamed into place when
everything succeeded (conda: in place, complete once its ``tfrun-env.json`` is written), so
a concurrent run waits and then uses it, and a failed or killed build leaves nothing a run
would use.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from tfrun import rundir
from tfrun.deps.cache import (
    BUILD_LOG,
    META,
    is_complete,
    lock,
    record_use,
    spec_file,
    touch_used,
)
from tfrun.deps.container import check_runtime
from tfrun.deps.modules import load_modules
from tfrun.deps.plan import (
    BUILT,
    CONSTRAINTS,
    DepsPlan,
    conda_steps,
    find_conda,
    installed,
    say,
)
from tfrun.errors import ConfigError
from tfrun.paths import RunPaths
from tfrun.states import RunState


def uv_command() -> list[str]:
    """How to run uv: the binary of the ``uv`` package, else ``uv`` on PATH."""
    try:
        import uv  # type: ignore[import-not-found]

        return [uv.find_uv_bin()]
    except (ImportError, FileNotFoundError):  # no uv package (or it lacks its binary): PATH's uv, below
        pass
    found = shutil.which("uv")
    if not found:
        raise ConfigError(
            "deps=pip builds its environment with uv, which is not installed here: "
            "`pip install uv` (into the environment that runs tfrun) and run again."
        )
    return [found]


class _Build:
    """One build: runs commands in a work dir, logs everything, explains a failure."""

    def __init__(self, dp: DepsPlan, work: Path, sinks: list[Any]):
        self.dp, self.work, self.sinks = dp, work, sinks

    def log(self, text: str) -> None:
        for sink in self.sinks:
            sink.write(text if text.endswith("\n") else text + "\n")
            sink.flush()

    def run(self, command: list[str]) -> None:
        words = [w.replace("{env}", str(self.work)) for w in command]
        if words[0] == "uv":
            words = uv_command() + words[1:]
        self.log("$ " + shlex.join(words))
        try:
            # cwd: the cache, so that no project file where tfrun was started changes the build
            out = subprocess.run(
                words,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                cwd=self.work.parent,
                env={**os.environ, "UV_PYTHON_DOWNLOADS": "never"},
            )
        except OSError as exc:
            raise self.failed(command, str(exc)) from exc
        self.log(out.stdout)
        if out.returncode != 0:
            raise self.failed(command, out.stdout)

    def failed(self, command: list[str], output: str) -> ConfigError:
        lines = [ln for ln in output.strip().splitlines() if ln.strip()]
        first = next(
            (i for i, ln in enumerate(lines) if ln.lstrip().lower().startswith(("error", "×", "critical"))), None
        )
        quoted = lines[first : first + 20] if first is not None else lines[-15:]
        tool = (
            ("uv pip install" if command[1] == "pip" else "uv " + command[1])
            if command[0] == "uv"
            else Path(command[0]).name
        )
        hint = ""
        if self.dp.spec.get("pin_base") and "unsatisfiable" in output:
            hint = (
                "\n(packages the base environment has are pinned at its versions so that TensorFlow keeps "
                "working: deps.pin_base=false lifts that)"
            )
        what = " ".join(self.dp.packages)
        return ConfigError(
            f"deps={self.dp.kind} ({what}): building environment {self.dp.key} failed; "
            f"`{tool}` said:\n"
            + "\n".join("  | " + ln for ln in quoted)
            + hint
            + "\nNothing was started, and the failed build was removed from the cache."
        )

    def python(self) -> str:
        return str(self.work / "bin" / "python")


def _write_base_pth(work: Path, site_dirs: list[str], purelib: str) -> None:
    # addsitedir (not a bare path line) so that the base's own .pth files (editable installs) work too
    lines = [f"import site; site.addsitedir({d!r})" for d in site_dirs]
    Path(purelib, "_tfrun_base.pth").write_text("\n".join(lines) + "\n")


def _write_constraints(work: Path, site_dirs: list[str]) -> None:
    """Pin what the base has (name==version), except what came from a path or URL (editable tfrun)."""
    pins = []
    for directory in site_dirs:
        for name in installed([directory]):
            if name.endswith(".dist-info") and (Path(directory) / name / "direct_url.json").exists():
                continue
            stem = name.rsplit(".", 1)[0]
            dist, _, version = stem.partition("-")
            version = version.split("-")[0]  # egg-info: name-1.0-py3.11
            if dist and version:
                pins.append(f"{dist}=={version}")
    (work / CONSTRAINTS).write_text("\n".join(sorted(set(pins))) + "\n")


def _purelib(build: _Build) -> str:
    out = subprocess.run(
        [build.python(), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        cwd=build.work.parent,
    )
    if out.returncode != 0:
        raise build.failed([build.python()], out.stderr)
    return out.stdout.strip()


def _link_runtime(build: _Build, sources: Mapping[str, str]) -> None:
    """Make tfrun's pure-Python runtime importable in a foreign environment (conda) via symlinks."""
    lib = build.work / "tfrun-runtime"
    lib.mkdir(exist_ok=True)
    for name, src in sources.items():
        (lib / os.path.basename(src) if os.path.isfile(src) else lib / name).symlink_to(src)
    purelib = _purelib(build)
    Path(purelib, "_tfrun_runtime.pth").write_text(os.path.relpath(lib, purelib) + "\n")


def _build_pip(build: _Build) -> None:
    spec = build.dp.spec
    create, install = build.dp.steps
    build.run(create)
    if spec.get("base_site"):
        _write_base_pth(build.work, spec["base_site"], _purelib(build))
    if spec.get("pin_base"):
        _write_constraints(build.work, spec["site"])
    build.run(install)


def conda_tool(spec: Mapping[str, Any]) -> str:
    """The conda tool a build uses, or a ConfigError that says how to get one."""
    tool = find_conda(spec.get("conda_exe"))
    if tool is None:
        raise ConfigError(
            f"deps=conda needs micromamba, mamba or conda, and "
            f"{'deps.conda_exe=' + repr(spec['conda_exe']) + ' was not found' if spec.get('conda_exe') else 'none of them is on PATH (nor $MAMBA_EXE / $CONDA_EXE)'}. "
            f"Install one (micromamba is a single binary; Miniforge brings mamba and conda), or `module load` your "
            f"site's conda, or name it with deps.conda_exe=/path/to/conda; deps=pip needs only uv."
        )
    return tool


def _build_conda(build: _Build) -> None:
    spec = build.dp.spec
    for step in conda_steps(conda_tool(spec), spec):
        build.run(step)
    if spec.get("pip_packages"):
        build.run(["uv", "pip", "install", "--python", "{env}/bin/python", *spec["pip_packages"]])
    _link_runtime(build, spec["runtime"])


def _progress(dp: DepsPlan) -> str:
    """What a build will do, in a few words: 'uv pip install 2 packages'."""
    if dp.kind == "pip":
        count = len(dp.spec["packages"])
        what = f"{count} package{'s' if count != 1 else ''}" if count else ""
        what += (" and " if what else "") + "a requirements file" if dp.spec.get("requirements") else ""
        return f"uv pip install {what}"
    return f"{Path(dp.steps[0][0]).name} create {len(dp.spec['packages'])} package(s)"


def ensure(dp: DepsPlan, log: Path | None = None, echo: bool = False, run_dir: str | None = None) -> None:
    """Make a planned environment exist: a cache hit does nothing but note the use; a miss builds it
    once under the key's lock. ``log`` also gets the build's output; ``echo`` copies it to stdout.
    ``run_dir``: the run that will use it, recorded in the cache (``tfrun env prune`` keeps the
    environment while that run may still start a task)."""
    if dp.kind not in BUILT or not dp.key or not dp.path:
        return
    env = Path(dp.path)
    cache = env.parent
    if is_complete(env) and _use_cached(dp, env, run_dir):
        return
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with lock(cache, dp.key, on_wait=lambda: say(f"environment {dp.key}: another process is building it; waiting")):
            if is_complete(env):
                _note_use(cache, dp.key, env, run_dir)
                say(f"environment {dp.key} was built by another process: {env}")
                return
            _clean_leftovers(cache, dp.key)
            _build_locked(dp, env, log, echo)
            _note_use(cache, dp.key, env, run_dir)
    except OSError as exc:  # a cache dir that cannot be written, a full disk
        raise ConfigError.invalid("deps.cache_dir", str(cache), f"a directory tfrun can write ({exc})") from exc


def _use_cached(dp: DepsPlan, env: Path, run_dir: str | None) -> bool:
    """Use a finished environment: its use is recorded under the key's lock, so a prune
    holding the lock either sees the record or has removed the environment first; False
    then (it is built again)."""
    assert dp.key
    try:
        with lock(env.parent, dp.key):
            if not is_complete(env):
                return False
            _note_use(env.parent, dp.key, env, run_dir)
    except OSError:  # a read-only shared cache still serves (and nobody can prune it)
        if not is_complete(env):
            return False
    say(f"environment {dp.key} cached: {env}")
    return True


def _note_use(cache: Path, key: str, env: Path, run_dir: str | None) -> None:
    touch_used(env)
    if run_dir is not None:
        record_use(cache, key, run_dir)


def _clean_leftovers(cache: Path, key: str) -> None:
    """Remove what a killed build of ``key`` left (the caller holds the key's lock)."""
    for path in cache.glob(f".tmp-{key}-*"):
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    if (cache / key).exists():
        shutil.rmtree(cache / key, ignore_errors=True)


def _build_locked(dp: DepsPlan, env: Path, log: Path | None, echo: bool) -> None:
    # conda writes its prefix into the files it installs, so a conda env is built in place
    # (and counts only once META is written); a venv made with --relocatable can be renamed.
    if dp.kind == "conda":  # a missing tool: say so before starting anything
        conda_tool(dp.spec)
    else:
        uv_command()
    work = env if dp.kind == "conda" else env.with_name(f".tmp-{dp.key}-{os.getpid()}")
    temp_log = env.with_name(f".tmp-{dp.key}-{os.getpid()}.log")
    sinks: list[Any] = [open(temp_log, "w")]
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        sinks.append(open(log, "a"))
    if echo:
        sinks.append(sys.stdout)
    build = _Build(dp, work, sinks)
    say(f"building environment {dp.key} ({_progress(dp)}) ...")
    started = time.monotonic()
    try:
        (_build_pip if dp.kind == "pip" else _build_conda)(build)
        build.run([build.python(), "-c", "import tfrun.bootstrap"])  # the tasks' first import
        meta = {
            "key": dp.key,
            "kind": dp.kind,
            "packages": dp.packages,
            "spec": dp.spec,
            "created": time.time(),
            "built_by": {"host": os.uname().nodename, "pid": os.getpid()},
            "seconds": time.monotonic() - started,
        }
        rundir.write_json(work / META, meta)  # whole or not at all: its presence marks the environment done
        sinks[0].close()
        os.replace(temp_log, work / BUILD_LOG)
        if work != env:
            os.rename(work, env)  # the moment the environment exists, whole
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        temp_log.unlink(missing_ok=True)
        raise
    finally:
        for sink in sinks[1:]:
            if sink is not sys.stdout:
                sink.close()
    say(f"environment {dp.key} ready in {time.monotonic() - started:.1f} s: {env}")


def prepare(plan: Any) -> dict[str, str]:
    """Make the run's environment ready before any of its tasks start (the launchers call this);
    returns the variables the local tasks get on top of this process's (loaded modules).

    Locally: build a missing environment, load modules, check the container runtime. On
    Slurm: build on this (login) node, or with build_on=job leave the spec where the job's
    setup line finds it. A ConfigError marks the run FAILED with the reason and nothing starts.
    """
    if not getattr(plan, "deps", None):
        return {}
    dp = DepsPlan.from_dict(plan.deps)
    try:
        if dp.kind in BUILT and dp.target == "slurm" and dp.build_on == "job":
            assert dp.path and dp.key
            cache = Path(dp.path).parent
            rundir.write_json(spec_file(cache, dp.key), dp.to_dict())
            # Without the key's lock (a build elsewhere may hold it for minutes): a prune that
            # removes the environment meanwhile only makes the job's setup line build it again.
            record_use(cache, dp.key, plan.run_dir)
            say(
                f"environment {dp.key} {'cached' if is_complete(Path(dp.path)) else 'is built in the job (build_on=job)'}: "
                f"{dp.path}"
            )
        elif dp.kind in BUILT:
            ensure(dp, RunPaths.of(plan.run_dir).deps_log, run_dir=plan.run_dir)
        elif dp.kind == "modules" and dp.modules:
            changed = load_modules(dp.modules)
            say(f"loaded modules ({'; '.join(dp.modules)}) in bash -lc: set {' '.join(sorted(changed)) or 'nothing'}")
            return changed
        elif dp.kind == "container" and dp.target == "local":
            check_runtime(dp.command_prefix[0], str(dp.spec.get("image")))
    except ConfigError as exc:
        rundir.update_status(
            plan.run_dir,
            run_id=plan.run_id,
            state=RunState.FAILED,
            target=plan.target,
            backend=plan.backend,
            reason=str(exc),
            ended=time.time(),
        )
        raise
    return {}


def main(argv: list[str] | None = None) -> int:
    """``python -m tfrun.deps build SPEC.json|RUN_DIR``: build an environment (a job's setup line)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "build":
        print("usage: python -m tfrun.deps build SPEC.json|RUN_DIR", file=sys.stderr)
        return 2
    source = Path(argv[1])
    try:
        if source.is_dir():
            data, log, run_dir = rundir.Plan.load(source).deps, RunPaths.of(source).deps_log, str(source)
        else:
            data, log, run_dir = json.loads(source.read_text()), None, None
        ensure(DepsPlan.from_dict(data), log, echo=True, run_dir=run_dir)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"tfrun: error: cannot read the environment's spec from {source}: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"tfrun: error: {exc}", file=sys.stderr)
        return 2
    return 0
