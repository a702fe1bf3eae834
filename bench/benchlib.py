"""What every benchmark script shares: describing the machine, and writing its report.

The scripts run as ``python bench/NAME.py``, so this directory is first on ``sys.path``.
"""
from __future__ import annotations

import os
import sys
from importlib import metadata
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("?" where there is none)."""
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "?"


def versions(*packages: str) -> list[str]:
    """``"name version"`` of each installed package, ``"name not installed"`` otherwise."""
    found = []
    for name in packages:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    return found


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def write_report(path: str, text: str) -> None:
    """Write a benchmark's report (a markdown section) to ``path`` (``-``: nowhere).

    Only bench/run.py puts reports into bench/RESULTS.md, which it regenerates whole."""
    if path == "-":
        return
    Path(path).write_text(text.lstrip("\n") + "\n")
    print(f"report written to {path}", file=sys.stderr)
