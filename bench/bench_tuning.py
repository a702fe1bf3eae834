"""Tuning with hydra/sweeper=tfrun (issue 18): what early termination saves, and what
asynchronous trials save over lock-step batches.

Two figures, from one run:

1. The digits example (examples/digits) with the learning rate, batch size and width
   (``trainer.hidden``) searched, ``--trials`` trials (default 24), ``--parallel`` at once:
   the same study (``--sampler``, same seed) with ``policy=asha`` (or ``--policy``) and with
   no policy, for each of ``--seeds``. Total task-seconds, wall time, wall time to the best
   trial, best val_accuracy; the median over the seeds of each seed's ratio.
   Targets: <= 0.5x task-seconds, <= 0.6x wall time, best within 0.5 points.
2. Trials of unequal length (a script that sleeps; ``--durations``) on Slurm, ``--parallel``
   slots: the tfrun sweeper (a trial starts when one ends) against lock-step batches of
   ``--parallel`` (Hydra's basic sweeper with ``max_batch_size``: each batch a job array
   waited for, as Hydra's Optuna sweeper launches its ``n_jobs`` batches). Wall time ratio,
   target <= 0.7x.

    python bench/bench_tuning.py [--trials 24] [--epochs 200] [--sampler random] [--seeds 0,1,2] [--parallel 2] [--compute local] [--policy asha] [--startup N]
                                 [--durations 40,5,5,5,40,5,5,5] [--skip-digits] [--skip-async] [--output -]
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

from benchlib import load_average, publish, versions

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "examples" / "digits" / "train.py"
UNEVEN = """
import argparse, time
from tfrun.tracking.metrics import log_epoch
p = argparse.ArgumentParser(); p.add_argument("--i", type=int); p.add_argument("--durations"); a = p.parse_args()
secs = float(a.durations.split(",")[a.i])
time.sleep(secs)
log_epoch(0, {"score": secs})
"""


def tfrun(work: Path, *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Run tfrun in ``work``; (wall seconds, the process)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TFRUN_", "SLURM_"))}
    env.update(TFRUN_RUNS_DIR=str(work / "runs"), TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    start = time.time()
    out = subprocess.run(["tfrun", *args], cwd=work, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"tfrun {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return time.time() - start, out


def newest_sweep(work: Path) -> Path:
    return max((work / "runs").glob("sweep-*"), key=lambda p: p.stat().st_mtime)


def study_figures(work: Path, started: float, wall: float) -> dict[str, float]:
    """From the sweep's index: task-seconds, the best value, and when the study first had it
    (validation accuracy comes in steps of one image, so several trials often share the best)."""
    sweep = newest_sweep(work)
    index = json.loads((sweep / "sweep.json").read_text())
    scored = [p for p in index["points"] if (p.get("objective") or {}).get("value") is not None]
    best = max(p["objective"]["value"] for p in scored)
    status = {p["trial"]: json.loads((Path(p["run_dir"]) / "status.json").read_text()) for p in scored}
    first = min((p for p in scored if p["objective"]["value"] == best), key=lambda p: status[p["trial"]]["ended"])
    study = index["study"]
    own = status[first["trial"]]
    return {
        "task_s": study["task_seconds"],
        "wall_s": wall,
        "to_best_s": own["ended"] - started,
        "best": best,
        "pruned": study["pruned"],
        "trials": study["trials"],
        # Which trial had it first, and its own run: the part of the time to the best no policy shortens.
        "best_trial": first["trial"],
        "best_own_s": own["ended"] - own["started"],
        "startup_s": statistics.median(startup(Path(p["run_dir"])) for p in index["points"]),
    }


def startup(run_dir: Path) -> float:
    """Seconds from a trial's start to its first epoch's end: the part of a trial no policy can save
    (interpreter, TensorFlow's import, data, the first epoch's tracing)."""
    started = json.loads((run_dir / "status.json").read_text())["started"]
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    return first["time"] - started


# Samplers whose draws do not depend on the results: both studies try the same settings in the same order.
SAME_DRAWS = ("random", "grid", "qmc")


def sampler_text(args: argparse.Namespace) -> str:
    """How the report names the sampler: TPE with its random start, or the sampler's own name."""
    if args.sampler != "tpe":
        return args.sampler
    if args.startup is None:
        return f"TPE ({max(1, min(10, args.trials // 3))} random trials first, tfrun's default)"
    return f"TPE ({args.startup} random trials first)"


