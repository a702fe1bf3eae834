"""Warm pools (issue 37): what a trial costs when it is handed to a warm slot rather than
submitted as a job of its own, and what that does to a tuning study, idle and on a busy cluster.
On the local Slurm (``scripts/local-slurm start``), one part per flag:

1. ``--fixed`` (the default part): the fixed cost per item, from the item being handed over
   to the user script's first line after ``import tensorflow``, for items that run longer than a
   cold start (``--secs``, default 12 s of work each). The same study of ``--items`` trials, one
   at a time, in a warm pool (the hand-out: the coordinator writes the trial's RUNNING status and
   sends it to its slot) and as one Slurm job per trial (``hydra.sweeper.pool=false``; the
   hand-out: sbatch has returned, so sbatch's own time is left out in its favour), ``--repeats``
   interleaved rounds. Median over the items; the first item of each pool (which waits for the
   allocation and its slot's warm-up) is shown apart. Target: pool median <= 0.3 s and <= 0.06x.
2. ``--tuning``: the digits study of bench_tuning.py (24 trials of 200 epochs, 2 at once,
   ``--sampler``) for each of ``--seeds``, on Slurm: one job per trial without a policy (today's
   sweeper), in a pool without a policy, in a pool with ``--policy``. Task-seconds, wall time to
   the best, best val_accuracy; the median over the seeds of each seed's ratio to the first.
   Targets (pool + policy): <= 0.3x task-seconds, <= 0.5x to the best, best within one
   validation sample (1 / 360 of digits' validation split). The slots' held time is shown too:
   a pool holds its slots while the study runs, which the trials' task-seconds do not count.
3. ``--busy``: the same study (one seed, no policy) in a pool and as a job per trial, each on
   the idle cluster and on a busy one (``scripts/busy-slurm``: another account's jobs hold the
   debug nodes, every new job waits ``--hold-s`` to twice that for its turn). Target: in a pool,
   busy wall <= idle wall + one wait + 10 %; a job per trial pays about one wait per round of
   ``max_parallel`` trials (reported).

    python bench/bench_pool.py [--fixed] [--items 8] [--secs 12] [--repeats 3]
    python bench/bench_pool.py --tuning [--seeds 0,1,2] [--trials 24] [--epochs 200] [--policy truncation ...]
    python bench/bench_pool.py --busy [--trials 24] [--epochs 200] [--hold-s 30]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench_tuning import DIGITS, newest_sweep, study_figures, tfrun
from benchlib import load_average, publish, versions

REPO = Path(__file__).resolve().parents[1]
BUSY = REPO / "scripts" / "busy-slurm"
FIXED_TARGET_S, FIXED_TARGET_RATIO = 0.3, 0.06
TASK_TARGET, TO_BEST_TARGET = 0.3, 0.5
VALIDATION = 360  # digits' validation split (20 % of 1,797 images): one image is 1/360 of accuracy
ITEM = """import time
import tensorflow as tf
READY = time.time()  # the script's first line once TensorFlow is imported
import argparse, json, os
from tfrun.tracking.metrics import log_epoch
p = argparse.ArgumentParser(); p.add_argument("--i", type=int); p.add_argument("--secs", type=float); a = p.parse_args()
with open(os.path.join(os.environ["TFRUN_OUTPUT_DIR"], "ready.json"), "w") as f:
    json.dump({"ready": READY}, f)
