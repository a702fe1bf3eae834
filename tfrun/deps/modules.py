"""``deps=modules``: environment modules (Lmod, Environment Modules), loaded in the job on
Slurm, or here in ``bash -lc`` before local tasks start."""

from __future__ import annotations

import os
import shlex
import subprocess
from typing import Mapping

from tfrun.errors import ConfigError


def load_lines(modules: list[str], purge: bool) -> list[str]:
    """The shell lines that load the modules (``module purge`` first if asked)."""
    return (["module purge"] if purge else []) + [f"module load {shlex.quote(m)}" for m in modules]


_SHELL_VARS = {"_", "SHLVL", "PWD", "OLDPWD", "PS1", "PS2"}
_SNAPSHOT = "\necho; echo __tfrun_env__; env -0\n"


def _env_of(text: str) -> dict[str, str]:
    text = text[: text.rfind("\0")]  # what the module lines printed after `env -0` is not the environment
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
            value = value[: -len(old)] + mine
        elif old and mine is not None and value.startswith(old):
            value = mine + value[len(old) :]
        changed[key] = value
    return changed


def load_modules(lines: list[str]) -> dict[str, str]:
    """Run ``module`` lines in a login shell (where sites define ``module``) and return what
    they change, applied to this process's environment: what the local tasks are to get.
    This process's own environment stays as it is (a notebook that launches a run must not
    keep the run's modules loaded)."""
    script = (
        "type module >/dev/null 2>&1 || exit 97"
        + _SNAPSHOT
        + "\n".join(f"{line} || exit 98" for line in lines)
        + _SNAPSHOT
    )
    try:
        out = subprocess.run(["bash", "-lc", script], stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ConfigError(f"deps=modules: could not run bash to load modules: {exc}") from exc
    errors = out.stderr.decode(errors="replace").strip()
    if out.returncode == 97:
        raise ConfigError(
            "deps=modules: there is no `module` command on this machine (`bash -lc 'type module'` "
            "finds none): environment modules (Lmod, Environment Modules) are a cluster's. Run with "
            "compute=slurm, where the modules are loaded in the job, or load what you need yourself "
            "and use deps=none (deps.env sets variables)."
        )
    if out.returncode != 0:
        raise ConfigError(
            f"deps.modules: `{' && '.join(lines)}` failed (exit {out.returncode}):\n"
            + "\n".join("  | " + ln for ln in errors.splitlines()[-15:])
        )
    snapshots = out.stdout.decode(errors="replace").split("\n__tfrun_env__\n")
    return module_changes(_env_of(snapshots[1]), _env_of(snapshots[2]), os.environ)
