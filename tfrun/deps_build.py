"""The acting half of :mod:`tfrun.deps`: building ``deps=pip|conda`` environments, loading
modules for local tasks, checking a container runtime, and cleaning the cache.

A build runs under the key's file lock, in a temporary dir that is renamed into place when
everything succeeded (conda: in place, complete once its ``tfrun-env.json`` is written), so
a concurrent run waits and then uses it, and a failed or killed build leaves nothing a run
would use.
"""
from __future__ import annotations

import fcntl
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from tfrun.deps import (BUILD_LOG, BUILT, CONSTRAINTS, META, LAST_USED, DepsPlan, conda_steps, find_conda, installed,
                        is_complete, say)
from tfrun.errors import ConfigError


@contextmanager
def _lock(cache: Path, key: str, blocking: bool = True,
          on_wait: Callable[[], None] | None = None) -> Iterator[bool]:
    """Hold ``.locks/<key>.lock`` (flock: released by the kernel if the holder dies); yields False if
    not ``blocking`` and another process holds it."""
    (cache / ".locks").mkdir(parents=True, exist_ok=True)
    with open(cache / ".locks" / f"{key}.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not blocking:
                yield False
                return
            if on_wait:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _touch_used(env: Path) -> None:
    try:
        (env / LAST_USED).touch()
    except OSError:  # a read-only shared cache still serves
        pass


def _remove(path: Path) -> None:
    """Remove a dir so that nobody sees it half-removed: rename it away first."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    try:
        os.rename(path, trash)
    except OSError:
        trash = path
    shutil.rmtree(trash, ignore_errors=True)


def uv_command() -> list[str]:
    """How to run uv: the binary of the ``uv`` package, else ``uv`` on PATH."""
    try:
        import uv  # type: ignore[import-not-found]

        return [uv.find_uv_bin()]
    except (ImportError, FileNotFoundError):
        pass
    found = shutil.which("uv")
    if not found:
        raise ConfigError("deps=pip builds its environment with uv, which is not installed here: "
                          "`pip install uv` (into the environment that runs tfrun) and run again.")
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
            out = subprocess.run(words, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, cwd=self.work.parent, env={**os.environ, "UV_PYTHON_DOWNLOADS": "never"})
        except OSError as exc:
            raise self.failed(command, str(exc)) from exc
        self.log(out.stdout)
        if out.returncode != 0:
            raise self.failed(command, out.stdout)

    def failed(self, command: list[str], output: str) -> ConfigError:
        lines = [ln for ln in output.strip().splitlines() if ln.strip()]
        first = next((i for i, ln in enumerate(lines) if ln.lstrip().lower().startswith(("error", "×", "critical"))), None)
        quoted = lines[first:first + 20] if first is not None else lines[-15:]
        tool = ("uv pip install" if command[1] == "pip" else "uv " + command[1]) if command[0] == "uv" \
            else Path(command[0]).name
        hint = ""
        if self.dp.spec.get("pin_base") and "unsatisfiable" in output:
            hint = ("\n(packages the base environment has are pinned at its versions so that TensorFlow keeps "
                    "working: deps.pin_base=false lifts that)")
        what = " ".join(self.dp.packages)
        return ConfigError(f"deps={self.dp.kind} ({what}): building environment {self.dp.key} failed; "
                           f"`{tool}` said:\n" + "\n".join("  | " + ln for ln in quoted) + hint
                           + "\nNothing was started, and the failed build was removed from the cache.")

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
    out = subprocess.run([build.python(), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, cwd=build.work.parent)
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
            f"site's conda, or name it with deps.conda_exe=/path/to/conda; deps=pip needs only uv.")
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


def ensure(dp: DepsPlan, log: Path | None = None, echo: bool = False) -> None:
    """Make a planned environment exist: a cache hit does nothing but note the use; a miss builds it
    once under the key's lock. ``log`` also gets the build's output; ``echo`` copies it to stdout."""
    if dp.kind not in BUILT or not dp.key or not dp.path:
        return
    env = Path(dp.path)
    if is_complete(env):
        _touch_used(env)
        say(f"environment {dp.key} cached: {env}")
        return
    cache = env.parent
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with _lock(cache, dp.key, on_wait=lambda: say(f"environment {dp.key}: another process is building it; waiting")):
            if is_complete(env):
                _touch_used(env)
                say(f"environment {dp.key} was built by another process: {env}")
                return
            _clean_leftovers(cache, dp.key)
            _build_locked(dp, env, log, echo)
    except OSError as exc:  # a cache dir that cannot be written, a full disk
        raise ConfigError.invalid("deps.cache_dir", str(cache), f"a directory tfrun can write ({exc})") from exc


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
        meta = {"key": dp.key, "kind": dp.kind, "packages": dp.packages, "spec": dp.spec, "created": time.time(),
                "built_by": {"host": os.uname().nodename, "pid": os.getpid()}, "seconds": time.monotonic() - started}
        (work / META).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
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
    _touch_used(env)
    say(f"environment {dp.key} ready in {time.monotonic() - started:.1f} s: {env}")


# --- modules and containers -------------------------------------------------------------

_SHELL_VARS = {"_", "SHLVL", "PWD", "OLDPWD", "PS1", "PS2"}
_SNAPSHOT = "\necho; echo __tfrun_env__; env -0\n"


def _env_of(text: str) -> dict[str, str]:
    text = text[:text.rfind("\0")]  # what the module lines printed after `env -0` is not the environment
    return dict(item.split("=", 1) for item in text.split("\0") if "=" in item)


def module_changes(before: Mapping[str, str], after: Mapping[str, str], current: Mapping[str, str]) -> dict[str, str]:
    """What the module lines changed, applied to ``current``: a PATH-like value the modules
    extended keeps this process's entries (a login profile may have reset PATH itself)."""
    changed = {}
    for key, value in after.items():
        old = before.get(key)
        if old == value or key in _SHELL_VARS or key.startswith("BASH_FUNC_"):
            continue
        mine = current.get(key)
        if old and mine is not None and value.endswith(old):
            value = value[:-len(old)] + mine
        elif old and mine is not None and value.startswith(old):
            value = mine + value[len(old):]
        changed[key] = value
    return changed


def load_modules(lines: list[str]) -> dict[str, str]:
    """Run ``module`` lines in a login shell (where sites define ``module``) and apply what they
    change to this process's environment, which the local tasks inherit. Returns the changes."""
    script = ("type module >/dev/null 2>&1 || exit 97" + _SNAPSHOT
              + "\n".join(f"{line} || exit 98" for line in lines) + _SNAPSHOT)
    try:
        out = subprocess.run(["bash", "-lc", script], stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ConfigError(f"deps=modules: could not run bash to load modules: {exc}") from exc
    errors = out.stderr.decode(errors="replace").strip()
    if out.returncode == 97:
        raise ConfigError("deps=modules: there is no `module` command on this machine (`bash -lc 'type module'` "
                          "finds none): environment modules (Lmod, Environment Modules) are a cluster's. Run with "
                          "compute=slurm, where the modules are loaded in the job, or load what you need yourself "
                          "and use deps=none (deps.env sets variables).")
    if out.returncode != 0:
        raise ConfigError(f"deps.modules: `{' && '.join(lines)}` failed (exit {out.returncode}):\n"
                          + "\n".join("  | " + ln for ln in errors.splitlines()[-15:]))
    snapshots = out.stdout.decode(errors="replace").split("\n__tfrun_env__\n")
    changed = module_changes(_env_of(snapshots[1]), _env_of(snapshots[2]), os.environ)
    os.environ.update(changed)
    return changed


def check_runtime(dp: DepsPlan) -> None:
    """A container run here needs its runtime on PATH."""
    runtime = dp.command_prefix[0]
    if shutil.which(runtime) is None:
        raise ConfigError(f"deps.runtime={runtime}: `{runtime}` is not on PATH on this machine, so the image "
                          f"{dp.spec.get('image')} cannot run here. Install Apptainer (or SingularityCE), `module load` "
                          f"it, or run on a cluster that has it (compute=slurm).")


# --- the cache: what is there, and cleaning it ----------------------------------------

def _size(path: Path) -> int:
    total = 0
    for root, dirs, files in os.walk(path):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def entries(cache: Path) -> list[dict[str, Any]]:
    """Every environment in the cache: key, kind, packages, size, last use, complete or not."""
    rows: list[dict[str, Any]] = []
    if not cache.is_dir():
        return rows
    for path in sorted(cache.iterdir()):
        if path.name.startswith(".") or not path.is_dir():
            continue
        try:
            meta = json.loads((path / META).read_text())
        except (OSError, ValueError):
            meta = None
        stamp = next((p for p in (path / LAST_USED, path / META, path) if p.exists()), path)
        rows.append({"key": path.name, "path": str(path), "complete": meta is not None,
                     "kind": (meta or {}).get("kind") or path.name.split("-")[0],
                     "packages": (meta or {}).get("packages", []), "size": _size(path),
                     "last_used": stamp.stat().st_mtime})
    return rows


def prune(cache: Path, older_than_days: float | None = None, remove_all: bool = False) -> dict[str, list[str]]:
    """Remove environments (all, or unused for longer than the days given) and unfinished builds.

    An environment being built or removed by another process (its lock is held) is left alone.
    """
    done: dict[str, list[str]] = {"removed": [], "kept": [], "busy": []}
    now = time.time()
    for entry in entries(cache):
        stale = older_than_days is not None and now - entry["last_used"] > older_than_days * 86400
        if not (remove_all or stale or not entry["complete"]):
            done["kept"].append(entry["key"])
            continue
        with _lock(cache, entry["key"], blocking=False) as got:
            if got:
                _remove(Path(entry["path"]))
                (cache / ".specs" / f"{entry['key']}.json").unlink(missing_ok=True)
        done["removed" if got else "busy"].append(entry["key"])
    for leftover in sorted(cache.glob(".tmp-*")) + sorted(cache.glob(".trash-*")) if cache.is_dir() else []:
        key = leftover.name.split("-", 1)[1].rsplit("-", 1)[0].removesuffix(".log")
        with _lock(cache, key, blocking=False) as got:
            if got and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    return done