time.sleep(a.secs)  # the item's own work
log_epoch(0, {"score": float(a.i)})
"""


def slurm_times(job: str, timeout_s: float = 90.0) -> dict[str, float]:
    """Submit, Start, End of a job (epoch seconds) from sacct, once accounting has its end (a
    pool's allocation ends a moment after its study)."""
    deadline = time.monotonic() + timeout_s
    while True:
        out = subprocess.run(
            ["sacct", "-j", job, "-X", "-n", "-P", "-o", "Submit,Start,End"], capture_output=True, text=True, timeout=60
        ).stdout.splitlines()
        stamps = (
            [
                time.mktime(time.strptime(t, "%Y-%m-%dT%H:%M:%S")) if t[:1].isdigit() else float("nan")
                for t in out[0].split("|")
            ]
            if out
            else [float("nan")] * 3
        )
        if not math.isnan(stamps[2]) or time.monotonic() > deadline:
            return dict(zip(("submit", "start", "end"), stamps))
        time.sleep(2)


def trial_statuses(sweep: Path) -> list[dict]:
    points = json.loads((sweep / "sweep.json").read_text())["points"]
    return [
        {
            **json.loads((Path(p["run_dir"]) / "status.json").read_text()),
            "run_dir": p["run_dir"],
            "trial": p.get("trial"),
        }
        for p in sorted(points, key=lambda p: p.get("trial", 0))
    ]


# --- 1. the fixed cost per item ------------------------------------------------------------------


def fixed_study(work: Path, args: argparse.Namespace, pooled: bool, name: str) -> dict:
    _, _ = tfrun(
        work,
        "-m",
        "hydra/sweeper=tfrun",
        "tfrun.objective=score",
        "compute=slurm",
        f"compute.partition={args.partition}",
        f"compute.job_name={name}",
        "compute.poll_s=0.5",
        "entry.script=item.py",
        "hydra.sweeper.sampler=grid",
        "hydra.sweeper.max_parallel=1",
        f"trainer.secs={args.secs}",
        f"trainer.i=choice({','.join(map(str, range(args.items)))})",
        *([] if pooled else ["hydra.sweeper.pool=false"]),
    )
    costs = []
    for status in trial_statuses(newest_sweep(work)):
        ready = json.loads((Path(status["run_dir"]) / "outputs" / "ready.json").read_text())["ready"]
        handed = status["started"] if pooled else status["submitted"]
        costs.append(ready - handed)
    first = trial_statuses(newest_sweep(work))[0]
    startup = json.loads((Path(first["run_dir"]) / "outputs" / "ready.json").read_text())["ready"] - first["submitted"]
    return {"costs": costs, "first": startup, "median_after_first": statistics.median(costs[1:] or costs)}


def fixed(args: argparse.Namespace, work: Path) -> tuple[list[str], dict]:
    (work / "item.py").write_text(ITEM)
    rounds = []
    for r in range(args.repeats):
        name = f"bench-pool-{uuid.uuid4().hex[:6]}"
        order = (True, False) if r % 2 == 0 else (False, True)
        found = {pooled: fixed_study(work, args, pooled, name) for pooled in order}
        rounds.append({"pool": found[True], "job": found[False]})
        print(f"  round {r + 1}: pool {found[True]['costs']}, job {found[False]['costs']}", file=sys.stderr, flush=True)
    pool = statistics.median(c for r in rounds for c in r["pool"]["costs"][1:])
    job = statistics.median(c for r in rounds for c in r["job"]["costs"])
    ratio = pool / job
    met = pool <= FIXED_TARGET_S and ratio <= FIXED_TARGET_RATIO
    firsts = ", ".join(format(r["pool"]["first"], ".1f") for r in rounds)

    def each(mode: str) -> str:
        return "; ".join(" ".join(format(c, ".2f") for c in r[mode]["costs"]) for r in rounds)

    lines = [
        f"Fixed cost per item: {args.items} trials of {args.secs:g} s of work each, one at a time, on Slurm "
        f"(partition {args.partition}); {args.repeats} interleaved round(s). From the hand-out (pool: its RUNNING status "
        f"written as the slot is told; job: sbatch returned) to the script's first line after `import tensorflow`.",
        "",
        "| | warm pool (compute.warm=fork) | a Slurm job per trial (hydra.sweeper.pool=false) |",
        "|---|---|---|",
        f"| **fixed cost per item, median (s)** | **{pool:.3f}** (items after each pool's first) | **{job:.2f}** |",
        f"| ratio pool / job | **{ratio:.3f}x** (target <= {FIXED_TARGET_RATIO}x and <= {FIXED_TARGET_S} s: "
        f"{'met' if met else 'MISSED'}) | |",
        f"| a study's first item, from being fed to that line (pool: the allocation's start and the slot's "
        f"warm-up) | {firsts} | |",
        f"| every item, each round (s) | {each('pool')} | {each('job')} |",
    ]
    return lines, {
        "pool_s": pool,
        "job_s": job,
        "ratio": ratio,
        "target_s": FIXED_TARGET_S,
        "target_ratio": FIXED_TARGET_RATIO,
        "rounds": rounds,
        "items": args.items,
        "secs": args.secs,
    }


# --- 2. tuning: job per trial vs pool vs pool + policy ------------------------------------------


def digits_common(args: argparse.Namespace, name: str) -> list[str]:
    return [
        "-m",
        "hydra/sweeper=tfrun",
        "compute=slurm",
        f"compute.partition={args.partition}",
        f"compute.job_name={name}",
        "compute.poll_s=0.5",
        f"entry.script={DIGITS}",
        "tfrun.objective=val_accuracy",
        f"hydra.sweeper.n_trials={args.trials}",
        f"hydra.sweeper.max_parallel={args.parallel}",
        f"trainer.epochs={args.epochs}",
        f"trainer.lr=tag(log,interval({args.lr}))",
        "trainer.batch_size=choice(32,64,128)",
        "trainer.hidden=choice(16,32,64,128)",
        f"hydra.sweeper.sampler={args.sampler}",
    ]


def held_seconds(work: Path, pooled: bool) -> float:
    """Slot-seconds the study held on the cluster: a pool's allocations (start to end, times
    their slots); jobs' own run times otherwise."""
    sweep = newest_sweep(work)
    if pooled:
        spec = json.loads((sweep / "pool" / "pool.json").read_text())
        jobs = json.loads((sweep / "pool" / "allocations.json").read_text())
        return sum(spec["slots"] * (t["end"] - t["start"]) for t in map(slurm_times, jobs))
    return sum(
        (lambda t: t["end"] - t["start"])(slurm_times(s["job_ids"][-1]))
        for s in trial_statuses(sweep)
        if s.get("job_ids")
    )


def study(work: Path, args: argparse.Namespace, seed: int, mode: str) -> dict:
    name = f"bench-pool-{uuid.uuid4().hex[:6]}"
    extra = {
        "job": ["hydra.sweeper.pool=false"],
        "pool": [],
        "policy": [
            f"hydra.sweeper.policy={args.policy}",
            *(f"hydra.sweeper.policy_args.{a}" for a in args.policy_args),
        ],
    }
    started = time.time()
    wall, _ = tfrun(work, *digits_common(args, name), f"hydra.sweeper.seed={seed}", *extra[mode])
    figures = study_figures(work, started, wall)
    figures["held_s"] = held_seconds(work, mode != "job")
    print(f"  digits, seed {seed}, {mode}: {figures}", file=sys.stderr, flush=True)
    return figures


def tuning(args: argparse.Namespace, work: Path) -> tuple[list[str], dict]:
    runs: dict[str, dict] = {}
    rows = []
    for seed in args.seeds:
        f = {mode: study(work, args, seed, mode) for mode in ("job", "pool", "policy")}
        base = f["job"]
        f["ratios"] = {
            mode: {
                "task": f[mode]["task_s"] / base["task_s"],
                "to_best": f[mode]["to_best_s"] / base["to_best_s"],
                "gap": VALIDATION * (base["best"] - f[mode]["best"]),
                "held": f[mode]["held_s"] / base["held_s"],
            }
            for mode in ("pool", "policy")
        }
        runs[str(seed)] = f
        for mode, label in (
            ("job", "job per trial, no policy"),
            ("pool", "pool, no policy"),
            ("policy", f"pool, {args.policy}"),
        ):
            x = f[mode]
            rows.append(
                f"| {seed} | {label} | {x['pruned']} | {x['task_s']:.0f} | {x['held_s']:.0f} | {x['wall_s']:.0f} | "
                f"{x['to_best_s']:.0f} | {x['best']:.4f} | {x['startup_s']:.1f} |"
            )
    median = {
        mode: {
            k: statistics.median(r["ratios"][mode][k] for r in runs.values())
            for k in ("task", "to_best", "gap", "held")
        }
        for mode in ("pool", "policy")
    }
    p = median["policy"]
    met = {"task": p["task"] <= TASK_TARGET, "to_best": p["to_best"] <= TO_BEST_TARGET, "gap": p["gap"] <= 1}
    lines = [
        f"Digits on Slurm, {args.trials} trials of {args.epochs} epochs, {args.parallel} at once, sampler {args.sampler} "
        f"(seeds {', '.join(map(str, args.seeds))}), lr in ({args.lr}) log scale; policy {args.policy} "
        f"{' '.join(args.policy_args)}".rstrip(),
        "",
        "| seed | study | pruned | task-s | slot-s held | wall s | wall s to best | best val_accuracy | trial start to its first epoch (median s) |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Medians over the seeds of each seed's ratio to its job-per-trial study (the gap in validation images):",
        "",
        "| | task-seconds | wall time to the best | best val_accuracy below | slot-seconds held |",
        "|---|---|---|---|---|",
        *(
            f"| {label} | {median[m]['task']:.2f}x | {median[m]['to_best']:.2f}x | {median[m]['gap']:+.1f} image(s) | "
            f"{median[m]['held']:.2f}x |"
            for m, label in (("pool", "pool, no policy"), ("policy", f"pool + {args.policy}"))
        ),
        "",
        f"- pool + {args.policy}: task-seconds {p['task']:.2f}x (target <= {TASK_TARGET}x: {'met' if met['task'] else 'MISSED'}), "
        f"wall time to the best {p['to_best']:.2f}x (target <= {TO_BEST_TARGET}x: {'met' if met['to_best'] else 'MISSED'}), "
        f"best {p['gap']:+.1f} validation image(s) below (target <= 1: {'met' if met['gap'] else 'MISSED'})",
    ]
    return lines, {"runs": runs, "median": median, "policy": args.policy, "sampler": args.sampler, "met": met}


# --- 3. a busy cluster ---------------------------------------------------------------------------


def busy(args: argparse.Namespace, work: Path) -> tuple[list[str], dict]:
    def run(mode: str, where: str) -> dict:
        name = f"bench-pool-{uuid.uuid4().hex[:6]}"
        started = time.time()
        wall, _ = tfrun(
            work,
            *digits_common(args, name),
            f"hydra.sweeper.seed={args.seeds[0]}",
            *(["hydra.sweeper.pool=false"] if mode == "job" else []),
        )
        sweep = newest_sweep(work)
        jobs = (
            json.loads((sweep / "pool" / "allocations.json").read_text())
            if mode == "pool"
            else [s["job_ids"][-1] for s in trial_statuses(sweep) if s.get("job_ids")]
        )
        waits = [t["start"] - t["submit"] for t in map(slurm_times, jobs)]
        found = {
            "wall_s": wall,
            "jobs": len(jobs),
            "waits": waits,
            "wait_sum": sum(waits),
            "to_best_s": study_figures(work, started, wall)["to_best_s"],
        }
        print(f"  busy bench, {mode} on the {where} cluster: {found}", file=sys.stderr, flush=True)
        return found

    found = {("pool", "idle"): run("pool", "idle"), ("job", "idle"): run("job", "idle")}
    stamp = uuid.uuid4().hex[:6]
    subprocess.run(
        [
            str(BUSY),
            "start",
            "--partition",
            args.partition,
            "--hold-s",
            str(args.hold_s),
            "--name",
            f"bench-busy-{stamp}-",
        ],
        check=True,
        timeout=300,
    )
    try:
        found[("pool", "busy")] = run("pool", "busy")
        found[("job", "busy")] = run("job", "busy")
    finally:
        subprocess.run([str(BUSY), "stop"], timeout=300)
    rounds = math.ceil(args.trials / args.parallel)
    pool_extra = found[("pool", "busy")]["wall_s"] - found[("pool", "idle")]["wall_s"]
    job_extra = found[("job", "busy")]["wall_s"] - found[("job", "idle")]["wall_s"]
    one_wait = statistics.median(found[("pool", "busy")]["waits"])
    job_wait = statistics.median(found[("job", "busy")]["waits"])
    allowed = one_wait + 0.1 * found[("pool", "idle")]["wall_s"]
    met = pool_extra <= allowed
    lines = [
        f"The digits study (seed {args.seeds[0]}, {args.trials} trials of {args.epochs} epochs, {args.parallel} at once, no "
        f"policy) on the idle cluster and on a busy one: scripts/busy-slurm keeps the {args.partition} partition's nodes "
        f"occupied by another "
        f"account's jobs of {args.hold_s:g} s, so every new job waits {args.hold_s:g}-{2 * args.hold_s:g} s for its turn.",
        "",
        "| study | Slurm jobs | wall s, idle | wall s, busy | busy - idle (s) | queue waits on the busy cluster (median, sum s) |",
        "|---|---|---|---|---|---|",
        *(
            f"| {label} | {found[(m, 'busy')]['jobs']} | {found[(m, 'idle')]['wall_s']:.0f} | {found[(m, 'busy')]['wall_s']:.0f} | "
            f"{found[(m, 'busy')]['wall_s'] - found[(m, 'idle')]['wall_s']:+.0f} | {statistics.median(found[(m, 'busy')]['waits']):.0f}, "
            f"{found[(m, 'busy')]['wait_sum']:.0f} |"
            for m, label in (("pool", "in a pool"), ("job", "a job per trial"))
        ),
        "",
        f"- in a pool the busy cluster added {pool_extra:.0f} s: one wait ({one_wait:.0f} s) + 10 % of the idle wall "
        f"is {allowed:.0f} s (target: at most that: {'met' if met else 'MISSED'})",
        f"- a job per trial: {job_extra:.0f} s more, about {job_extra / job_wait if job_wait else float('nan'):.1f} "
        f"wait(s) of {job_wait:.0f} s, for {rounds} round(s) of {args.parallel} trials",
    ]
    data = {f"{m}_{w}": v for (m, w), v in found.items()}
    return lines, {
        **data,
        "pool_extra_s": pool_extra,
        "job_extra_s": job_extra,
        "one_wait_s": one_wait,
        "allowed_s": allowed,
        "met": met,
        "rounds": rounds,
        "job_wait_s": job_wait,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixed", action="store_true", help="the fixed cost per item (default when no part is named)")
    parser.add_argument("--tuning", action="store_true")
    parser.add_argument("--busy", action="store_true")
    parser.add_argument("--items", type=int, default=8)
    parser.add_argument("--secs", type=float, default=12.0, help="each --fixed item's own work")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--lr", default="1e-4,0.3")
    parser.add_argument("--sampler", default="random")
    parser.add_argument("--seeds", type=lambda text: [int(x) for x in text.split(",")], default=[0, 1, 2])
    parser.add_argument("--policy", default="truncation")
    parser.add_argument(
        "--policy-args",
        nargs="*",
        default=["truncation_percentage=50", "delay_evaluation=10", "evaluation_interval=10"],
    )
    parser.add_argument("--hold-s", type=float, default=30.0, help="--busy: each occupant's hold of its node")
    parser.add_argument(
        "--partition", default="debug", help="where every study runs (--busy: which partition is made busy)"
    )
    parser.add_argument("--output", default="-")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    parts = [p for p in ("fixed", "tuning", "busy") if getattr(args, p)] or ["fixed"]
    work = Path(tempfile.mkdtemp(prefix="tfrun-bench-pool-"))
    start_load = load_average()
    sections, figures = [], {}
    for part in parts:
        lines, figures[part] = {"fixed": fixed, "tuning": tuning, "busy": busy}[part](args, work)
        sections += [*lines, ""]
    report = "\n".join(
        [
            "",
            f"## Warm pools ({time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())})",
            "",
            f"Command: `python bench/bench_pool.py {' '.join(sys.argv[1:])}`".rstrip(),
            "",
            f"- {', '.join(versions('tensorflow', 'optuna'))}; load average at start {start_load}, at end {load_average()}",
            "",
            *sections,
        ]
    )
    publish(report, args.output, args.json, {"pool": figures})


if __name__ == "__main__":
    main()
