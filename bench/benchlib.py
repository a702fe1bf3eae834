"""What every benchmark script shares: describing the machine, and writing its report.

The scripts run as ``python bench/NAME.py``, so this directory is first on ``sys.path``.
"""

from __future__ import annotations

import json
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import Any


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


def publish(report: str, output: str, figures_path: str | None, figures: Any) -> None:
    """A benchmark's results: its report (markdown) printed and written to ``output`` (``-``:
    nowhere), its figures as JSON to ``figures_path`` if given. Only bench/run.py puts reports
    into bench/RESULTS.md, which it regenerates whole."""
    print(report)
    if output != "-":
        Path(output).write_text(report.lstrip("\n") + "\n")
        print(f"report written to {output}", file=sys.stderr)
    if figures_path:
        Path(figures_path).write_text(json.dumps(figures, indent=1, default=str))
