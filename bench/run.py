"""Every benchmark with one command; bench/RESULTS.md regenerated whole from what they measured.

    python bench/run.py                      # every benchmark at full size (about five hours here)
    python bench/run.py --only tuning,scale  # some of them again; the others keep their last record
    python bench/run.py --quick              # small sizes (minutes): checks that the benchmarks work
    python bench/run.py --render             # RESULTS.md again from the records, measuring nothing
    python bench/run.py --list               # the benchmarks and the commands they run

Each benchmark is its own script, run here with the flags of ``BENCHMARKS``; it writes its
report (markdown, raw repeats included) and its headline figures (JSON). This makes one
record per benchmark, ``bench/results/<name>.json``: the command, date, machine, load
average at start and end, duration, figures and report. ``bench/RESULTS.md`` is then
rendered from the records alone, whole: a summary table at the top (figure, tfrun, the
alternative, ratio, target, met or not, and the issue or doc that explains the target),
then one section per benchmark. Nothing is appended; a record is replaced when its
benchmark runs again, and history is git's.

``--quick`` writes its records and its RESULTS.md under ``bench/.work/run-<date>-quick/``
and never touches ``bench/results/``. The Slurm benchmarks need the local cluster
(``scripts/local-slurm start``). A benchmark that fails keeps its previous record, is
reported as failed, and the others still run; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from benchlib import cpu_model, load_average, versions

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PY = sys.executable
RECORDS = BENCH / "results"


@dataclass(frozen=True)
class Benchmark:
    about: str
    script: str
    full: list[str]
    quick: list[str]
    explained: str  # the issue or doc that sets its targets


BENCHMARKS: dict[str, Benchmark] = {
    "core": Benchmark(
        "CLI latency and local launch overhead",
        "bench_core.py",
        [],
        ["--repeats-startup", "2", "--repeats-run", "1", "--epochs", "2"],
        "issue 9 (1, 2)",
    ),
    "throughput": Benchmark(
        "training throughput, bare vs under tfrun, timed around the whole fit",
        "throughput.py",
        ["--compare", "--repeats", "10"],
        ["--compare", "--repeats", "1", "--steps", "100", "--epochs", "1"],
        "issue 9 (5), issue 21 (2)",
    ),
    "scale": Benchmark(
        "a 100 / 1,000 / 10,000-point `--dry-run -m`: time and peak memory",
        "bench_scale.py",
        ["--sizes", "100,1000,10000", "--repeats", "3"],
        ["--sizes", "10,100"],
        "issue 21 (3)",
    ),
    "backends": Benchmark(
        "Horovod via tfrun vs horovodrun; parameter-server start-up",
        "bench_backends.py",
        ["--repeats", "5", "--steps", "400", "--nodes"],
        ["--repeats", "1", "--steps", "20"],
        "issue 9 (4), issue 21 (4)",
    ),
    "sweep": Benchmark(
        "sweep submission tfrun vs hydra-submitit-launcher, queries per poll, tfrun's memory",
        "bench_sweep.py",
        ["--points", "100,1000", "--monitor-sizes", "10,100,500", "--profile-points", "50"],
        ["--points", "5,10", "--monitor-sizes", "5,10", "--profile-points", "0"],
        "issue 9 (3, 6), issue 21 (3)",
    ),
    # One allocation of 2 slots: 2 points at once, as many as this machine has cores. The local
    # cluster's two debug nodes claim 2 CPUs each but share the same 2; two allocations (4 points
    # at once) took 23.3 s for 80 points against 19.6 s for one.
    "packed": Benchmark(
        "packed sweep (a warm pool) vs hydra-submitit-launcher, start to all finished",
        "bench_sweep.py",
        ["--packed", "--points", "200", "--pack-size", "200", "--pack-slots", "2", "--repeats", "3"],
        ["--packed", "--points", "20", "--pack-size", "10", "--pack-slots", "2"],
        "issue 10, issue 37",
    ),
    # Issue 21 (3): a 1,000-point sweep packed, the same comparison once at that size (hydra-submitit-
    # launcher's 1,000 jobs take ~10 minutes to finish here, so one round).
    "packed1000": Benchmark(
        "a 1,000-point packed sweep vs hydra-submitit-launcher, start to all finished",
        "bench_sweep.py",
        [
            "--packed",
            "--points",
            "1000",
            "--pack-size",
            "1000",
            "--pack-slots",
            "2",
            "--repeats",
            "1",
            "--pack-timeout-min",
            "30",
        ],
        ["--packed", "--points", "20", "--pack-size", "20", "--pack-slots", "2"],
        "issue 10, issue 21 (3), issue 37",
    ),
    # Issue 37: a trial handed to a warm slot vs submitted as a job of its own; the digits study
    # in a pool, with and without a policy, vs a job per trial; the same study on a busy cluster.
    "pool": Benchmark(
        "warm pools: the fixed cost per item, pool vs a Slurm job per trial",
        "bench_pool.py",
        ["--fixed", "--items", "8", "--secs", "12", "--repeats", "3"],
        ["--fixed", "--items", "3", "--secs", "6", "--repeats", "1"],
        "issue 37, docs/guides/pools.md",
    ),
    "pool_tuning": Benchmark(
        "warm pools: the digits study in a pool (with and without a policy) vs a job per trial",
        "bench_pool.py",
        ["--tuning"],
        ["--tuning", "--trials", "4", "--epochs", "3", "--seeds", "0"],
        "issue 37, docs/guides/pools.md",
    ),
    "pool_busy": Benchmark(
        "warm pools: the digits study on a busy cluster, in a pool vs a job per trial",
        "bench_pool.py",
        # (--quick makes only the cpu partition busy, for minutes: the others' jobs go on)
        ["--busy"],
        ["--busy", "--trials", "4", "--epochs", "3", "--hold-s", "10", "--partition", "cpu"],
        "issue 37, docs/guides/pools.md",
    ),
    "watchdog": Benchmark(
        "what the hang watchdog costs training",
        "bench_watchdog.py",
        ["--repeats", "5"],
        ["--repeats", "1", "--steps", "100"],
        "docs/guides/hangs.md",
    ),
    "preemption": Benchmark(
        "how fast a preempted job hands its node over",
        "bench_preemption.py",
        ["--repeats", "3"],
        ["--repeats", "1"],
        "docs/guides/preemption.md",
    ),
    "metrics": Benchmark(
        "what recording metrics costs a script",
        "bench_metrics.py",
        ["--repeats", "5"],
        ["--repeats", "1"],
        "issue 19, docs/guides/tracking.md",
    ),
    "tuning": Benchmark(
        "early termination and asynchronous trials",
        "bench_tuning.py",
        [
            "--epochs",
            "200",
            "--sampler",
            "random",
            "--policy",
            "truncation",
            "--policy-args",
            "truncation_percentage=50",
            "delay_evaluation=10",
            "evaluation_interval=10",
        ],
        ["--trials", "4", "--epochs", "3", "--seeds", "0", "--durations", "4,1,1,1"],
        "issue 18, docs/guides/sweeps.md",
    ),
}
# A figure that needs what this machine does not have, said rather than left out.
NOT_MEASURED = [
    (
        "issue 9 (5)",
        "throughput on one GPU, bare vs under tfrun",
        ">= 0.99",
        "no GPU here; `python bench/throughput.py --compare` on a GPU machine is the same check",
    ),
]


def machine() -> dict[str, str]:
    return {
        "machine": f"{platform.node()}, {os.cpu_count()} CPU(s), {cpu_model()}; local Slurm: nodes node1, node2 "
        "(partition debug, 2 CPUs each) and node3 (partition cpu), network namespaces on this machine",
        "software": f"Python {platform.python_version()}, "
        + ", ".join(versions("tensorflow", "horovod", "hydra-core", "submitit", "optuna")),
    }


def selected(args: argparse.Namespace) -> list[str]:
    names = [n for part in (args.only or []) for n in part.split(",") if n] or list(BENCHMARKS)
    skip = {n for part in (args.skip or []) for n in part.split(",") if n}
    unknown = sorted((set(names) | skip) - set(BENCHMARKS))
    if unknown:
        raise SystemExit(f"run.py: unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    return [n for n in BENCHMARKS if n in names and n not in skip]


def shown(name: str, quick: bool) -> str:
    """The command as RESULTS.md shows it (without run.py's scratch --output/--json)."""
    b = BENCHMARKS[name]
    return " ".join(["python", f"bench/{b.script}", *(a or "''" for a in (b.quick if quick else b.full))])


def run_one(name: str, quick: bool, scratch: Path) -> dict[str, Any] | None:
    """Run one benchmark; its record, or None when it failed (its log says why)."""
    b = BENCHMARKS[name]
    md, figures = scratch / f"{name}.md", scratch / f"{name}.json"
    argv = [PY, str(BENCH / b.script), *(b.quick if quick else b.full), "--output", str(md), "--json", str(figures)]
    print(f"\n=== {name}: {shown(name, quick)}", file=sys.stderr, flush=True)
    record: dict[str, Any] = {
        "name": name,
        "command": shown(name, quick),
        "quick": quick,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "load_start": load_average(),
        **machine(),
    }
    start = time.time()
    with open(scratch / f"{name}.log", "w") as log:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.PIPE, text=True, bufsize=1)
        assert proc.stderr is not None
        for line in proc.stderr:  # progress to the console, everything to the log
            sys.stderr.write(line)
            log.write(line)
            log.flush()
        code = proc.wait()
    record.update(seconds=round(time.time() - start, 1), load_end=load_average())
    if code != 0 or not figures.exists() or not md.exists():
        tail = (scratch / f"{name}.log").read_text()[-1500:]
        print(f"=== {name} FAILED (exit {code}) after {record['seconds']:.0f} s\n{tail}", file=sys.stderr, flush=True)
        return None
    print(f"=== {name} done in {record['seconds']:.0f} s", file=sys.stderr, flush=True)
    record.update(figures=json.loads(figures.read_text()), report=md.read_text())
    return record