def digits(args: argparse.Namespace, work: Path) -> tuple[list[str], dict]:
    """Both studies for each seed: which trial is best, and so when it ends, is one draw
    of the sampler's; a ratio of two such draws needs several seeds to mean anything."""
    common = [
        "-m",
        "hydra/sweeper=tfrun",
        f"compute={args.compute}",
        f"entry.script={DIGITS}",
        "tfrun.objective=val_accuracy",
        f"hydra.sweeper.n_trials={args.trials}",
        f"hydra.sweeper.max_parallel={args.parallel}",
        f"trainer.epochs={args.epochs}",
        f"trainer.lr=tag(log,interval({args.lr}))",
        "trainer.batch_size=choice(32,64,128)",
        "trainer.hidden=choice(16,32,64,128)",
        f"hydra.sweeper.sampler={args.sampler}",
        *([f"hydra.sweeper.n_startup_trials={args.startup}"] if args.startup is not None else []),
    ]
    policy = [f"hydra.sweeper.policy={args.policy}", *(f"hydra.sweeper.policy_args.{a}" for a in args.policy_args)]
    runs: dict[str, dict] = {}
    rows = []
    for seed in args.seeds:
        figures = {}
        for name, extra in (("none", []), (args.policy, policy)):
            started = time.time()
            wall, _ = tfrun(work, *common, f"hydra.sweeper.seed={seed}", *extra)
            figures[name] = study_figures(work, started, wall)
            print(f"  digits, seed {seed}, policy {name}: {figures[name]}", file=sys.stderr, flush=True)
        base, pruned = figures["none"], figures[args.policy]
        figures["ratios"] = {
            "task": pruned["task_s"] / base["task_s"],
            "to_best": pruned["to_best_s"] / base["to_best_s"],
            "gap": 100 * (base["best"] - pruned["best"]),
            # With the same settings drawn, a policy that keeps the best trial still waits for its run.
            "own_share": base["best_own_s"] / base["to_best_s"],
        }
        runs[str(seed)] = figures
        for name, f in (("none", base), (args.policy, pruned)):
            rows.append(
                f"| {seed} | {name} | {f['trials']} | {f['pruned']} | {f['task_s']:.0f} | {f['wall_s']:.0f} | "
                f"{f['to_best_s']:.0f} | {f['best']:.4f} | {f['best_trial']} ({f['best_own_s']:.0f} s) |"
            )
    median = {k: statistics.median(r["ratios"][k] for r in runs.values()) for k in ("task", "to_best", "gap")}

    def every(key: str, fmt: str) -> str:
        return ", ".join(format(r["ratios"][key], fmt) for r in runs.values())

    startup_s = statistics.median(r["none"]["startup_s"] for r in runs.values())
    full_s = statistics.median(r["none"]["task_s"] / r["none"]["trials"] for r in runs.values())
    lines = [
        f"Digits, {args.trials} trials, {args.epochs} epochs, {args.parallel} at once, compute={args.compute}, "
        f"{sampler_text(args)} seeds {', '.join(map(str, args.seeds))}, lr in ({args.lr}) log scale; policy {args.policy} "
        f"{' '.join(args.policy_args)}".rstrip(),
        "",
        f"| {sampler_text(args)} seed | policy | trials | pruned | task-s | wall s | wall s to best | best val_accuracy "
        f"| trial that had it first (its own run) |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Medians over the {len(runs)} seed(s) of each seed's ratio (that seed's two studies, run one after the other):",
        "",
        f"- task-seconds {median['task']:.2f}x ({every('task', '.2f')}; target <= 0.5x: "
        f"{'met' if median['task'] <= 0.5 else 'MISSED'})",
        f"- wall time to the best {median['to_best']:.2f}x ({every('to_best', '.2f')}; target <= 0.6x: "
        f"{'met' if median['to_best'] <= 0.6 else 'MISSED'})",
        f"- best val_accuracy {median['gap']:+.2f} points below the unpruned study's ({every('gap', '+.2f')}; target "
        f"<= 0.5: {'met' if median['gap'] <= 0.5 else 'MISSED'})",
        *(
            [
                f"- the share of the unpruned study's time to the best that is its best trial's own run (both studies draw "
                f"the same settings; a policy that keeps that trial does not save its run): {every('own_share', '.2f')}"
            ]
            if args.sampler in SAME_DRAWS
            else []
        ),
        f"- a trial's start to its first epoch's end (interpreter, TensorFlow's import, data; no policy saves it), "
        f"median: {startup_s:.1f} s; a full trial: {full_s:.1f} s",
    ]
    return lines, {"policy": args.policy, "sampler": args.sampler, "runs": runs, "median": median}


