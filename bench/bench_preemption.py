"""How fast a preempted tfrun job hands its node over (issue: preemption by SIGTERM).

A Keras fit runs under tfrun in the local cluster's preemptible partition ``low``
(``scripts/local-slurm``: PreemptMode=REQUEUE, GraceTime=20 s); a job of the
high-priority partition ``debug`` that needs the node whole then preempts it. Measured:
the seconds from submitting that job to its start (squeue, polled every 0.2 s), in two
variants, interleaved:

- ``tfrun``: tfrun's own handling: every rank stops at the next batch end, the chief
  writes the backup, rank 0 requeues the job, and the node is free;
- ``grace``: the same run, but its stop outlasts the grace time (a ``tfrun.on_preempt``
  callback that sleeps), so the node is freed only when Slurm ends the job, as for any
  job that waits for Slurm's own requeue.

    python bench/bench_preemption.py [--repeats 3] [--output -]

Needs the local cluster up (``scripts/local-slurm start``) and nothing else running on node1.
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
from pathlib import Path

from benchlib import load_average, publish

SCRIPT = """\
import argparse, time
import keras
from sklearn.datasets import load_digits
parser = argparse.ArgumentParser()
parser.add_argument("--slow_stop", type=int, default=0)
args = parser.parse_args()
if args.slow_stop:
    import tfrun
    tfrun.on_preempt(lambda: time.sleep(600))  # a stop that outlasts any grace time
digits = load_digits()
x, y = (digits.data / 16.0).astype("float32"), digits.target
model = keras.Sequential([keras.Input(shape=(64,)), keras.layers.Dense(32, activation="relu"),
                          keras.layers.Dense(10, activation="softmax")])
model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")


class Slow(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        time.sleep(0.05)


model.fit(x, y, epochs=1000, batch_size=128, verbose=2, callbacks=[Slow()])
"""


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)


def wait_until(predicate, timeout: float, what: str, poll: float = 0.2) -> float:
    """Seconds until predicate() held."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise SystemExit(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)
    return time.monotonic() - start


def one_round(variant: str, work: Path, env: dict[str, str], name: str) -> dict[str, float]:
    """Start a run in ``low`` on node1, preempt it once it trains, time the handover."""
    launched = run(
        [
            "tfrun",
            "compute=slurm",
            "compute.partition=low",
            "compute.nodelist=node1",
            "compute.wait=false",
            f"compute.job_name={name}",
            f"entry.script={work / 'fit.py'}",
            f"trainer.slow_stop={1 if variant == 'grace' else 0}",
        ],
        cwd=work,
        env=env,
    )
    match = re.search(r"submitted job (\d+); run dir (.+)$", launched.stderr, re.M)
    if not match:
        raise SystemExit(f"tfrun did not submit:\n{launched.stderr}")
    job, run_dir = match.group(1), Path(match.group(2))
    metrics = run_dir / "metrics.jsonl"
    wait_until(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, 300, "two epochs")
    preemptor = run(
        [
            "sbatch",
            "--parsable",
            "-p",
            "debug",
            "--exclusive",
            "-w",
            "node1",
            f"--job-name={name}",
            "-o",
            "/dev/null",
            "--wrap",
            "sleep 1",
        ],
        check=True,
    ).stdout.strip()
    started = ("RUNNING", "COMPLETING", "")  # "": it already ran (a second) and left the queue
    handover = wait_until(
        lambda: run(["squeue", "-h", "-j", preemptor, "-o", "%T"]).stdout.strip() in started,
        300,
        "the preempting job to start",
    )
    attempts = json.loads((run_dir / "attempts.json").read_text()) if (run_dir / "attempts.json").exists() else {}
    first = attempts.get(f"slurm-{job}-0", {})
    run(["scancel", f"--name={name}"])  # the measurement is done; the resume is tested elsewhere
    return {"handover_s": handover, "grace_s": first.get("grace_s"), "requeued_by": first.get("requeued_by")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default="-", help="also write the report here (bench/run.py does)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tfrun-bench-preemption-"))
    (work / "fit.py").write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TFRUN_", "SLURM_"))}
    env.update(TFRUN_RUNS_DIR=str(work / "runs"), TF_CPP_MIN_LOG_LEVEL="2")
    name = f"tfrun-bench-preempt-{os.getpid()}"
    found: dict[str, list[dict[str, float]]] = {"tfrun": [], "grace": []}
    start_load = load_average()
    for r in range(args.repeats):
        for variant in ["tfrun", "grace"] if r % 2 == 0 else ["grace", "tfrun"]:
            found[variant].append(one_round(variant, work, env, name))
            print(
                f"  round {r + 1}/{args.repeats} {variant}: node handed over in "
                f"{found[variant][-1]['handover_s']:.1f} s",
                file=sys.stderr,
                flush=True,
            )
            wait_until(lambda: not run(["squeue", "-h", f"--name={name}"]).stdout.strip(), 120, "the jobs to leave")
    med = statistics.median
    tfrun_s, grace_s = (med(r["handover_s"] for r in found[v]) for v in ("tfrun", "grace"))
    grace = found["grace"][0].get("grace_s")
    rounds = {v: ", ".join(f"{r['handover_s']:.1f}" for r in found[v]) for v in found}
    report = "\n".join(
        [
            "",
            f"## Preemption: how fast the node is handed over ({time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())})",
            "",
            f"Command: `python bench/bench_preemption.py {' '.join(sys.argv[1:])}`".rstrip(),
            "",
            f"- A Keras fit in partition `low` (GraceTime {grace} s) preempted by a `debug` job that needs its node; "
            f"seconds from submitting that job to its start, median of {args.repeats} interleaved rounds; "
            f"load average at start {start_load}, at end {load_average()}",
            "",
            "| variant | handover (s) | rounds |",
            "|---|---|---|",
            f"| tfrun: back up, requeue at once | {tfrun_s:.1f} | {rounds['tfrun']} |",
            f"| a stop that waits out the grace time | {grace_s:.1f} | {rounds['grace']} |",
            "",
            f"Ratio tfrun / grace: {tfrun_s / grace_s:.2f}.",
            "",
        ]
    )
    publish(
        report,
        args.output,
        args.json,
        {
            "preemption": {
                "tfrun_s": tfrun_s,
                "grace_s": grace_s,
                "ratio": tfrun_s / grace_s,
                "grace_time_s": grace,
                "rounds": {v: [r["handover_s"] for r in found[v]] for v in found},
            }
        },
    )


if __name__ == "__main__":
    main()