# --------------------------------------------------------------------------- the summary


@dataclass(frozen=True)
class Row:
    figure: str
    tfrun: str = ""
    alternative: str = ""
    ratio: str = ""
    target: str = ""
    met: bool | None = None  # None: reported, no target

    def cells(self, explained: str) -> list[str]:
        verdict = "" if self.met is None else ("met" if self.met else "**MISSED**")
        return [self.figure, self.tfrun, self.alternative, self.ratio, self.target, verdict, explained]


def core_rows(f: dict) -> list[Row]:
    s, o = f["startup"], f["overhead"]
    tf_import = s['python -c "import tensorflow"']
    ps = next(k for k in s if "backend=ps" in k)
    return [
        Row(
            "`tfrun --dry-run`, 2-node ps job on Slurm (median s)",
            f"{s[ps]:.2f}",
            f"{tf_import:.2f} (`import tensorflow`)",
            f"{s[ps] / tf_import:.2f}x",
            "< 0.5 s",
            s[ps] < 0.5,
        ),
        Row(
            "`tfrun --dry-run`, default run (median s)",
            f"{s['tfrun --dry-run']:.2f}",
            f"{tf_import:.2f}",
            f"{s['tfrun --dry-run'] / tf_import:.2f}x",
            "< 0.5 s",
            s["tfrun --dry-run"] < 0.5,
        ),
        Row(
            "`tfrun --help` (median s)",
            f"{s['tfrun --help']:.2f}",
            f"{tf_import:.2f}",
            f"{s['tfrun --help'] / tf_import:.2f}x",
        ),
        Row(
            "digits example, `tfrun compute=local` vs `python train.py`, wall (median s)",
            f"{o['tfrun']:.2f}",
            f"{o['python']:.2f}",
            f"{o['ratio']:.3f}",
            "<= 1.05",
            o["ratio"] <= 1.05,
        ),
    ]


