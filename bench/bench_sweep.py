"""Sweep benchmark: submitting a big sweep to Slurm with tfrun vs. hydra-submitit-launcher.

On the local cluster (``scripts/local-slurm start``), in one run:

1. Submit: a ``--points`` sweep (default 200) of the same trivial task (print a number)
   with the same Slurm parameters (partition debug, 1 node, 1 task, 5 minutes), once
   with ``tfrun -m compute=slurm compute.wait=false`` and once with a Hydra app using
   ``hydra/launcher=submitit_slurm`` (hydra-submitit-launcher 1.2.0, installed into its
   own virtualenv under bench/.work/ with the same hydra-core, omegaconf and submitit
   versions as tfrun's environment, so that only the launcher differs).
   *Submitted* is measured the same way for both: from the command's start to the
   moment the last job's ``<id>_submitted.pkl`` was renamed into place by submitit
   after ``sbatch`` answered (the file's ctime; submitit writes the pickles before
   sbatch, then renames them to the job ids, which updates the ctime). Slurm's own
   ``Submit`` time (sacct, 1 s resolution) is shown as a check. tfrun's own return
   (``compute.wait=false``) is shown too; hydra-submitit-launcher's app blocks until
   every job has finished, so its return is its end-to-end time.
   *All finished* is the last array element's ``End`` in sacct, from the command's start.
2. Monitor: ``tfrun -m ... compute.wait=true`` for sweeps of ``--monitor-sizes`` points
   (default 10 and 100) with ``sacct``/``squeue`` wrappers first on PATH that count
   every call: the scheduler queries per poll must not grow with the sweep.
3. Profile: one ``tfrun`` submission of ``--profile-points`` points with timers around
   its phases (Hydra's validation of every point, tfrun's composition, run_job,
   planning, submission), to show where the time goes.

Everything is cancelled at the end. Prints a markdown table and appends it, with the
command, date and machine, to bench/RESULTS.md (``--output -`` writes nothing).

    python bench/bench_sweep.py [--points 200] [--monitor-sizes 10,100] [--profile-points 50]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "bench" / ".work"
VENV = WORK / "hsl-venv"
HSL_VERSION = "1.2.0"
TARGET_RATIO = 1.0
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
SLURM = {"partition": "debug", "nodes": 1, "tasks_per_node": 1, "timeout_min": 5}
REAL = {name: shutil.which(name) or f"/usr/bin/{name}" for name in ("sacct", "squeue", "scancel")}

TASK = 'import argparse\np = argparse.ArgumentParser()\np.add_argument("--x", type=int)\nprint(p.parse_args().x)\n'
HSL_APP = '''import hydra


@hydra.main(version_base="1.3", config_path=".", config_name="config")
def main(cfg) -> int:
    print(cfg.x)
    return cfg.x


if __name__ == "__main__":
    main()
'''
HSL_CONFIG = "defaults:\n  - override hydra/launcher: submitit_slurm\n  - _self_\nx: 0\n"
WRAPPER = '#!/bin/sh\n[ -n "$BENCH_SWEEP_CALLS" ] && echo "$(date +%s.%N) {name} $*" >> "$BENCH_SWEEP_CALLS"\nexec {real} "$@"\n'

# Timers around tfrun's sweep phases (wrapping only: behaviour is unchanged).
PROFILER = '''import atexit, functools, json, os, sys, time
T, EVENTS = {}, {}
def wrap(owner, name, label):
    real = getattr(owner, name)
    @functools.wraps(real)
    def timed(*a, **k):
        EVENTS.setdefault(label + ":first", time.time())
        t = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            e = T.setdefault(label, [0, 0.0]); e[0] += 1; e[1] += time.perf_counter() - t
            EVENTS[label + ":last"] = time.time()
    setattr(owner, name, timed)
from hydra.plugins import sweeper
from hydra._internal import config_loader_impl
from hydra.core import utils as hydra_utils
import tfrun.multirun, tfrun.plan, tfrun.targets.slurm
wrap(sweeper.Sweeper, "validate_batch_is_legal", "validate")
wrap(config_loader_impl.ConfigLoaderImpl, "load_sweep_config", "compose")
wrap(hydra_utils, "run_job", "run_job")
wrap(hydra_utils, "_save_config", "save_config")
wrap(tfrun.multirun, "_plan_point", "plan_point")
wrap(tfrun.multirun, "plan_points", "plan_points")
wrap(tfrun.multirun, "run_points", "run_points")
wrap(tfrun.targets.slurm, "submit", "submit")
atexit.register(lambda: open(os.environ["BENCH_SWEEP_PROFILE"], "w").write(json.dumps({"timers": T, "events": EVENTS, "exit": time.time()})))
from tfrun.cli import main
main()
'''


def tfrun_command() -> list[str]:
    """The console script beside this interpreter, else ``python -m tfrun.cli``."""
    script = Path(sys.executable).with_name("tfrun")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "tfrun.cli"]


def machine() -> dict[str, str]:
    """What the figures were measured on (load matters: 2 cores run the composition and the jobs)."""
    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "python": sys.version.split()[0],
        "tfrun env": ", ".join(f"{n} {metadata.version(n)}" for n in ("hydra-core", "omegaconf", "submitit")),
        "load average (1, 5, 15 min) at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def run(argv: list[str], **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, **kw)


def ensure_venv() -> Path:
    """hydra-submitit-launcher in its own venv, pinned to tfrun's hydra/omegaconf/submitit."""
    pins = {name: metadata.version(name) for name in ("hydra-core", "omegaconf", "submitit")}
    wanted = [f"hydra-submitit-launcher=={HSL_VERSION}", *(f"{n}=={v}" for n, v in pins.items())]
    python = VENV / "bin" / "python"
    stamp = VENV / "bench-pins.txt"
    if python.exists() and stamp.exists() and stamp.read_text() == "\n".join(wanted):
        return python
    print(f"bench: creating {VENV} with {' '.join(wanted)}", file=sys.stderr)
    shutil.rmtree(VENV, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *wanted], check=True)
    stamp.write_text("\n".join(wanted))
    return python


