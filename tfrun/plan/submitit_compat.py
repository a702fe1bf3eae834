"""Every use tfrun makes of submitit's private parts, in one place.

submitit renders its sbatch script and reads sacct's output in functions it does not
export, and records what it submitted in files of its own. tfrun needs the first to show
the exact script before submitting (``--dry-run``), the second to read many jobs' states
from one sacct call, and the third to find a job its follower submitted just before it was
killed. Each function here wraps
one such part; ``tests/test_compat.py`` checks every one against the installed submitit
and names the upgrade that changed it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

# The module submitit's own sbatch script runs under srun; tfrun's rendering names it too.
SUBMIT_MODULE = "submitit.core._submit"


def sbatch_script(command: str, folder: str | os.PathLike[str], **parameters: Any) -> str:
    """The sbatch script ``SlurmExecutor`` writes for these parameters (``_make_sbatch_string``)."""
    from submitit.slurm.slurm import _make_sbatch_string

    # It reads the folder through Path(folder), and types it str | Path: any path-like is that Path.
    return _make_sbatch_string(command=command, folder=Path(folder), **parameters)


def mem(mem_gb: float) -> str:
    """``--mem`` as submitit writes it for ``mem_gb`` (``_convert_mem``)."""
    from submitit.slurm.slurm import _convert_mem

    return str(_convert_mem(mem_gb))


def read_sacct(text: str) -> dict[str, dict[str, str]]:
    """``{job_id: {"State": ..., ...}}`` from ``sacct --parsable2`` output, array elements
    included, as submitit parses it (``SlurmInfoWatcher.read_info``)."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    return dict(SlurmInfoWatcher().read_info(text))


def submitted(folder: str | os.PathLike[str]) -> Iterator[tuple[str, tuple[Any, ...]]]:
    """(job id, the arguments of the function it runs) of each job submitit submitted from
    ``folder``: its ``<job id>_submitted.pkl``, a pickled ``DelayedSubmission``."""
    import pickle

    for path in sorted(Path(folder).glob("*_submitted.pkl")):
        try:
            with open(path, "rb") as f:
                args = getattr(pickle.load(f), "args", ())
        except Exception:  # a file being written, or not submitit's: no job to find there
            continue
        yield path.name.split("_", 1)[0], tuple(args)