def throughput_rows(f: dict) -> list[Row]:
    t = f["throughput"]
    names = {"loop": "`tf.function` loop", "fit": "`model.fit`, every callback included"}
    return [
        Row(
            f"{names[m]}: samples/s, whole fit timed (median; spread of the ratio {t[m]['spread']})",
            f"{t[m]['tfrun']:.0f}",
            f"{t[m]['bare']:.0f} (bare script)",
            f"{t[m]['ratio']:.3f}",
            ">= 0.99",
            t[m]["ratio"] >= 0.99,
        )
        for m in ("loop", "fit")
        if m in t
    ]


def scale_rows(f: dict) -> list[Row]:
    s = f["scale"]
    sizes = sorted(s["sizes"], key=int)
    rows = []
    for n in sizes:
        x, big = s["sizes"][n], int(n) >= 10_000
        rows.append(
            Row(
                f"`tfrun --dry-run -m`, {int(n):,} points: s / peak MB",
                f"{x['seconds']:.1f} / {x['peak_mb']:.0f}",
                "",
                f"{x['per_point_ms']:.2f} ms per point",
                "<= 30 s, <= 1024 MB" if big else "",
                (x["seconds"] <= 30 and x["peak_mb"] <= 1024) if big else None,
            )
        )
    if len(sizes) > 1:
        rows.append(
            Row(
                f"cost per point, {int(s['growth_from']):,} to {int(sizes[-1]):,} points",
                "",
                "",
                f"{s['per_point_growth']:.2f}x",
                "flat (<= 1.5x)",
                s["per_point_growth"] <= 1.5,
            )
        )
    return rows