def sacct_rows(job_ids: list[str]) -> list[dict[str, str]]:
    """Allocation rows of jobs/arrays, times as epoch seconds (SLURM_TIME_FORMAT=%s)."""
    out = run([REAL["sacct"], "-X", "-n", "-P", "-j", ",".join(job_ids), "-o", "JobID,State,Submit,Start,End"],
              env={**os.environ, "SLURM_TIME_FORMAT": "%s"}, timeout=120).stdout
    keys = ("JobID", "State", "Submit", "Start", "End")
    return [dict(zip(keys, line.split("|"))) for line in out.splitlines() if line.strip()]


def wait_finished(job_ids: list[str], count: int, timeout: float) -> list[dict[str, str]]:
    """Poll sacct (not counted) until ``count`` array elements have ended."""
    deadline = time.time() + timeout
    while True:
        rows = [r for r in sacct_rows(job_ids) if re.fullmatch(r"\d+_\d+", r["JobID"]) or "_" not in r["JobID"]]
        done = [r for r in rows if r["State"].split()[0] in FINAL]
        if len(done) >= count:
            return done
        if time.time() > deadline:
            raise SystemExit(f"bench: {len(done)}/{count} jobs of {job_ids} ended after {timeout:.0f} s")
        time.sleep(2)


def last_submitted(submitit_dir: Path) -> tuple[float, int]:
    """(latest ctime of the ``*_submitted.pkl`` files, how many) under a submitit folder."""
    stamps = [p.stat().st_ctime for p in submitit_dir.rglob("*_submitted.pkl")]
    return (max(stamps) if stamps else float("nan")), len(stamps)


def count_calls(path: Path) -> dict[str, list[list[str]]]:
    calls: dict[str, list[list[str]]] = {"sacct": [], "squeue": []}
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split()
            calls.setdefault(parts[1], []).append(parts[2:])
    return calls


