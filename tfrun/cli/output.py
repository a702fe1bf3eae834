"""What the command line prints besides a verb's own output: errors, notes, and what happens
when the reader of that output goes away (``tfrun runs | head``)."""

from __future__ import annotations

import os
import sys

EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130


def error(message: str) -> None:
    """One paragraph on stderr, the way every tfrun error looks."""
    print(f"tfrun: error: {message}", file=sys.stderr, flush=True)


def say(message: str) -> None:
    """A line of tfrun's own on stderr (stdout is the verb's output)."""
    print(f"tfrun: {message}", file=sys.stderr, flush=True)


def reader_gone() -> None:
    """stdout's reader closed the pipe (``tfrun status | head -3``): it has what it wanted. Later
    writes, and the interpreter's last flush, go nowhere instead of raising."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is no file at all (an embedding host): nothing to redirect
        pass
