"""The pure half of :mod:`tfrun.deps`: the composed ``deps`` section becomes a
:class:`DepsPlan` (the environment's key, path, whether it is cached, the interpreter the
tasks run, the job's setup lines, the container command) that ``--dry-run`` shows. It reads
files and asks an interpreter about itself, but builds nothing and starts no task.

A built environment (pip, conda) is named ``<kind>-<hash>`` in the cache
(:mod:`tfrun.deps.cache`), the hash covering everything that defines it: the packages, a
requirements file's content, the base interpreter, its packages and the platform.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, NamedTuple

from tfrun.deps import container
from tfrun.deps.cache import cache_root, is_complete, spec_file
from tfrun.deps.modules import load_lines
from tfrun.errors import ConfigError

KINDS = ("none", "pip", "conda", "modules", "container")
BUILT = ("pip", "conda")  # kinds whose environment tfrun builds and caches
BUILD_ON = ("login", "job")
BASES = ("inherit", "isolated")
CONDA_TOOLS = ("micromamba", "mamba", "conda")
CONSTRAINTS = ".tfrun-base-constraints.txt"
# What a task needs of tfrun's own stack (pure Python) in an interpreter that is not tfrun's:
# the bootstrap, and submitit's job runner on Slurm.
RUNTIME_MODULES = ("tfrun", "submitit", "cloudpickle", "typing_extensions")


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
    target: str  # local or slurm
    gpus: bool  # the run asks for GPUs
    run_dir: str
    script: str
    source_dir: str
    cwd: Path


def say(message: str) -> None:
    """A progress line of tfrun's on stderr."""
    print(f"tfrun: {message}", file=sys.stderr, flush=True)


def plan_for(
    deps: Mapping[str, Any],
    base_python: str,
    target: str,
    gpus: bool,
    run_dir: str,
    script: str,
    source_dir: str,
    cwd: Path,
) -> DepsPlan:
    """The :class:`DepsPlan` of a composed ``deps`` section, for a run on ``target`` (local or
    slurm) that asks for GPUs or not. Raises ConfigError for what cannot work."""
    kind = deps.get("kind", "none")
    if kind not in KINDS:
        raise ConfigError.invalid("deps.kind", kind, KINDS)
    # entry.python may be a name on PATH (python3.11) or a path
    base = (shutil.which(base_python) or base_python) if os.sep not in base_python else os.path.abspath(base_python)
    ctx = _Ctx(deps, base, target, gpus, run_dir, script, source_dir, cwd)
    if kind == "none":
        if target == "local" and os.path.abspath(base) != os.path.abspath(sys.executable):
            interpreter(base)  # it runs here: else a clear error now, not a traceback at launch
        return DepsPlan(kind="none", target=target, python=base_python, base_python=ctx.base_python)
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
        out = subprocess.run(
            [python, "-c", _DESCRIBE + "print(json.dumps(info))"], capture_output=True, text=True, timeout=60
        )
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
        return [str(Path(__file__).resolve().parents[2])]  # the checkout tfrun/ is in
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    url = direct.get("url", "")
    if url.startswith("file://"):
        path = url[len("file://") :]
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


def _built(
    ctx: _Ctx,
    kind: str,
    spec: dict[str, Any],
    packages: list[str],
    steps: list[list[str]],
    python_in_env: str = "bin/python",
) -> DepsPlan:
    """The plan of an environment tfrun builds, wherever the kind."""
    build_on = _choice("deps.build_on", ctx.deps.get("build_on", "login"), BUILD_ON)
    cache = cache_root(ctx.deps.get("cache_dir"))
    key = _key(kind, spec)
    env = cache / key
    setup = []
    if ctx.target == "slurm" and build_on == "job":
        setup = [
            f"{shlex.quote(ctx.base_python)} -u -m tfrun.deps build {shlex.quote(str(spec_file(cache, key)))} || exit 1"
        ]
    return DepsPlan(
        kind=kind,
        target=ctx.target,
        python=str(env / python_in_env),
        base_python=ctx.base_python,
        key=key,
        path=str(env),
        cached=is_complete(env),
        build_on=build_on,
        packages=packages,
        spec=spec,
        steps=steps,
        setup=setup,
    )