def asynchronous(args: argparse.Namespace, work: Path) -> tuple[list[str], dict]:
    (work / "uneven.py").write_text(UNEVEN)
    n = len(args.durations.split(","))
    common = [
        f"compute={args.async_compute}",
        "compute.poll_s=0.5",
        "entry.script=uneven.py",
        f"trainer.durations='{args.durations}'",
    ]
    wall_async, _ = tfrun(
        work,
        "-m",
        "hydra/sweeper=tfrun",
        "tfrun.objective=score",
        "hydra.sweeper.sampler=grid",
        f"hydra.sweeper.max_parallel={args.parallel}",
        f"trainer.i=range(0,{n})",
        *common,
    )
    # Lock-step: every batch of `parallel` points is one job array, waited for before the next.
    wall_batch, _ = tfrun(
        work,
        "-m",
        f"hydra.sweeper.max_batch_size={args.parallel}",
        f"trainer.i={','.join(map(str, range(n)))}",
        *common,
    )
    ratio = wall_async / wall_batch
    lines = [
        f"Trials of unequal length ({args.durations} s), {args.parallel} slots, compute={args.async_compute}",
        "",
        "| sweeper | wall s |",
        "|---|---|",
        f"| tfrun (asynchronous) | {wall_async:.1f} |",
        f"| lock-step batches of {args.parallel} | {wall_batch:.1f} |",
        "",
        f"- wall time {ratio:.2f}x (target <= 0.7x: {'met' if ratio <= 0.7 else 'MISSED'})",
    ]
    return lines, {"async_s": wall_async, "batches_s": wall_batch, "ratio": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=24)
    # Each trial first pays ~10 s here (TensorFlow's import) that no policy can save; with a budget of
    # 200 epochs (~0.25 s each) training is most of a trial, as it is for the jobs tuning is for.
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--compute", default="local")
    # Four decades of learning rate, as a first search does: slow and diverging trials among them.
    parser.add_argument("--lr", default="1e-4,0.3", help="the learning rate's interval (log scale)")
    parser.add_argument("--policy", default="asha")
    # Random sampling draws the same configurations with and without the policy (its draws do not depend on
    # the results), so the comparison is the policy's alone; the cloud tuners' policies pair with it too.
    parser.add_argument("--sampler", default="random", help="hydra.sweeper.sampler of both studies (random, tpe)")
    parser.add_argument(
        "--seeds",
        type=lambda text: [int(x) for x in text.split(",")],
        default=[0, 1, 2],
        help="the sampler's seeds: both studies run once for each (default 0,1,2)",
    )
    parser.add_argument(
        "--startup", type=int, default=None, help="hydra.sweeper.n_startup_trials of both studies (default: tfrun's)"
    )
    parser.add_argument("--policy-args", nargs="*", default=[])  # e.g. slack_factor=0.1 delay_evaluation=2 for bandit
    # Trials of seconds would measure the fixed cost of a trial (composition, sbatch, ~2.5 s to start), not tuning.
    parser.add_argument("--durations", default="40,5,5,5,40,5,5,5")
    parser.add_argument("--async-compute", default="slurm")
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--skip-async", action="store_true")
    parser.add_argument("--output", default="-", help="also write the report here (bench/run.py does)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tfrun-bench-tuning-"))
    start_load = load_average()
    sections, figures = [], {}
    if not args.skip_digits:
        lines, figures["digits"] = digits(args, work)
        sections += [*lines, ""]
    if not args.skip_async:
        lines, figures["async"] = asynchronous(args, work)
        sections += [*lines, ""]
    report = "\n".join(
        [
            "",
            f"## Tuning: early termination and asynchronous trials ({time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())})",
            "",
            f"Command: `python bench/bench_tuning.py {' '.join(sys.argv[1:])}`".rstrip(),
            "",
            f"- {', '.join(versions('optuna', 'tensorflow'))}; load average at start {start_load}, at end {load_average()}",
            "",
            *sections,
        ]
    )
    publish(report, args.output, args.json, {"tuning": figures})


if __name__ == "__main__":
    main()
