"""What the hang watchdog costs a training task (issue: hangs and lost nodes; target: < 0.5 %
of step time).

Two figures, from one run:

1. ``tfrun.heartbeat()`` itself: nanoseconds per call (it only updates a few fields; the
   Keras hooks call it once per batch), against the step time of the throughput benchmark.
2. Throughput under tfrun with the watchdog (``compute.hang_timeout_s=600``: the heartbeat
   writer and the watchdog process beside the tasks) vs without (``null``), both modes of
   bench/throughput.py (a ``tf.function`` loop calling ``tfrun.heartbeat`` every step, and
   ``model.fit``), interleaved rounds, medians.

    python bench/bench_watchdog.py [--repeats 5] [--steps 1000] [--output -]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

from benchlib import load_average, publish

TARGET = 0.005  # at most this share of step time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--output", default="-", help="also write the report here (bench/run.py does)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from tfrun.task import heartbeat

    calls = 1_000_000
    beat_ns = timeit.timeit(lambda: heartbeat.beat(step=1), number=calls) / calls * 1e9

    here = Path(__file__).resolve().parent
    work = Path(tempfile.mkdtemp(prefix="tfrun-bench-watchdog-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TFRUN_", "SLURM_"))}
    env.update(TFRUN_RUNS_DIR=str(work / "runs"), TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    base = [
        "tfrun",
        "compute=local",
        f"entry.script={here / 'throughput.py'}",
        f"trainer.steps={args.steps}",
        "trainer.beat=true",
        "trainer.mode=both",
    ]
    variants = {"off": [*base, "compute.hang_timeout_s=null"], "on": [*base, "compute.hang_timeout_s=600"]}
    found: dict[str, dict[str, list[float]]] = {"off": {}, "on": {}}
    start_load = load_average()
    for r in range(args.repeats):
        for name in ["off", "on"] if r % 2 == 0 else ["on", "off"]:
            out = subprocess.run(variants[name], cwd=work, env=env, capture_output=True, text=True, check=True)
            for rec in (json.loads(m) for m in re.findall(r"THROUGHPUT (\{.*\})", out.stdout)):
                found[name].setdefault(rec["mode"], []).append(rec["samples_per_s"])
            print(
                f"  round {r + 1}/{args.repeats} watchdog {name}: "
                + ", ".join(f"{m} {v[-1]:.0f}/s" for m, v in found[name].items()),
                file=sys.stderr,
                flush=True,
            )
    med = statistics.median
    rows, figures = [], {"beat_ns": beat_ns}
    for mode in found["off"]:
        off, on = med(found["off"][mode]), med(found["on"][mode])
        cost = 1 - on / off
        step_ms = 128 / off * 1000  # batch 128 (throughput.py's default)
        rows.append(
            f"| {mode} | {off:.0f} | {on:.0f} | {100 * cost:+.2f} % | {100 * beat_ns / 1e6 / step_ms:.4f} % | "
            f"{'met' if cost <= TARGET else 'MISSED'} |"
        )
        figures[mode] = {"off": off, "on": on, "cost": cost}
    report = "\n".join(
        [
            "",
            f"## Hang watchdog: its cost to training ({time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())})",
            "",
            f"Command: `python bench/bench_watchdog.py {' '.join(sys.argv[1:])}`".rstrip(),
            "",
            f"- `tfrun.heartbeat()`: {beat_ns:.0f} ns per call ({calls} calls); load average at start {start_load}, "
            f"at end {load_average()}",
            f"- samples/s, median of {args.repeats} interleaved rounds, tfrun with `compute.hang_timeout_s=null` (off) "
            f"and `=600` (on: heartbeat writer + watchdog process); the loop calls `tfrun.heartbeat` every step",
            "",
            "| mode | off | on | throughput lost | one beat per step, share of step time | target < 0.5 % |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    publish(report, args.output, args.json, {"watchdog": figures})


if __name__ == "__main__":
    main()
