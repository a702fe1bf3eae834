"""The packages a run needs (``deps=pip|conda|modules|container``): built once, reused everywhere.

Two halves, like the backends. :func:`plan_for` is pure: it turns the composed ``deps``
section into a :class:`DepsPlan` (the environment's key, path, whether it is cached, the
interpreter the tasks run, the job's setup lines, the container command) that
``--dry-run`` shows; it reads files but starts no process. :func:`prepare`, called by the
launchers before any task starts, acts: it builds a missing environment (:func:`ensure`),
loads modules for local tasks, checks a container runtime is there. With
``deps.build_on=job`` the job's setup runs ``python -m tfrun.deps build SPEC`` instead.

An environment lives in ``deps.cache_dir`` under ``<kind>-<hash>``, the hash covering
everything that defines it. It is built under a file lock (concurrent runs that need the
same new environment build it once) in a temporary dir renamed into place on success, so
no run ever sees a half-built one and a failed build leaves nothing behind. Cache layout::

    pip-<hash>/             a finished environment; tfrun-env.json inside says what it holds
    .tmp-pip-<hash>-<pid>/  a build in progress
    .locks/<key>.lock       held while building or removing <key>
    .specs/<key>.json       what a job will build (deps.build_on=job)
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, NamedTuple

from tfrun.errors import ConfigError

KINDS = ("none", "pip", "conda", "modules", "container")
BUILT = ("pip", "conda")  # kinds whose environment tfrun builds and caches
BUILD_ON = ("login", "job")
BASES = ("inherit", "isolated")
RUNTIMES = ("apptainer", "singularity")
CONDA_TOOLS = ("micromamba", "mamba", "conda")
DEFAULT_CACHE = "~/.cache/tfrun/envs"
META = "tfrun-env.json"  # written last: an environment without it is unfinished
LAST_USED = ".tfrun-last-used"  # touched by every run that uses the environment
BUILD_LOG = "tfrun-build.log"
CONSTRAINTS = ".tfrun-base-constraints.txt"
# What a task needs of tfrun's own stack (pure Python) in an interpreter that is not tfrun's:
# the bootstrap, and submitit's job runner on Slurm.
RUNTIME_MODULES = ("tfrun", "submitit", "cloudpickle", "typing_extensions")
CONTAINER_LIB = "/opt/tfrun/lib"


@dataclass(frozen=True)
class DepsPlan:
    """What the run's environment is and how it is made ready; plain data (in plan.json)."""

    kind: str = "none"
    target: str = "local"
    python: str = ""  # the interpreter every task runs (inside the image for deps=container)
    base_python: str = ""  # the interpreter running tfrun: builds the environment
    key: str | None = None  # <kind>-<hash> for built environments
    path: str | None = None
    cached: bool = False  # complete in the cache when planned
    build_on: str | None = None  # login | job (built kinds on Slurm)
    packages: list[str] = field(default_factory=list)  # what the environment adds, for people
    spec: dict[str, Any] = field(default_factory=dict)  # everything the hash covers, and how to build
    steps: list[list[str]] = field(default_factory=list)  # build commands; {env} is the dir being built
    setup: list[str] = field(default_factory=list)  # shell lines of the job before srun
    command_prefix: list[str] = field(default_factory=list)  # words before `python` (container runtime)
    modules: list[str] = field(default_factory=list)  # `module` commands run before local tasks start

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DepsPlan":
        """Inverse of :meth:`to_dict`."""
        return cls(**data)


class _Ctx(NamedTuple):
    deps: Mapping[str, Any]
    base_python: str
    compute: Mapping[str, Any]
    run_dir: str
    script: str
    source_dir: str
    cwd: Path


def say(message: str) -> None:
    """A progress line of tfrun's on stderr."""
    print(f"tfrun: {message}", file=sys.stderr, flush=True)


# --- the pure half --------------------------------------------------------------------

def plan_for(deps: Mapping[str, Any], base_python: str, compute: Mapping[str, Any], run_dir: str,
             script: str, source_dir: str, cwd: Path) -> DepsPlan:
    """The :class:`DepsPlan` of a composed ``deps`` section. Raises ConfigError for what cannot work."""
    kind = deps.get("kind", "none")
    if kind not in KINDS:
        raise ConfigError.invalid("deps.kind", kind, KINDS)
    # entry.python may be a name on PATH (python3.11) or a path
    base = (shutil.which(base_python) or base_python) if os.sep not in base_python else os.path.abspath(base_python)
    ctx = _Ctx(deps, base, compute, run_dir, script, source_dir, cwd)
    if kind == "none":
        return DepsPlan(kind="none", target=compute["target"], python=base_python, base_python=ctx.base_python)
    return {"pip": _plan_pip, "conda": _plan_conda, "modules": _plan_modules, "container": _plan_container}[kind](ctx)


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError.invalid(key, value, allowed)
    return str(value)


