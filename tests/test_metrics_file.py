"""``metrics.jsonl`` written by appends: per-step logging keeps every value, in order; a
torn last line (a kill mid-write) is skipped and the next writer starts a fresh line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tfrun.paths import RunPaths
from tfrun.tracking import metrics

# A task's view of tfrun.log_metric: a real process with the run dir a task has.
PER_STEP = """
import os, time, tfrun
for step in range(100_000):
    tfrun.log_metric("loss", 1.0 / (step + 1), step)
    if step == 50_000:
        tfrun.log_metric("lr", 0.5, step)  # a second name in the middle
tfrun.log_params(done=True)  # written at once, after every value logged before it
"""


def _run_task_script(run_dir: Path, code: str) -> Path:
    run_dir.mkdir(exist_ok=True)
    env = {"PATH": "/usr/bin:/bin", "TFRUN_RUN_DIR": str(run_dir), "TFRUN_RANK": "0"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return run_dir


def test_per_step_logging_keeps_every_value_in_order(tmp_path: Path) -> None:
    run_dir = _run_task_script(tmp_path / "run", PER_STEP)
    records = metrics.read_metrics(RunPaths.of(run_dir).metrics)
    losses = [r for r in records if r.get("name") == "loss"]
    assert [r["step"] for r in losses] == list(range(100_000))
    assert losses[9]["value"] == 0.1 and losses[-1]["value"] == 1.0 / 100_000
    names = [r.get("name") for r in records]
    assert names.index("lr") == 50_001  # where it was logged, between loss 50000 and 50001
    assert records[-1]["params"] == {"done": True}
    times = [r["time"] for r in records]
    assert times == sorted(times)


# Two threads of one script, each logging its own metric at every step; a thread switch
# every 10 us (Python's default is 5 ms) makes them interleave thousands of times.
TWO_THREADS = """
import sys, threading, tfrun
sys.setswitchinterval(1e-5)
def work(name, sign):
    for step in range(100_000):
        tfrun.log_metric(name, sign * (step + 1), step)
threads = [threading.Thread(target=work, args=args) for args in (("up", 1), ("down", -1))]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""


def test_two_threads_logging_keep_their_values_apart(tmp_path: Path) -> None:
    """Each value under its own name, with its own step, every one of them; the file in the
    order of the values' times (the MLflow sync goes on from the last time it sent)."""
    run_dir = _run_task_script(tmp_path / "run", TWO_THREADS)
    records = metrics.read_metrics(RunPaths.of(run_dir).metrics)
    assert len(records) == 200_000
    for name, sign in (("up", 1), ("down", -1)):
        mine = [r for r in records if r["name"] == name]
        misfiled = [r for r in mine if (r["value"] > 0) != (sign > 0)]
        assert not misfiled, f"{len(misfiled)} values filed under {name!r} that the other thread logged"
        assert [r["step"] for r in mine] == list(range(100_000))
        assert [r["value"] for r in mine] == [sign * (step + 1) for step in range(100_000)]
    times = [r["time"] for r in records]
    assert times == sorted(times)


def test_a_torn_last_line_is_skipped_and_the_next_record_starts_a_new_line(tmp_path: Path) -> None:
    run_dir = _run_task_script(tmp_path / "run", "import tfrun\ntfrun.log_metric('a', 1.0, 0)\n")
    path = RunPaths.of(run_dir).metrics
    with open(path, "a") as f:
        f.write('{"name": "a", "step": 1, "ti')  # killed mid-write
    assert [r["step"] for r in metrics.read_metrics(path)] == [0]
    _run_task_script(run_dir, "import tfrun\ntfrun.log_metric('a', 3.0, 2)\ntfrun.log_metric('a', 4.0, 3)\n")
    assert [r["step"] for r in metrics.read_metrics(path)] == [0, 2, 3]
    lines = path.read_text().splitlines()
    assert lines[1].startswith('{"name": "a", "step": 1, "ti') and json.loads(lines[2])["value"] == 3.0


def test_a_million_records_read_back(tmp_path: Path) -> None:
    path = RunPaths.of(tmp_path).metrics
    path.write_text(
        "".join(f'{{"name": "loss", "step": {i}, "time": {i}.5, "value": {i / 7!r}}}\n' for i in range(1_000_000))
    )
    records = metrics.read_metrics(path)
    assert len(records) == 1_000_000 and records[-1]["step"] == 999_999 and records[7]["value"] == 1.0
