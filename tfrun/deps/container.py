"""``deps=container``: the tasks run inside an Apptainer/Singularity image, with the run's
dirs and tfrun's pure-Python runtime bound into it."""

from __future__ import annotations

import os
import shutil
from typing import Any, Mapping

from tfrun.errors import ConfigError

RUNTIMES = ("apptainer", "singularity")
CONTAINER_LIB = "/opt/tfrun/lib"  # where tfrun's runtime is bound inside the image (on PYTHONPATH)


def binds(user_binds: list[str], run_dir: str, source_dir: str, script: str, runtime: Mapping[str, str]) -> list[str]:
    """User binds, the dirs the run reads and writes, and tfrun's runtime at CONTAINER_LIB."""
    own = [os.path.dirname(run_dir), source_dir, os.path.dirname(script)]
    lib = [
        f"{src}:{CONTAINER_LIB}/{os.path.basename(src) if os.path.isfile(src) else name}:ro"
        for name, src in runtime.items()
    ]
    return list(dict.fromkeys([*user_binds, *own, *lib]))


def command_prefix(runtime: str, image: str, nv: bool, exec_args: list[Any], bound: list[str]) -> list[str]:
    """The words before the image's python: ``apptainer exec [--nv] ... --bind ... IMAGE``."""
    return [
        runtime,
        "exec",
        *(["--nv"] if nv else []),
        *[str(a) for a in exec_args],
        "--bind",
        ",".join(bound),
        "--env",
        f"PYTHONPATH={CONTAINER_LIB}",
        str(image),
    ]


def check_runtime(runtime: str, image: str) -> None:
    """A container run here needs its runtime on PATH."""
    if shutil.which(runtime) is None:
        raise ConfigError(
            f"deps.runtime={runtime}: `{runtime}` is not on PATH on this machine, so the image "
            f"{image} cannot run here. Install Apptainer (or SingularityCE), `module load` "
            f"it, or run on a cluster that has it (compute=slurm)."
        )
