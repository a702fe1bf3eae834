"""Every use tfrun makes of submitit's private parts, in one place.

submitit renders its sbatch script and reads sacct's output in functions it does not
export. tfrun needs the first to show the exact script before submitting (``--dry-run``)
and the second to read many jobs' states from one sacct call. Each function here wraps
one such part; ``tests/test_compat.py`` checks every one against the installed submitit
and names the upgrade that changed it.
"""
from __future__ import annotations

import os
from typing import Any

# The module submitit's own sbatch script runs under srun; tfrun's rendering names it too.
SUBMIT_MODULE = "submitit.core._submit"


def sbatch_script(command: str, folder: str | os.PathLike[str], **parameters: Any) -> str:
    """The sbatch script ``SlurmExecutor`` writes for these parameters (``_make_sbatch_string``)."""
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(command=command, folder=folder, **parameters)


def mem(mem_gb: float) -> str:
    """``--mem`` as submitit writes it for ``mem_gb`` (``_convert_mem``)."""
    from submitit.slurm.slurm import _convert_mem

    return str(_convert_mem(mem_gb))


def read_sacct(text: str) -> dict[str, dict[str, str]]:
    """``{job_id: {"State": ..., ...}}`` from ``sacct --parsable2`` output, array elements
    included, as submitit parses it (``SlurmInfoWatcher.read_info``)."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    return dict(SlurmInfoWatcher().read_info(text))