def _input_file(key: str, value: Any, cwd: Path) -> Path | None:
    if value in (None, ""):
        return None
    path = (cwd / Path(str(value)).expanduser()).resolve()
    if not path.is_file():
        raise ConfigError.invalid(key, value, f"an existing file (looked for {path})")
    return path


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cache_root(value: Any = None) -> Path:
    """The environment cache: ``value``, else $TFRUN_ENV_CACHE, else ~/.cache/tfrun/envs."""
    return Path(str(value or os.environ.get("TFRUN_ENV_CACHE") or DEFAULT_CACHE)).expanduser().absolute()


_DESCRIBE = r"""
import json, os, site, sys, sysconfig, platform
dirs = list(site.getsitepackages()) + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
try:
    libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
except (AttributeError, ValueError, OSError):
    libc = ""
info = {"version": platform.python_version(), "prefix": sys.prefix, "base_prefix": sys.base_prefix,
        "site": [d for i, d in enumerate(dirs) if os.path.isdir(d) and d not in dirs[:i]],
        "platform": sysconfig.get_platform(), "libc": libc}
"""


def interpreter(python: str) -> dict[str, Any]:
    """Version, prefixes, site dirs and platform of an interpreter (tfrun's own: no process)."""
    if os.path.abspath(python) == os.path.abspath(sys.executable):
        namespace: dict[str, Any] = {}
        exec(_DESCRIBE, namespace)
        return namespace["info"]
    try:
        out = subprocess.run([python, "-c", _DESCRIBE + "print(json.dumps(info))"], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ConfigError.invalid("entry.python", python, f"an interpreter that runs ({exc})") from exc
    if out.returncode != 0:
        raise ConfigError.invalid("entry.python", python, f"an interpreter that runs ({out.stderr.strip()[-300:]})")
    return json.loads(out.stdout)


def installed(site_dirs: list[str]) -> list[str]:
    """The distributions in site dirs (``name-version.dist-info`` names): cheap, and exact enough to hash."""
    names: list[str] = []
    for directory in site_dirs:
        try:
            names += [n for n in os.listdir(directory) if n.endswith((".dist-info", ".egg-info"))]
        except OSError:
            continue
    return sorted(names)


def tfrun_requirement() -> list[str]:
    """How to install the running tfrun into another environment (editable if it is)."""
    from importlib import metadata

    try:
        dist = metadata.distribution("tfrun")
    except metadata.PackageNotFoundError:
        return [str(Path(__file__).resolve().parents[1])]
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    url = direct.get("url", "")
    if url.startswith("file://"):
        path = url[len("file://"):]
        return ["-e", path] if direct.get("dir_info", {}).get("editable") else [path]
    return [f"tfrun=={dist.version}"]


def runtime_sources() -> dict[str, str]:
    """Where tfrun's pure-Python runtime lives here: {module: package dir or file}."""
    found = {}
    for name in RUNTIME_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None:
            continue
        locations = list(spec.submodule_search_locations or [])
        found[name] = locations[0] if locations else str(spec.origin)
    return found


def _key(kind: str, spec: Mapping[str, Any]) -> str:
    return f"{kind}-{_sha256(json.dumps(spec, sort_keys=True).encode())[:16]}"


def is_complete(env: Path) -> bool:
    """A finished environment: its META is written last (and a pip env appears by rename)."""
    return (env / META).is_file()


def _built(ctx: _Ctx, kind: str, spec: dict[str, Any], packages: list[str], steps: list[list[str]],
           python_in_env: str = "bin/python") -> DepsPlan:
    """The plan of an environment tfrun builds, wherever the kind."""
    build_on = _choice("deps.build_on", ctx.deps.get("build_on", "login"), BUILD_ON)
    cache = cache_root(ctx.deps.get("cache_dir"))
    key = _key(kind, spec)
    env = cache / key
    setup = []
    if ctx.compute["target"] == "slurm" and build_on == "job":
        setup = [f"{shlex.quote(ctx.base_python)} -u -m tfrun.deps build "
                 f"{shlex.quote(str(spec_file(cache, key)))} || exit 1"]
    return DepsPlan(kind=kind, target=ctx.compute["target"], python=str(env / python_in_env),
                    base_python=ctx.base_python, key=key, path=str(env), cached=is_complete(env),
                    build_on=build_on, packages=packages, spec=spec, steps=steps, setup=setup)


def _plan_pip(ctx: _Ctx) -> DepsPlan:
    d = ctx.deps
    base = _choice("deps.base", d.get("base", "inherit"), BASES)
    packages = [str(p) for p in d.get("pip_packages") or []]
    requirements = _input_file("deps.requirements", d.get("requirements"), ctx.cwd)
    if not packages and requirements is None:
        raise ConfigError.invalid("deps.pip_packages", packages,
                                  "at least one package (or deps.requirements=FILE), e.g. deps.pip_packages=[tabulate]")
    info = interpreter(ctx.base_python)
    pin = bool(d.get("pin_base", True))
    extra = tfrun_requirement() if base == "isolated" else []
    spec = {
        "kind": "pip", "base": base, "python": ctx.base_python, "python_version": info["version"],
        "prefix": info["prefix"], "platform": info["platform"], "libc": info["libc"],
        "packages": packages, "install_args": [str(a) for a in d.get("install_args") or []],
        # the file's content, not its path (files it includes with -r are not read)
        "requirements": _sha256(requirements.read_bytes()) if requirements else None,
        "pin_base": pin, "tfrun": extra,
        # The base's packages: visible through the env (inherit) or pinned in it; a change rebuilds.
        "base_packages": _sha256("\n".join(installed(info["site"])).encode()) if pin or base == "inherit" else None,
        # A base that is itself a virtualenv: --system-site-packages reaches only its interpreter's.
        "base_site": [s for s in info["site"] if s.startswith(info["prefix"] + os.sep)]
        if base == "inherit" and info["prefix"] != info["base_prefix"] else [],
        "site": info["site"],
    }
    steps = [
        ["uv", "venv", "--relocatable", "--python", ctx.base_python,
         *(["--system-site-packages"] if base == "inherit" else []), "{env}"],
        ["uv", "pip", "install", "--python", "{env}/bin/python", *(["--constraint", "{env}/" + CONSTRAINTS] if pin else []),
         *(["-r", str(requirements)] if requirements else []), *spec["install_args"], *packages, *extra],
    ]
    return _built(ctx, "pip", spec, packages + ([f"-r {requirements.name}"] if requirements else []), steps)


def find_conda(explicit: str | None = None) -> str | None:
    """The conda tool to use: ``explicit`` (a name or path), else micromamba, mamba, conda on PATH."""
    if explicit:
        return shutil.which(explicit) or (explicit if os.access(explicit, os.X_OK) else None)
    for name in CONDA_TOOLS:
        if shutil.which(name):
            return shutil.which(name)
    for var in ("MAMBA_EXE", "CONDA_EXE"):  # set by an activated (micro)mamba or conda shell
        if os.environ.get(var) and os.access(os.environ[var], os.X_OK):
            return os.environ[var]
    return None


def conda_steps(tool: str, spec: Mapping[str, Any]) -> list[list[str]]:
    """The commands that create a conda env at ``{env}`` with ``tool`` (micromamba, mamba or conda)."""
    channels = [w for c in spec["channels"] for w in ("--channel", c)]
    packages, env_file = list(spec["packages"]), spec.get("environment_file")
    if Path(tool).name.startswith("micromamba"):  # micromamba create takes an environment.yml with --file
        return [[tool, "create", "--yes", "--prefix", "{env}", *channels,
                 *(["--file", env_file["path"]] if env_file else []), *packages]]
    if env_file:  # conda/mamba: an environment.yml needs `env create`; extra packages come after
        steps = [[tool, "env", "create", "--prefix", "{env}", "--file", env_file["path"]]]
        return steps + ([[tool, "install", "--yes", "--prefix", "{env}", *channels, *packages]] if packages else [])
    return [[tool, "create", "--yes", "--prefix", "{env}", *channels, *packages]]


def _plan_conda(ctx: _Ctx) -> DepsPlan:
    d = ctx.deps
    packages = [str(p) for p in d.get("conda_packages") or []]
    env_file = _input_file("deps.environment_file", d.get("environment_file"), ctx.cwd)
    if not packages and env_file is None:
        raise ConfigError.invalid("deps.conda_packages", packages,
                                  "at least one package (or deps.environment_file=FILE), e.g. deps.conda_packages=[numpy]")
    if env_file is None and not any(p.split("=")[0].split("<")[0].split(">")[0].strip() == "python" for p in packages):
        # tfrun's own code runs in the env: keep the Python version tfrun runs with.
        packages.append("python=" + ".".join(interpreter(ctx.base_python)["version"].split(".")[:2]))
    spec = {
        "kind": "conda", "packages": packages, "channels": [str(c) for c in d.get("channels") or []],
        "environment_file": {"path": str(env_file), "sha256": _sha256(env_file.read_bytes())} if env_file else None,
        "pip_packages": [str(p) for p in d.get("pip_packages") or []],
        "platform": interpreter(sys.executable)["platform"], "runtime": runtime_sources(),
        "conda_exe": d.get("conda_exe"),
    }
    tool = find_conda(d.get("conda_exe")) or str(d.get("conda_exe") or "conda")
    steps = conda_steps(Path(tool).name, spec)
    if spec["pip_packages"]:
        steps.append(["uv", "pip", "install", "--python", "{env}/bin/python", *spec["pip_packages"]])
    return _built(ctx, "conda", spec, packages + spec["pip_packages"], steps)


def _plan_modules(ctx: _Ctx) -> DepsPlan:
    d = ctx.deps
    modules = [str(m) for m in d.get("modules") or []]
    if not modules and not d.get("purge"):
        raise ConfigError.invalid("deps.modules", modules, "at least one module name, e.g. deps.modules=[cuda/12.4]")
    lines = (["module purge"] if d.get("purge") else []) + [f"module load {shlex.quote(m)}" for m in modules]
    slurm = ctx.compute["target"] == "slurm"
    return DepsPlan(kind="modules", target=ctx.compute["target"], python=ctx.base_python, base_python=ctx.base_python,
                    packages=modules, setup=lines if slurm else [], modules=[] if slurm else lines)


def container_binds(ctx: _Ctx, user_binds: list[str]) -> list[str]:
    """User binds, the dirs the run reads and writes, and tfrun's runtime at CONTAINER_LIB."""
    own = [os.path.dirname(ctx.run_dir), ctx.source_dir, os.path.dirname(ctx.script)]
    runtime = [f"{src}:{CONTAINER_LIB}/{os.path.basename(src) if os.path.isfile(src) else name}:ro"
               for name, src in runtime_sources().items()]
    return list(dict.fromkeys([*user_binds, *own, *runtime]))


def _plan_container(ctx: _Ctx) -> DepsPlan:
    d = ctx.deps
    image = d.get("image")
    if image in (None, "", "???"):
        raise ConfigError.invalid("deps.image", image, "a .sif image file or a URI, e.g. deps.image=docker://tensorflow/tensorflow")
    if "://" not in str(image):
        image = str(_input_file("deps.image", image, ctx.cwd))
    runtime = _choice("deps.runtime", d.get("runtime", "apptainer"), RUNTIMES)
    gpus = bool(ctx.compute.get("gpus_per_node") or ctx.compute.get("gpus_per_task"))
    nv = gpus if d.get("nv") is None else bool(d.get("nv"))
    prefix = [runtime, "exec", *(["--nv"] if nv else []), *[str(a) for a in d.get("exec_args") or []],
              "--bind", ",".join(container_binds(ctx, [str(b) for b in d.get("binds") or []])),
              "--env", f"PYTHONPATH={CONTAINER_LIB}", str(image)]
    return DepsPlan(kind="container", target=ctx.compute["target"], python=str(d.get("python") or "python3"),
                    base_python=ctx.base_python, packages=[str(image)], spec={"image": str(image), "runtime": runtime},
                    command_prefix=prefix)


def python_words(plan: Any) -> list[str]:
    """What runs a task's Python: the container command and its python, or just the python."""
    return [*(plan.deps or {}).get("command_prefix", []), plan.python]


def setup_lines(plan: Any) -> list[str]:
    """The job's setup lines the deps add (module loads, an in-job build)."""
    return list((plan.deps or {}).get("setup", []))


def describe(deps: Mapping[str, Any]) -> list[str]:
    """Lines for ``--dry-run``: what the environment is, where, and whether it is ready."""
    if not deps or deps.get("kind", "none") == "none":
        return []
    dp = DepsPlan.from_dict(deps)
    lines = [f"deps:       {dp.kind}: {' '.join(dp.packages)}"]
    if dp.key:
        when = ("cached" if dp.cached else
                "not built yet: the job's setup line builds it, build_on=job" if dp.setup else
                "not built yet: built before the tasks start")
        lines += [f"  env:      {dp.key} ({when})", f"  env path: {dp.path}"]
        # ENV: a temporary dir next to the env path, renamed to it when the build succeeds
        lines += [f"  build:    {shlex.join(step).replace('{env}', 'ENV')}" for step in dp.steps] if not dp.cached else []
    lines += [f"  setup:    {line}" for line in dp.setup]
    lines += [f"  before the tasks (bash -lc): {line}" for line in dp.modules]
    if dp.command_prefix:
        lines.append(f"  container: {shlex.join(dp.command_prefix)}")
    return lines



# --- the acting half: what the launchers call -----------------------------------------

def ensure(dp: DepsPlan, log: Path | None = None, echo: bool = False) -> None:
    """Make the planned environment ready here (see :func:`tfrun.deps_build.ensure`)."""
    from tfrun import deps_build

    deps_build.ensure(dp, log, echo)


def prepare(plan: Any) -> None:
    """Make the run's environment ready before any of its tasks start (the launchers call this).

    Locally: build a missing environment, load modules, check the container runtime. On
    Slurm: build on this (login) node, or with build_on=job leave the spec where the job's
    setup line finds it. A ConfigError marks the run FAILED with the reason and nothing starts.
    """
    if not getattr(plan, "deps", None):
        return
    from tfrun import deps_build, runs

    dp = DepsPlan.from_dict(plan.deps)
    try:
        if dp.kind in BUILT and dp.target == "slurm" and dp.build_on == "job":
            assert dp.path and dp.key
            runs.write_json(spec_file(Path(dp.path).parent, dp.key), dp.to_dict())
            say(f"environment {dp.key} {'cached' if is_complete(Path(dp.path)) else 'is built in the job (build_on=job)'}: "
                f"{dp.path}")
        elif dp.kind in BUILT:
            ensure(dp, Path(plan.run_dir) / "logs" / "deps.log")
        elif dp.kind == "modules" and dp.modules:
            changed = deps_build.load_modules(dp.modules)
            say(f"loaded modules ({'; '.join(dp.modules)}) in bash -lc: set {' '.join(sorted(changed)) or 'nothing'}")
        elif dp.kind == "container" and dp.target == "local":
            deps_build.check_runtime(dp)
    except ConfigError as exc:
        runs.update_status(plan.run_dir, run_id=plan.run_id, state="FAILED", target=plan.target, backend=plan.backend,
                           reason=str(exc), ended=time.time())
        raise


def spec_file(cache: Path, key: str) -> Path:
    """Where a job finds the plan of the environment it builds (deps.build_on=job)."""
    return cache / ".specs" / f"{key}.json"


# --- tfrun env list|prune ----------------------------------------------------------------

def _human(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def _when(stamp: float) -> str:
    days = (time.time() - stamp) / 86400
    ago = f"{days:.0f} d ago" if days >= 1 else f"{days * 24:.0f} h ago" if days * 24 >= 1 else "just now"
    return f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(stamp))} ({ago})"


