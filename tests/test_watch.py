"""``tfrun watch``: a live table on a terminal, plain lines in a pipe (issue 19, part 4).

One small local sweep (two points, three epochs of a script that sleeps instead of training,
the second point failing) is watched twice while it runs: from a pseudo-terminal and through
a pipe. The script records its epochs the way tfrun's Keras hook does (metrics.log_epoch).
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import (
    popen_tfrun,
    run_tfrun,
    scratch_env,
    stop,
    tfrun_command,
    wait_for,
)

EPOCHS = """
import argparse, time
from tfrun.tracking.metrics import log_epoch
p = argparse.ArgumentParser()
p.add_argument("--epochs", type=int); p.add_argument("--fail", type=int); p.add_argument("--sleep", type=float)
a = p.parse_args()
for epoch in range(a.epochs):
    time.sleep(a.sleep)
    log_epoch(epoch, {"loss": 1.0 / (epoch + 1), "val_accuracy": 0.5 + 0.1 * epoch})
if a.fail:
    raise SystemExit("asked to fail")
"""
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
COLUMNS, LINES = 120, 30


@dataclass
class Watched:
    sweep: Path
    tty_out: str  # what the terminal received, escape codes included
    tty_code: int
    pipe_out: str
    pipe_err: str
    pipe_code: int
    sweep_err: str  # what `tfrun -m` printed meanwhile (not a terminal)
    sweep_code: int


def _on_a_terminal(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, int]:
    """``tfrun ARGS`` with a pseudo-terminal of a fixed size as stdout and stderr."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", LINES, COLUMNS, 0, 0))
    env = scratch_env(tmp_path, COLUMNS=str(COLUMNS), LINES=str(LINES), TERM="xterm-256color")
    proc = subprocess.Popen(
        [*tfrun_command(), *args], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave
    )
    os.close(slave)
    return proc, master