def backends_rows(f: dict) -> list[Row]:
    rows: list[Row] = []
    for key, where in (("horovod", "one host"), ("horovod_nodes", "two nodes")):
        if key in f:
            h = f[key]
            rows += [
                Row(
                    f"Horovod, 2 ranks on {where}: wall time (median s)",
                    f"{h['wall']['tfrun']:.2f}",
                    f"{h['wall']['horovodrun']:.2f} (`horovodrun --gloo`)",
                    f"{h['ratio']:.3f}",
                    "<= 1.02",
                    h["ratio"] <= 1.02,
                ),
                Row(
                    f"Horovod, 2 ranks on {where}: launch to `hvd.init()` returned (median s)",
                    f"{h['launch_to_init']['tfrun']:.2f}",
                    f"{h['launch_to_init']['horovodrun']:.2f}",
                    f"{h['launch_to_init']['tfrun'] / h['launch_to_init']['horovodrun']:.3f}",
                ),
            ]
            if "step_ms" in h:
                rows.append(
                    Row(
                        f"Horovod, 2 ranks on {where}: steady-state step (median ms)",
                        f"{h['step_ms']['tfrun']:.1f}",
                        f"{h['step_ms']['horovodrun']:.1f}",
                        f"{h['step_ms']['tfrun'] / h['step_ms']['horovodrun']:.3f}",
                        "<= 1.02",
                        h["step_ms"]["tfrun"] / h["step_ms"]["horovodrun"] <= 1.02,
                    )
                )
    if "ps" in f:
        rows.append(
            Row(
                "ps: chief + 2 workers + 1 ps, launch to strategy ready (median s)",
                f"{f['ps']['launch_to_ready']:.2f}",
                "(no alternative)",
            )
        )
    return rows


def sweep_rows(f: dict) -> list[Row]:
    rows: list[Row] = []
    for size, x in sorted(f.get("submit", {}).items(), key=lambda kv: int(kv[0])):
        target = 0.2 if int(size) >= 1000 else 1.0  # issue 21 asks 0.2x at 1,000 points; issue 9 1.0x
        rows.append(
            Row(
                f"{int(size):,}-point sweep on Slurm: s to all submitted",
                f"{x['tfrun']:.1f}",
                f"{x['hsl']:.1f} (hydra-submitit-launcher)",
                f"{x['ratio']:.2f}x",
                f"<= {target}x",
                x["ratio"] <= target,
            )
        )
        if "tfrun_finished" in x:
            rows.append(
                Row(
                    f"{int(size):,}-point sweep on Slurm: s to all finished",
                    f"{x['tfrun_finished']:.0f}",
                    f"{x['hsl_finished']:.0f}",
                    f"{x['tfrun_finished'] / x['hsl_finished']:.2f}x",
                )
            )
    monitor = sorted(f.get("monitor", {}).items(), key=lambda kv: int(kv[0]))
    if monitor:
        per_poll = [m["queries_per_poll"] for _, m in monitor]
        # What issue 9 asks is that a poll's queries do not grow with the sweep: one sacct a poll,
        # plus squeue while some job is not in accounting yet, which weighs most in the shortest
        # (smallest) sweep's few polls.
        constant = per_poll[-1] <= 1.25 * per_poll[0] and max(per_poll) <= 2
        rows.append(
            Row(
                "scheduler queries per poll, " + " / ".join(f"{s} points" for s, _ in monitor),
                " / ".join(f"{q:.2f}" for q in per_poll),
                "",
                "",
                "no growth with the sweep (<= 1.25x the smallest's, <= 2)",
                constant,
            )
        )
        size, m = monitor[-1]
        rows.append(Row(f"tfrun following a {size}-job sweep: peak RSS (MB)", f"{m['vmhwm_mb']:.0f}"))
    return rows


