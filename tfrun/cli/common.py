"""Pieces several verbs share: the RUN argument and how a run's duration reads."""

from __future__ import annotations

import argparse
import time
from typing import Any, Mapping

RUN_HELP = "run or sweep dir, run id, unique part of an id (default: the latest run)"


def add_run(parser: argparse.ArgumentParser, help: str = RUN_HELP) -> None:
    """The optional RUN argument most verbs take."""
    parser.add_argument("run", nargs="?", help=help)


def duration(status: Mapping[str, Any]) -> str:
    """How long a run took, or has run so far ('-' before it started)."""
    start = status.get("started")
    if not start:
        return "-"
    return f"{(status.get('ended') or time.time()) - start:.0f}s"