def _read_all(proc: subprocess.Popen, master: int, timeout: float) -> bytes:
    data, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the other end is closed
                break
            if not chunk:
                break
            data += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    return data


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory) -> Watched:
    tmp_path = tmp_path_factory.mktemp("watch")
    (tmp_path / "epochs.py").write_text(EPOCHS)
    sweep_proc, _, err = popen_tfrun(
        tmp_path,
        "-m",
        "entry.script=epochs.py",
        "trainer.epochs=3",
        "trainer.sleep=0.7",
        "trainer.fail=0,1",
        name="sweep",
    )
    try:
        runs = tmp_path / "runs"
        wait_for(lambda: any(runs.glob("sweep-*/sweep.json")), 30, "the sweep to start")
        sweep = next(runs.glob("sweep-*"))
        tty_proc, master = _on_a_terminal(tmp_path, "watch", "--interval", "0.3")  # no argument: the latest
        pipe_proc = subprocess.Popen(
            [*tfrun_command(), "watch", str(sweep), "--interval", "0.3"],
            cwd=tmp_path,
            env=scratch_env(tmp_path),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        tty_out = _read_all(tty_proc, master, 60).decode(errors="replace")
        pipe_out, pipe_err = pipe_proc.communicate(timeout=60)
        sweep_code = sweep_proc.wait(timeout=60)
        return Watched(
            sweep,
            tty_out,
            tty_proc.wait(timeout=10),
            pipe_out,
            pipe_err,
            pipe_proc.returncode,
            err.read_text(),
            sweep_code,
        )
    finally:
        stop(sweep_proc)


@pytest.mark.slow
def test_live_table_on_a_terminal_changes_between_refreshes(watched: Watched) -> None:
    assert "\x1b[" in watched.tty_out  # drawn by rich, in place
    text = ANSI.sub("", watched.tty_out)
    assert str(watched.sweep) in text
    finished = re.findall(r"(\d)/2 finished", text)
    epochs = re.findall(r"(?:RUNNING|COMPLETED|FAILED)\s+(\d)/3", text)
    # Counts and epochs moved on while it watched: several distinct values, in order.
    assert len(set(finished)) >= 2 and finished[-1] == "2", finished
    assert len(set(epochs)) >= 2, epochs
    assert "fail=0" in text and "fail=1" in text  # each point's parameters that differ
    assert re.search(r"val_accuracy=0\.7", text) and re.search(r"~0:0\d", text)  # metrics; time left
    assert "1 COMPLETED" in text and "1 FAILED" in text
    assert watched.tty_code == 1  # like tfrun: not every run completed


@pytest.mark.slow
def test_plain_lines_in_a_pipe_until_every_run_ended(watched: Watched) -> None:
    out = watched.pipe_out
    assert "\x1b" not in out and "\x1b" not in watched.pipe_err
    lines = out.splitlines()
    point0 = [line for line in lines if line.startswith("0 (")]
    point1 = [line for line in lines if line.startswith("1 (")]
    # One line per change of state or epoch: never the same state and epoch twice in a row.
    for point in (point0, point1):
        seen = [(m.group(1), m.group(2)) for m in (re.search(r"\)\s+(\S+)(?:\s+epoch (\S+))?", ln) for ln in point)]
        assert all(a != b for a, b in zip(seen, seen[1:])), point
    assert point0 and "COMPLETED" in point0[-1] and "epoch 3/3" in point0[-1]
    assert point1 and "FAILED" in point1[-1]
    assert any("RUNNING" in line for line in point0 + point1)
    assert lines[-1] == "sweep of 2: 2/2 finished (1 COMPLETED, 1 FAILED)"
    assert watched.pipe_err == "", "the last line again, on stderr"
    assert watched.pipe_code == 1
    # tfrun -m itself, in a file, keeps its plain lines.
    assert "tfrun: sweep point 2/2" in watched.sweep_err and watched.sweep_code == 1


@pytest.mark.slow
def test_watch_of_a_completed_run_exits_at_once_with_0(watched: Watched, tmp_path: Path) -> None:
    result = run_tfrun(tmp_path, "watch", str(watched.sweep / "0"), timeout=60)
    assert result.returncode == 0, result.stderr
    assert "COMPLETED" in result.stdout and "epoch 3/3" in result.stdout and "\x1b" not in result.stdout


@pytest.mark.slow
@pytest.mark.slurm
def test_a_slurm_sweep_is_followed_in_the_same_table_on_a_terminal(tmp_path: Path, job_name: str) -> None:
    (tmp_path / "epochs.py").write_text(EPOCHS)
    proc, master = _on_a_terminal(
        tmp_path,
        "-m",
        "compute=slurm",
        "compute.poll_s=0.5",
        f"compute.job_name={job_name}",
        "entry.script=epochs.py",
        "trainer.epochs=3",
        "trainer.sleep=0.7",
        "trainer.fail=0,1",
    )
    try:
        text = ANSI.sub("", _read_all(proc, master, 120).decode(errors="replace"))
        assert proc.wait(timeout=10) == 1, text
    finally:
        stop(proc)
    assert "submitting 2 run(s) to Slurm" in text  # the spinner's message
    assert re.search(r"0/2 finished", text) and re.search(r"2/2 finished\s+1 COMPLETED\s+1 FAILED", text), text
    assert re.search(r"trainer.fail=0\s+COMPLETED\s+3/3\s+loss=0.3333", text), text
    assert "tfrun: sweep of 2:" not in text  # the plain count line is for logs, not terminals


# --- labels and metric names are the user's text: printed as they are --------------------------

BRACKETS = ("trainer.data=[/scratch/a]", "trainer.data=[relu,tanh]")


def test_labels_and_metrics_in_brackets_are_drawn_as_they_are() -> None:
    """rich reads a str cell as markup: "[/scratch/a]" is a closing tag to it (an error),
    "[relu,tanh]" a style (it vanished)."""
    from rich.console import Console

    from tfrun.cli.live import render
    from tfrun.targets.progress import RunProgress, Snapshot

    runs = tuple(
        RunProgress(
            name=str(i),
            label=label,
            state="RUNNING",
            epoch=1,
            epochs=3,
            metrics=(("loss[main]", 0.5),),
            elapsed_s=3.0,
            left_s=6.0,
        )
        for i, label in enumerate(BRACKETS)
    )
    console = Console(record=True, width=160, force_terminal=True)
    console.print(render(Snapshot(path="/runs/sweep-[x]", sweep=True, runs=runs)))
    text = console.export_text()
    for label in BRACKETS:
        assert label in text, text
    assert "loss[main]=0.5" in text and "sweep /runs/sweep-[x]" in text


@pytest.mark.slow
@pytest.mark.slurm
def test_a_slurm_sweep_with_brackets_in_its_labels_is_followed_on_a_terminal(tmp_path: Path, job_name: str) -> None:
    (tmp_path / "any.py").write_text("import sys\nprint(sys.argv[1:])\n")
    proc, master = _on_a_terminal(
        tmp_path,
        "-m",
        "compute=slurm",
        "compute.poll_s=0.5",
        f"compute.job_name={job_name}",
        "entry.script=any.py",
        "trainer.data=[/scratch/a],[relu,tanh]",
    )
    try:
        text = ANSI.sub("", _read_all(proc, master, 180).decode(errors="replace"))
        assert proc.wait(timeout=10) == 0, text
    finally:
        stop(proc)
    assert "MarkupError" not in text and "Traceback" not in text, text
    assert re.search(r"trainer\.data=\[/scratch/a\]\s+COMPLETED", text), text
    assert re.search(r"trainer\.data=\[relu,tanh\]\s+COMPLETED", text), text