def ids_per_query(args: list[str]) -> int:
    """How many job/array ids one sacct/squeue command line names."""
    for flag in ("-j", "--jobs"):
        if flag in args and args.index(flag) + 1 < len(args):
            return len(args[args.index(flag) + 1].split(","))
    return 0


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.stamp = time.strftime("%Y%m%d-%H%M%S")
        self.dir = WORK / f"sweep-{self.stamp}"
        self.dir.mkdir(parents=True)
        (self.dir / "num.py").write_text(TASK)
        (self.dir / "hsl").mkdir()
        (self.dir / "hsl" / "app.py").write_text(HSL_APP)
        (self.dir / "hsl" / "config.yaml").write_text(HSL_CONFIG)
        bin_dir = self.dir / "bin"
        bin_dir.mkdir()
        for name in ("sacct", "squeue"):
            (bin_dir / name).write_text(WRAPPER.format(name=name, real=REAL[name]))
            (bin_dir / name).chmod(0o755)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TFRUN_", "SLURM_"))}
        env.update(TFRUN_RUNS_DIR=str(self.dir / "runs"), PATH=f"{bin_dir}{os.pathsep}{env['PATH']}")
        self.env = env
        self.names: list[str] = []

    def name(self, what: str) -> str:
        self.names.append(f"bench-{what}-{self.stamp}")
        return self.names[-1]

    def timed(self, argv: list[str], cwd: Path, calls: Path, **extra: str) -> tuple[float, float, str]:
        """(start epoch, seconds, stderr+stdout) of a command that must succeed."""
        start = time.time()
        result = run(argv, cwd=cwd, env={**self.env, "BENCH_SWEEP_CALLS": str(calls), **extra},
                     stdin=subprocess.DEVNULL, timeout=self.args.timeout)
        took = time.time() - start
        if result.returncode != 0:
            raise SystemExit(f"bench: command failed ({result.returncode}): {argv}\n{result.stderr[-3000:]}")
        return start, took, result.stderr + result.stdout

    def tfrun_sweep(self, points: int, wait: bool, label: str, profile: Path | None = None) -> dict:
        argv = [*tfrun_command(), "-m", "compute=slurm", f"compute.wait={str(wait).lower()}",
                f"compute.partition={SLURM['partition']}", f"compute.nodes={SLURM['nodes']}",
                f"compute.tasks_per_node={SLURM['tasks_per_node']}", f"compute.timeout_min={SLURM['timeout_min']}",
                f"compute.poll_s={self.args.poll_s}", f"compute.job_name={self.name(label)}",
                "entry.script=num.py", f"trainer.x=range({points})"]
        extra = {}
        if profile:
            (self.dir / "profiler.py").write_text(PROFILER)
            argv = [sys.executable, str(self.dir / "profiler.py"), *argv[len(tfrun_command()):]]
            extra = {"BENCH_SWEEP_PROFILE": str(profile)}
        calls = self.dir / f"calls-{label}.txt"
        start, took, out = self.timed(argv, self.dir, calls, **extra)
        match = re.search(r"as job\(s\) ([\d, ]+); sweep dir (.+)$", out, re.M)
        if not match:
            raise SystemExit(f"bench: tfrun did not say what it submitted:\n{out[-2000:]}")
        arrays, sweep_dir = match.group(1).split(", "), Path(match.group(2))
        submitted, pickles = last_submitted(sweep_dir / ".submitit")
        return {"start": start, "returned": took, "submitted": submitted - start, "pickles": pickles,
                "arrays": arrays, "calls": count_calls(calls)}

    def hsl_sweep(self, points: int, python: Path) -> dict:
        sweep_dir = self.dir / f"hsl-sweep-{points}"
        argv = [str(python), "app.py", "-m", f"hydra.sweep.dir={sweep_dir}",
                f"hydra.launcher.partition={SLURM['partition']}", f"hydra.launcher.nodes={SLURM['nodes']}",
                f"hydra.launcher.tasks_per_node={SLURM['tasks_per_node']}",
                f"hydra.launcher.timeout_min={SLURM['timeout_min']}", f"hydra.launcher.name={self.name('hsl')}",
                f"x=range({points})"]
        calls = self.dir / "calls-hsl.txt"
        start, took, out = self.timed(argv, self.dir / "hsl", calls)
        submitted, pickles = last_submitted(sweep_dir / ".submitit")
        arrays = sorted({m.group(1) for p in (sweep_dir / ".submitit").iterdir()
                         if (m := re.fullmatch(r"(\d+)_\d+", p.name))})
        stamps = re.findall(r"^\[([\d\- :,]+)\]\[HYDRA\] \t#\d+ :", out, re.M)
        launcher = (time.mktime(time.strptime(stamps[0].split(",")[0], "%Y-%m-%d %H:%M:%S"))
                    + int(stamps[0].split(",")[1]) / 1000 - start) if stamps else float("nan")
        return {"start": start, "returned": took, "submitted": submitted - start, "pickles": pickles,
                "arrays": arrays, "calls": count_calls(calls), "launcher_started": launcher}

    def finish(self, result: dict, points: int) -> dict:
        rows = wait_finished(result["arrays"], points, self.args.timeout)
        result["slurm_submit"] = (min(float(r["Submit"]) for r in rows) - result["start"],
                                  max(float(r["Submit"]) for r in rows) - result["start"])
        result["all_finished"] = max(float(r["End"]) for r in rows) - result["start"]
        result["states"] = sorted({r["State"] for r in rows})
        return result

    def cancel_all(self) -> None:
        for name in self.names:
            run([REAL["scancel"], f"--name={name}"], timeout=60)