def env_command(action: str, cache_dir: str | None = None, older_than_days: float | None = None,
                remove_all: bool = False) -> int:
    """``tfrun env list`` / ``tfrun env prune [--older-than DAYS] [--all]``."""
    from tfrun import deps_build

    cache = cache_root(cache_dir)
    if action == "list":
        rows = deps_build.entries(cache)
        print(f"{'KEY':<22} {'KIND':<6} {'SIZE':>9}  {'LAST USED':<28} PACKAGES")
        for row in rows:
            packages = " ".join(row["packages"]) if row["complete"] else "(unfinished build)"
            print(f"{row['key']:<22} {row['kind']:<6} {_human(row['size']):>9}  {_when(row['last_used']):<28} {packages}")
        print(f"{len(rows)} environment(s), {_human(sum(r['size'] for r in rows))} in {cache}")
        return 0
    done = deps_build.prune(cache, older_than_days, remove_all)
    for key in done["removed"]:
        print(f"tfrun: removed {key}")
    for key in done["busy"]:
        print(f"tfrun: kept {key}: another process is building or removing it")
    hint = "" if remove_all or older_than_days is not None else " (--older-than DAYS or --all remove environments)"
    print(f"tfrun: removed {len(done['removed'])}, kept {len(done['kept']) + len(done['busy'])} in {cache}{hint}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m tfrun.deps build SPEC.json|RUN_DIR``: build an environment (a job's setup line)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "build":
        print("usage: python -m tfrun.deps build SPEC.json|RUN_DIR", file=sys.stderr)
        return 2
    source = Path(argv[1])
    try:
        if source.is_dir():
            data, log = json.loads((source / "plan.json").read_text())["deps"], source / "logs" / "deps.log"
        else:
            data, log = json.loads(source.read_text()), None
        ensure(DepsPlan.from_dict(data), log, echo=True)
    except (OSError, ValueError, KeyError) as exc:
        print(f"tfrun: error: cannot read the environment's spec from {source}: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"tfrun: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