def packed_rows(f: dict) -> list[Row]:
    p = f["packed"]
    n_jobs = -(-p["points"] // p["pack_size"])
    return [
        Row(
            f"{p['points']} trivial points, start to all finished (s), pack_size={p['pack_size']} "
            f"pack_slots={p['pack_slots']}",
            f"{p['tfrun_wall']:.0f}",
            f"{p['hsl_wall']:.0f} (hydra-submitit-launcher)",
            f"{p['ratio']:.2f}x",
            f"<= {p['target']}x",
            p["ratio"] <= p["target"],
        ),
        Row(
            "packed sweep: Slurm jobs (sacct)",
            str(p["tfrun_jobs"]),
            str(p["hsl_jobs"]),
            "",
            f"ceil(N/K) = {n_jobs}",
            p["tfrun_jobs"] == n_jobs,
        ),
        *(
            [
                Row(
                    "packed sweep: Slurm job steps (sacct)",
                    str(p["tfrun_steps"]),
                    str(p["hsl_jobs"]),
                    "",
                    f"one per slot: <= {n_jobs * p['pack_slots']}",
                    p["tfrun_steps"] <= n_jobs * p["pack_slots"],
                )
            ]
            if p.get("target", 0.3) <= 0.2
            else []
        ),  # (earlier records ran one step per point)
        *(
            [
                Row(
                    f"{p['points']} trivial points packed: s to all submitted",
                    f"{p['tfrun_submitted']:.1f}",
                    f"{p['hsl_submitted']:.1f} (hydra-submitit-launcher)",
                    f"{p['tfrun_submitted'] / p['hsl_submitted']:.2f}x",
                )
            ]
            if "hsl_submitted" in p
            else []
        ),  # (records before 2026-12-01 06:20 have it in their section only)
    ]


def watchdog_rows(f: dict) -> list[Row]:
    w = f["watchdog"]
    rows = [Row("`tfrun.heartbeat()` per call (ns)", f"{w['beat_ns']:.0f}")]
    rows += [
        Row(
            f"{mode}: throughput lost with the hang watchdog on",
            f"{w[mode]['on']:.0f}",
            f"{w[mode]['off']:.0f} (watchdog off)",
            f"{100 * w[mode]['cost']:+.2f} %",
            "< 0.5 %",
            w[mode]["cost"] < 0.005,
        )
        for mode in ("loop", "fit")
        if mode in w
    ]
    return rows


def preemption_rows(f: dict) -> list[Row]:
    p = f["preemption"]
    return [
        Row(
            "preempted job: s until the preempting job starts (median)",
            f"{p['tfrun_s']:.1f}",
            f"{p['grace_s']:.1f} (a stop that waits out GraceTime {p['grace_time_s']} s)",
            f"{p['ratio']:.2f}x",
        )
    ]


def metrics_rows(f: dict) -> list[Row]:
    m = f["metrics"]
    return [
        Row(
            "`tfrun.log_metric`, per call (us, median)",
            f"{m['no TF']['loop_us']:.2f}",
            f"{m['former']['loop_us']:.0f} (rewrite per record)",
            "",
            "<= 2 us",
            m["no TF"]["loop_us"] <= 2,
        ),
        Row(
            "`tfrun.log_metric` with TensorFlow imported, per call (us)",
            f"{m['TF imported']['loop_us']:.2f}",
            "",
            "",
            "<= 2 us",
            m["TF imported"]["loop_us"] <= 2,
        ),
        Row(
            "reading 1,000,000 metric records (s)",
            f"{m['read_1m_s']['median']:.2f}",
            "",
            "",
            "< 2 s",
            m["read_1m_s"]["median"] < 2,
        ),
    ]


def tuning_rows(f: dict) -> list[Row]:
    t = f["tuning"]
    rows: list[Row] = []
    if "digits" in t:
        d = t["digits"]
        policy, runs, median = d["policy"], d["runs"], d["median"]
        seeds = f"median of {len(runs)} {d.get('sampler', 'tpe')} seed(s)"

        def across(combine: Callable[[list[float]], float], key: str) -> dict[str, float]:
            return {k: combine([r[k][key] for r in runs.values()]) for k in ("none", policy)}

        total, to_best, best = (
            across(sum, "task_s"),
            across(statistics.median, "to_best_s"),
            across(statistics.median, "best"),
        )
        rows += [
            Row(
                f"tuning digits, policy={policy} vs none: task-seconds (all seeds; ratio: {seeds})",
                f"{total[policy]:.0f}",
                f"{total['none']:.0f}",
                f"{median['task']:.2f}x",
                "<= 0.5x",
                median["task"] <= 0.5,
            ),
            Row(
                f"tuning digits, policy={policy} vs none: wall time to the best (s, median; ratio: {seeds})",
                f"{to_best[policy]:.0f}",
                f"{to_best['none']:.0f}",
                f"{median['to_best']:.2f}x",
                "<= 0.6x",
                median["to_best"] <= 0.6,
            ),
            Row(
                f"tuning digits, policy={policy} vs none: best val_accuracy (median; gap: {seeds})",
                f"{best[policy]:.4f}",
                f"{best['none']:.4f}",
                f"{median['gap']:+.2f} points below",
                "<= 0.5 points below",
                median["gap"] <= 0.5,
            ),
        ]
    if "async" in t:
        a = t["async"]
        rows.append(
            Row(
                "trials of unequal length on Slurm: wall (s), asynchronous vs lock-step batches",
                f"{a['async_s']:.1f}",
                f"{a['batches_s']:.1f} (Hydra's batch-synchronous pattern)",
                f"{a['ratio']:.2f}x",
                "<= 0.7x",
                a["ratio"] <= 0.7,
            )
        )
    return rows


def pool_rows(f: dict) -> list[Row]:
    p = f["pool"]
    rows: list[Row] = []
    if "fixed" in p:
        x = p["fixed"]
        rows.append(
            Row(
                f"fixed cost per item, hand-out to the script's first line with TensorFlow imported "
                f"(median s; items of {x['secs']:g} s)",
                f"{x['pool_s']:.3f}",
                f"{x['job_s']:.2f} (a Slurm job per trial)",
                f"{x['ratio']:.3f}x",
                f"<= {x['target_ratio']}x, <= {x['target_s']} s",
                x["ratio"] <= x["target_ratio"] and x["pool_s"] <= x["target_s"],
            )
        )
    if "tuning" in p:
        t = p["tuning"]
        seeds = f"median of {len(t['runs'])} {t['sampler']} seed(s)"
        for mode, label in (("pool", "pool, no policy"), ("policy", f"pool + {t['policy']}")):
            m = t["median"][mode]
            total = sum(r[mode]["task_s"] for r in t["runs"].values())
            base = sum(r["job"]["task_s"] for r in t["runs"].values())
            targets = mode == "policy"
            rows += [
                Row(
                    f"tuning digits on Slurm, {label} vs a job per trial: task-seconds ({seeds})",
                    f"{total:.0f}",
                    f"{base:.0f}",
                    f"{m['task']:.2f}x",
                    "<= 0.3x" if targets else "",
                    m["task"] <= 0.3 if targets else None,
                ),
                Row(
                    f"tuning digits on Slurm, {label} vs a job per trial: wall time to the best ({seeds})",
                    "",
                    "",
                    f"{m['to_best']:.2f}x",
                    "<= 0.5x" if targets else "",
                    m["to_best"] <= 0.5 if targets else None,
                ),
                Row(
                    f"tuning digits on Slurm, {label} vs a job per trial: best val_accuracy ({seeds})",
                    "",
                    "",
                    f"{m['gap']:+.1f} image(s) below",
                    "<= 1 image" if targets else "",
                    m["gap"] <= 1 if targets else None,
                ),
            ]
    if "busy" in p:
        b = p["busy"]
        rows += [
            Row(
                "digits study on a busy cluster, in a pool: busy - idle wall (s)",
                f"{b['pool_extra_s']:.0f}",
                f"{b['job_extra_s']:.0f} (a job per trial)",
                "",
                f"<= one wait + 10 % ({b['allowed_s']:.0f} s)",
                b["met"],
            ),
        ]
    return rows


ROWS: dict[str, Callable[[dict], list[Row]]] = {
    "core": core_rows,
    "throughput": throughput_rows,
    "scale": scale_rows,
    "backends": backends_rows,
    "sweep": sweep_rows,
    "packed": packed_rows,
    "packed1000": packed_rows,
    "watchdog": watchdog_rows,
    "preemption": preemption_rows,
    "metrics": metrics_rows,
    "tuning": tuning_rows,
    "pool": pool_rows,
    "pool_tuning": pool_rows,
    "pool_busy": pool_rows,
}


def summary(records: dict[str, dict | None]) -> list[str]:
    lines = [
        "| benchmark | figure | tfrun | alternative | ratio | target | met | explained in |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, record in records.items():
        if record is None:
            lines.append(
                f"| {name} | not measured yet: `python bench/run.py --only {name}` | | | | | | "
                f"{BENCHMARKS[name].explained} |"
            )
            continue
        try:
            rows = ROWS[name](record["figures"])
        except (KeyError, ZeroDivisionError, StopIteration, TypeError) as exc:
            rows = [Row(f"figures incomplete ({type(exc).__name__}: {exc})")]
        lines += ["| " + " | ".join([name, *row.cells(BENCHMARKS[name].explained)]) + " |" for row in rows]
    for explained, figure, target, why in NOT_MEASURED:
        lines.append(f"| | {figure} | not measured | | | {target} | | {explained}: {why} |")
    return lines


def section(record: dict) -> list[str]:
    """A benchmark's section: what run.py knows of the run, then the script's own report one level down."""
    body = []
    for line in record["report"].splitlines():
        if re.match(r"^#{1,2} ", line):  # the script's title: run.py gives the section its own
            continue
        if line.startswith("Command: `python bench/"):  # the script's command: run.py shows it below
            continue
        body.append("#" + line if line.startswith("#") else line)
    name = record["name"]
    return [
        f"## {name}: {BENCHMARKS[name].about}",
        "",
        f"- command: `{record['command']}` ({record['seconds']:.0f} s{', --quick' if record['quick'] else ''})",
        f"- date: {record['date']}; load average (1, 5, 15 min) at start {record['load_start']}, "
        f"at end {record['load_end']}",
        f"- machine: {record['machine']}",
        f"- software: {record['software']}",
        "",
        "\n".join(body).strip("\n"),
        "",
    ]


def render(records_dir: Path, target: Path, invocation: str) -> None:
    records: dict[str, dict | None] = {}
    for name in BENCHMARKS:
        path = records_dir / f"{name}.json"
        records[name] = json.loads(path.read_text()) if path.exists() else None
    dates = sorted(r["date"] for r in records.values() if r)
    text = [
        "# Benchmarks: the current figures",
        "",
        f"Generated by `{invocation}` from the records in `{records_dir.relative_to(REPO)}/` "
        f"(measured {dates[0] if dates else '-'} to {dates[-1] if dates else '-'}); do not edit by hand. "
        "`python bench/run.py --only NAME` measures one benchmark again and regenerates this file. "
        "Every figure is measured on this machine in one run against the alternative; on a shared 2-CPU "
        "machine a ratio is worth something only next to the load averages of its section.",
        "",
        *summary(records),
        "",
    ]
    for record in records.values():
        if record:
            text += section(record)
    target.write_text("\n".join(text).rstrip("\n") + "\n")
    print(f"wrote {target}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions (checks the benchmarks)")
    parser.add_argument("--only", action="append", help=f"comma-separated, from: {', '.join(BENCHMARKS)}")
    parser.add_argument("--skip", action="append", help="comma-separated benchmarks to leave out")
    parser.add_argument("--render", action="store_true", help="only regenerate RESULTS.md from the records")
    parser.add_argument("--list", action="store_true", help="print the benchmarks and their commands, run nothing")
    args = parser.parse_args()

    names = selected(args)
    if args.list:
        for name in names:
            print(f"{name}: {BENCHMARKS[name].about}\n    {shown(name, args.quick)}")
        return
    scratch = BENCH / ".work" / f"run-{time.strftime('%Y%m%d-%H%M%S')}{'-quick' if args.quick else ''}"
    records_dir = scratch / "results" if args.quick else RECORDS
    results = BENCH / "RESULTS.md" if not args.quick else scratch / "RESULTS.md"
    invocation = "python bench/run.py" + (" --quick" if args.quick else "")
    scratch.mkdir(parents=True, exist_ok=True)
    records_dir.mkdir(parents=True, exist_ok=True)
    failed = []
    if not args.render:
        for name in names:
            record = run_one(name, args.quick, scratch)
            if record is None:
                failed.append(name)
                continue
            (records_dir / f"{name}.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
            render(records_dir, results, invocation)  # after each: a long run shows what it has so far
    render(records_dir, results, invocation)
    if failed:
        sys.exit(f"run.py: failed: {', '.join(failed)} (their logs are in {scratch})")


if __name__ == "__main__":
    main()