def profile_table(path: Path, start: float, points: int) -> list[str]:
    data = json.loads(path.read_text())
    t, ev = data["timers"], data["events"]
    get = lambda k: t.get(k, [0, 0.0])[1]  # noqa: E731
    validate, compose, run_job = get("validate"), get("compose"), get("run_job")
    rows = [
        ("start-up: interpreter, imports, master config (to Hydra's validation)", ev["validate:first"] - start),
        ("Hydra's sweeper validates every point (one composition each)", validate),
        ("tfrun composes every point again (load_sweep_config)", max(0.0, compose - validate)),
        ("run_job: .hydra/*.yaml per point", get("save_config")),
        ("run_job: tfrun's plan per point (build_plan, in_sweep)", get("plan_point")),
        ("run_job: Hydra's own per-point work (config copies, HydraConfig)", run_job - get("save_config") - get("plan_point")),
        ("launch: plan.json, sbatch, status.json (run_points)", get("run_points")),
        ("  of which submit (pickles + one sbatch per array)", get("submit")),
        ("exit", data["exit"] - ev["run_points:last"]),
    ]
    total = data["exit"] - start
    lines = [f"| phase of `tfrun -m` submitting {points} points | seconds | ms per point | share |", "|---|---|---|---|"]
    lines += [f"| {name} | {sec:.2f} | {1000 * sec / points:.0f} | {100 * sec / total:.0f}% |" for name, sec in rows]
    lines.append(f"| total | {total:.2f} | {1000 * total / points:.0f} | |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=200)
    parser.add_argument("--monitor-sizes", default="10,100")
    parser.add_argument("--profile-points", type=int, default=50, help="0: no profile")
    parser.add_argument("--poll-s", type=float, default=2.0, help="tfrun's compute.poll_s")
    parser.add_argument("--timeout", type=float, default=1800, help="per command / per sweep to finish")
    parser.add_argument("--output", default=str(REPO / "bench" / "RESULTS.md"), help="'-' to write nothing")
    args = parser.parse_args()

    if run([str(REPO / "scripts" / "local-slurm"), "status"], timeout=60).returncode != 0:
        raise SystemExit("bench: the local Slurm cluster is not up: scripts/local-slurm start")
    python = ensure_venv()
    hsl_versions = run([str(python), "-c", "from importlib.metadata import version as v; "
                        "print(*(f'{n} {v(n)}' for n in ('hydra-submitit-launcher', 'hydra-core', 'submitit')), sep=', ')"],
                       timeout=60).stdout.strip()
    info = machine()
    info["other jobs in the queue at start"] = str(len(run([REAL["squeue"], "-h"], timeout=60).stdout.splitlines()))
    info["hydra-submitit-launcher venv"] = hsl_versions
    bench = Bench(args)
    try:
        hsl = bench.finish(bench.hsl_sweep(args.points, python), args.points)
        tf = bench.finish(bench.tfrun_sweep(args.points, wait=False, label="tfrun"), args.points)
        monitor = {}
        for size in [int(s) for s in args.monitor_sizes.split(",") if s]:
            m = bench.tfrun_sweep(size, wait=True, label=f"monitor{size}")
            monitor[size] = bench.finish(m, size)
        prof = None
        if args.profile_points:
            prof_path = bench.dir / "profile.json"
            p = bench.tfrun_sweep(args.profile_points, wait=False, label="profile", profile=prof_path)
            prof = profile_table(prof_path, p["start"], args.profile_points)
            bench.finish(p, args.profile_points)
    finally:
        bench.cancel_all()

    ratio = tf["submitted"] / hsl["submitted"]
    n = args.points
    lines = [
        f"| {n}-point sweep, same task and Slurm parameters | tfrun | hydra-submitit-launcher {HSL_VERSION} |",
        "|---|---|---|",
        f"| all {n} jobs submitted (last `_submitted.pkl` renamed), s from start | {tf['submitted']:.1f} | {hsl['submitted']:.1f} |",
        f"| Slurm's Submit time (sacct, 1 s resolution), s from start | {tf['slurm_submit'][1]:.0f} | {hsl['slurm_submit'][1]:.0f} |",
        f"| command returned, s | {tf['returned']:.1f} (`compute.wait=false`) | {hsl['returned']:.1f} (blocks until done) |",
        f"| all jobs finished (last End in sacct), s from start | {tf['all_finished']:.0f} | {hsl['all_finished']:.0f} |",
        f"| job arrays | {len(tf['arrays'])} | {len(hsl['arrays'])} |",
        f"| final states | {', '.join(tf['states'])} | {', '.join(hsl['states'])} |",
        f"| sacct / squeue calls by the command | {len(tf['calls']['sacct'])} / {len(tf['calls']['squeue'])} | "
        f"{len(hsl['calls']['sacct'])} / {len(hsl['calls']['squeue'])} |",
        f"| **submit time ratio tfrun / hydra-submitit-launcher** | **{ratio:.2f}x** | target <= {TARGET_RATIO:.1f}x: "
        f"{'met' if ratio <= TARGET_RATIO else 'MISSED'} |",
    ]
    if hsl["launcher_started"] == hsl["launcher_started"]:
        lines.append(f"| hydra-submitit-launcher: start-up + Hydra's validation of every point (to its first `#0` log "
                     f"line) | | {hsl['launcher_started']:.1f} s |")
    mon = [f"| `tfrun -m ... compute.wait=true compute.poll_s={args.poll_s}` | "
           + " | ".join(f"{s} points" for s in monitor) + " |", "|---|" + "---|" * len(monitor)]
    follow = {s: m["returned"] - m["submitted"] for s, m in monitor.items()}

    def polls(size: int) -> float:  # the first poll comes at once, then one every poll_s or more
        return 1 + follow[size] / args.poll_s

    rows = {
        "following (submitted to tfrun's exit), s": lambda s, m: f"{follow[s]:.1f}",
        "sacct calls": lambda s, m: str(len(m["calls"]["sacct"])),
        "squeue calls": lambda s, m: str(len(m["calls"]["squeue"])),
        "polls at most (1 + following / poll_s)": lambda s, m: f"{polls(s):.1f}",
        "scheduler queries per poll": lambda s, m: f"{(len(m['calls']['sacct']) + len(m['calls']['squeue'])) / polls(s):.2f}",
        "job ids named per sacct call (max)": lambda s, m: str(max((ids_per_query(a) for a in m["calls"]["sacct"]), default=0)),
        "all finished (last End), s from start": lambda s, m: f"{m['all_finished']:.0f}",
    }
    mon += [f"| {name} | " + " | ".join(fn(s, m) for s, m in monitor.items()) + " |" for name, fn in rows.items()]

    command = "python bench/bench_sweep.py " + " ".join(sys.argv[1:])
    report = "\n".join([
        "", f"## Sweep submission on the local Slurm: tfrun vs hydra-submitit-launcher {HSL_VERSION}", "",
        f"Command: `{command.strip()}`", "",
        *(f"- {k}: {v}" for k, v in info.items()), "",
        "Same task (a script / Hydra app printing a number), same Slurm parameters "
        f"(partition {SLURM['partition']}, {SLURM['nodes']} node, {SLURM['tasks_per_node']} task, "
        f"{SLURM['timeout_min']} min). Submitted = the command's start to the ctime of the last "
        "`<id>_submitted.pkl` (submitit renames the pickles into place after sbatch answered), the same "
        "method for both; all finished = the last array element's End in sacct.", "",
        *lines, "", *mon, "", *(prof or []), "",
    ])
    print(report)
    if args.output != "-":
        with open(args.output, "a") as f:
            f.write(report)
        print(f"appended to {args.output}", file=sys.stderr)
    if ratio > TARGET_RATIO:
        print(f"bench: submit time ratio {ratio:.2f}x misses the target {TARGET_RATIO:.1f}x", file=sys.stderr)


if __name__ == "__main__":
    main()
