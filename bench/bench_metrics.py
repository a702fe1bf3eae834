"""What recording metrics costs a script (issue: live tracking; targets: <= 2 us per
``tfrun.log_metric`` call over 100,000 calls, 1,000,000 records read back in < 2 s).

Figures, from one run, each the median of interleaved repeats in fresh processes (a task's
environment: ``TFRUN_RUN_DIR``, rank 0):

1. 100,000 ``tfrun.log_metric`` calls: microseconds per call as the script sees it (the
   loop), and with the final write of what is still in memory (loop + ``flush``); without
   TensorFlow, and with TensorFlow imported (then the values also become TensorBoard
   scalars, written in batches by the background writer).
2. The former writer (the whole file rewritten per record) on 2,000 calls, for scale.
3. ``read_metrics`` of a 1,000,000-record file.

    python bench/bench_metrics.py [--repeats 5] [--output -]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import load_average, publish

CALLS = 100_000
TARGET_US = 2.0
TARGET_READ_S = 2.0

LOOP = """
import json, sys, time
if {tf}:
    import tensorflow
import tfrun
from tfrun.tracking import metrics
began = time.perf_counter()
for step in range({calls}):
    tfrun.log_metric("loss", 1.0 / (step + 1), step)
looped = time.perf_counter()
metrics.flush()
flushed = time.perf_counter()
print(json.dumps({{"loop_us": (looped - began) / {calls} * 1e6, "total_us": (flushed - began) / {calls} * 1e6}}))
"""

# The writer before this change: every record re-read and rewrote the whole file.
FORMER = """
import json, os, tempfile, time
from pathlib import Path
from tfrun.tracking.metrics import read_metrics
path = Path(os.environ["TFRUN_RUN_DIR"]) / "former.jsonl"
def rewrite(records):
    fd, tmp = tempfile.mkstemp(dir=path.parent)
    with os.fdopen(fd, "w") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True, default=float) + "\\n")
        f.flush(); os.fsync(f.fileno())
    os.replace(tmp, path)
began = time.perf_counter()
for step in range({calls}):
    rewrite([*read_metrics(path), {{"time": time.time(), "name": "loss", "value": 1.0 / (step + 1), "step": step}}])
print(json.dumps({{"loop_us": (time.perf_counter() - began) / {calls} * 1e6}}))
"""

READ = """
import json, time
from tfrun.tracking import metrics
began = time.perf_counter()
records = metrics.read_metrics({path!r})
print(json.dumps({{"read_s": time.perf_counter() - began, "records": len(records)}}))
"""


def _child(code: str, run_dir: Path) -> dict[str, float]:
    env = {**os.environ, "TFRUN_RUN_DIR": str(run_dir), "TFRUN_RANK": "0", "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default="-", help="also write the report here (bench/run.py does)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tfrun-bench-metrics-"))
    start_load = load_average()
    found: dict[str, list[dict[str, float]]] = {"no TF": [], "TF imported": [], "former": []}
    for r in range(args.repeats):
        order = list(found) if r % 2 == 0 else list(reversed(found))
        for name in order:
            run_dir = work / f"{name.replace(' ', '-')}-{r}"
            run_dir.mkdir()
            code = FORMER.format(calls=2000) if name == "former" else LOOP.format(tf=name == "TF imported", calls=CALLS)
            found[name].append(_child(code, run_dir))
            print(f"  round {r + 1}/{args.repeats} {name}: {found[name][-1]}", file=sys.stderr, flush=True)
    big = work / "million.jsonl"
    big.write_text(
        "".join(
            f'{{"name": "loss", "step": {i}, "time": {time.time()!r}, "value": {1 / (i + 1)!r}}}\n'
            for i in range(1_000_000)
        )
    )
    reads = [_child(READ.format(path=str(big)), work)["read_s"] for _ in range(args.repeats)]
    med = statistics.median
    figures = {name: {k: med(run[k] for run in runs) for k in runs[0]} for name, runs in found.items()}
    figures["read_1m_s"] = {"median": med(reads)}
    worst_loop = max(figures["no TF"]["loop_us"], figures["TF imported"]["loop_us"])
    rows = [
        f"| log_metric, no TensorFlow | {figures['no TF']['loop_us']:.2f} us | {figures['no TF']['total_us']:.2f} us | "
        f"{figures['former']['loop_us']:.0f} us (2,000 calls) | <= {TARGET_US} us | "
        f"{'met' if figures['no TF']['loop_us'] <= TARGET_US else 'MISSED'} |",
        f"| log_metric, TensorFlow imported | {figures['TF imported']['loop_us']:.2f} us | "
        f"{figures['TF imported']['total_us']:.2f} us | | <= {TARGET_US} us | "
        f"{'met' if figures['TF imported']['loop_us'] <= TARGET_US else 'MISSED'} |",
        f"| read 1,000,000 records | {med(reads):.2f} s | | | < {TARGET_READ_S} s | "
        f"{'met' if med(reads) < TARGET_READ_S else 'MISSED'} |",
    ]
    report = "\n".join(
        [
            "",
            f"## Metrics: what recording costs a script ({time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())})",
            "",
            f"Command: `python bench/bench_metrics.py {' '.join(sys.argv[1:])}`".rstrip(),
            "",
            f"- {CALLS:,} `tfrun.log_metric` calls per process, median of {args.repeats} interleaved repeats; "
            f"load average at start {start_load}, at end {load_average()}",
            "- per call: the loop as the script sees it; with the final flush of what was still in memory",
            "",
            "| figure | per call (loop) | per call (with flush) | former writer (rewrite per record) | target | |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    publish(report, args.output, args.json, {"metrics": figures, "worst_loop_us": worst_loop})


if __name__ == "__main__":
    main()
