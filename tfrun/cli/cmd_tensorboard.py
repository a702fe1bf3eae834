"""``tfrun tensorboard [RUN]``: TensorBoard over a sweep's (or a run's) events, each run named by
the parameters that differ."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from tfrun import rundir
from tfrun.cli.common import add_run
from tfrun.errors import ConfigError, require
from tfrun.runner.control import run_dirs_of


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``tensorboard``'s arguments."""
    add_run(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback only by default)")
    parser.add_argument("--port", type=int, default=6006, help="port to serve on")
    parser.add_argument(
        "--print-command", action="store_true", help="print the TensorBoard command (its dir of links is kept) and exit"
    )


def run(args: argparse.Namespace) -> int:
    """Serve TensorBoard until it ends or tfrun is stopped."""
    from tfrun.tracking import board

    path = rundir.find_run(args.run)
    if not board.is_run_or_sweep(path):
        raise ConfigError(f"{path} is neither a run dir nor a sweep dir")
    runs = board.board_runs(path, run_dirs_of(path))
    require("tfrun tensorboard", ["tensorboard"], "pip install tensorboard")
    links = board.link_runs(runs, Path(tempfile.mkdtemp(prefix="tfrun-tensorboard-")))
    cmd = board.command(links, args.host, args.port)
    # tfrun.log_metric values become TensorBoard scalars here, not in the task (a child
    # process: converting imports TensorFlow, which tfrun's CLI never does).
    convert = [sys.executable, "-m", "tfrun.tracking.board", *(str(r.run_dir) for r in runs)]
    if args.print_command:  # the links stay: the command is meant to be run
        print(board.describe(runs, cmd), file=sys.stderr)
        if any(board.has_values(r.run_dir) for r in runs):
            subprocess.run(convert, stdin=subprocess.DEVNULL, check=False, start_new_session=True)
        print(shlex.join(cmd))
        return 0
    every = [convert[0], *convert[1:3], "--every", "5", *convert[3:]]
    return _serve(cmd, links, every, board.describe(runs, cmd))


def _serve(cmd: list[str], links: Path, convert: list[str], description: str) -> int:
    """Run TensorBoard (and the conversion of logged values, every few seconds) until it
    ends or tfrun is stopped; then remove its dir of links. ``description`` is printed once
    both have been started (they are then tfrun's to end, however tfrun ends)."""
    import shutil
    import signal

    # The children are tfrun's to stop, each in a session of its own: the terminal's Ctrl-C
    # reaches tfrun only, not a child in the middle of importing TensorFlow.
    converter = subprocess.Popen(convert, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_end_with_parent)
    # TensorBoard too: a Ctrl-C while it still imports would end it with a traceback. tfrun
    # stops it below, whenever tfrun is stopped.
    child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_end_with_parent)
    print(description, file=sys.stderr)
    # A SIGTERM to tfrun, or its terminal closing (SIGHUP), ends TensorBoard too: as an exit,
    # the `finally` below runs.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda number, _: sys.exit(128 + number))
    try:
        return child.wait()
    except KeyboardInterrupt:  # Ctrl-C
        return 130
    finally:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if converter.poll() is None:
            converter.terminate()
            converter.wait()
        shutil.rmtree(links, ignore_errors=True)


def _end_with_parent() -> None:
    """In a child, before it starts: it gets SIGTERM when tfrun's process ends, however that
    ends. A SIGKILL skips tfrun's own clean-up, and a TensorBoard left behind keeps its port
    (a later ``tfrun tensorboard`` on 6006 then cannot bind it). Linux's prctl; elsewhere the
    clean-up above is all there is."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no prctl here (not Linux): nothing more to do
        pass