def _plan_pip(ctx: _Ctx) -> DepsPlan:
    d = ctx.deps
    base = _choice("deps.base", d.get("base", "inherit"), BASES)
    packages = [str(p) for p in d.get("pip_packages") or []]
    requirements = _input_file("deps.requirements", d.get("requirements"), ctx.cwd)
    if not packages and requirements is None:
        raise ConfigError.invalid(
            "deps.pip_packages",
            packages,
            "at least one package (or deps.requirements=FILE), e.g. deps.pip_packages=[tabulate]",
        )
    info = interpreter(ctx.base_python)
    pin = bool(d.get("pin_base", True))
    extra = tfrun_requirement() if base == "isolated" else []
    spec = {
        "kind": "pip",
        "base": base,
        "python": ctx.base_python,
        "python_version": info["version"],
        "prefix": info["prefix"],
        "platform": info["platform"],
        "libc": info["libc"],
        "packages": packages,
        "install_args": [str(a) for a in d.get("install_args") or []],
        # the file's content, not its path (files it includes with -r are not read)
        "requirements": _sha256(requirements.read_bytes()) if requirements else None,
        "pin_base": pin,
        "tfrun": extra,
        # The base's packages: visible through the env (inherit) or pinned in it; a change rebuilds.
        "base_packages": _sha256("\n".join(installed(info["site"])).encode()) if pin or base == "inherit" else None,
        # A base that is itself a virtualenv: --system-site-packages reaches only its interpreter's.
        "base_site": [s for s in info["site"] if s.startswith(info["prefix"] + os.sep)]
        if base == "inherit" and info["prefix"] != info["base_prefix"]
        else [],
        "site": info["site"],
    }
    steps = [
        [
            "uv",
            "venv",
            "--relocatable",
            "--python",
            ctx.base_python,
            *(["--system-site-packages"] if base == "inherit" else []),
            "{env}",
        ],
        [
            "uv",
            "pip",
            "install",
            "--python",
            "{env}/bin/python",
            *(["--constraint", "{env}/" + CONSTRAINTS] if pin else []),
            *(["-r", str(requirements)] if requirements else []),
            *spec["install_args"],
            *packages,
            *extra,
        ],
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
        return [
            [
                tool,
                "create",
                "--yes",
                "--prefix",
                "{env}",
                *channels,
                *(["--file", env_file["path"]] if env_file else []),
                *packages,
            ]
        ]
    if env_file:  # conda/mamba: an environment.yml needs `env create`; extra packages come after
        steps = [[tool, "env", "create", "--prefix", "{env}", "--file", env_file["path"]]]
        return steps + ([[tool, "install", "--yes", "--prefix", "{env}", *channels, *packages]] if packages else [])
    return [[tool, "create", "--yes", "--prefix", "{env}", *channels, *packages]]


def _plan_conda(ctx: _Ctx) -> DepsPlan:
    d = ctx.deps
    packages = [str(p) for p in d.get("conda_packages") or []]
    env_file = _input_file("deps.environment_file", d.get("environment_file"), ctx.cwd)
    if not packages and env_file is None:
        raise ConfigError.invalid(
            "deps.conda_packages",
            packages,
            "at least one package (or deps.environment_file=FILE), e.g. deps.conda_packages=[numpy]",
        )
    if env_file is None and not any(p.split("=")[0].split("<")[0].split(">")[0].strip() == "python" for p in packages):
        # tfrun's own code runs in the env: keep the Python version tfrun runs with.
        packages.append("python=" + ".".join(interpreter(ctx.base_python)["version"].split(".")[:2]))
    spec = {
        "kind": "conda",
        "packages": packages,
        "channels": [str(c) for c in d.get("channels") or []],
        "environment_file": {"path": str(env_file), "sha256": _sha256(env_file.read_bytes())} if env_file else None,
        "pip_packages": [str(p) for p in d.get("pip_packages") or []],
        "platform": interpreter(sys.executable)["platform"],
        "runtime": runtime_sources(),
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
    lines = load_lines(modules, bool(d.get("purge")))
    slurm = ctx.target == "slurm"
    return DepsPlan(
        kind="modules",
        target=ctx.target,
        python=ctx.base_python,
        base_python=ctx.base_python,
        packages=modules,
        setup=lines if slurm else [],
        modules=[] if slurm else lines,
    )


def _plan_container(ctx: _Ctx) -> DepsPlan:
    d = ctx.deps
    image = d.get("image")
    if image in (None, "", "???"):
        raise ConfigError.invalid(
            "deps.image", image, "a .sif image file or a URI, e.g. deps.image=docker://tensorflow/tensorflow"
        )
    if "://" not in str(image):
        image = str(_input_file("deps.image", image, ctx.cwd))
    runtime = _choice("deps.runtime", d.get("runtime", "apptainer"), container.RUNTIMES)
    nv = ctx.gpus if d.get("nv") is None else bool(d.get("nv"))
    bound = container.binds(
        [str(b) for b in d.get("binds") or []], ctx.run_dir, ctx.source_dir, ctx.script, runtime_sources()
    )
    prefix = container.command_prefix(runtime, str(image), nv, list(d.get("exec_args") or []), bound)
    return DepsPlan(
        kind="container",
        target=ctx.target,
        python=str(d.get("python") or "python3"),
        base_python=ctx.base_python,
        packages=[str(image)],
        spec={"image": str(image), "runtime": runtime},
        command_prefix=prefix,
    )


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
        when = (
            "cached"
            if dp.cached
            else "not built yet: the job's setup line builds it, build_on=job"
            if dp.setup
            else "not built yet: built before the tasks start"
        )
        lines += [f"  env:      {dp.key} ({when})", f"  env path: {dp.path}"]
        # ENV: a temporary dir next to the env path, renamed to it when the build succeeds
        lines += (
            [f"  build:    {shlex.join(step).replace('{env}', 'ENV')}" for step in dp.steps] if not dp.cached else []
        )
    lines += [f"  setup:    {line}" for line in dp.setup]
    lines += [f"  before the tasks (bash -lc): {line}" for line in dp.modules]
    if dp.command_prefix:
        lines.append(f"  container: {shlex.join(dp.command_prefix)}")
    return lines
