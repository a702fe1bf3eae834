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
   its phases (Hydra's validation of every point, the copy of a composition per point,
   planning, submission), to show where the time goes.

   ``--points`` may name several sizes (``10,100,500``): one submission per size and tool,
   a row per size, the detailed table for the largest; ``--points ''`` skips this part.
   Every command's process is sampled (``/proc/<pid>/status``: VmHWM, VmRSS) while it
   runs, and ``wait4`` gives its ``ru_maxrss``: the monitoring table shows the peak RSS of
   the tfrun parent following each sweep (issue 9: a 500-job sweep).
4. ``--packed`` (issues 10, 37), instead of 1-3: the same ``--points`` trivial sweep (default
   200), start to ALL FINISHED (the last allocation's ``End`` in sacct), with
   hydra-submitit-launcher (one job per point) and with tfrun
   ``compute.pack_size=K compute.pack_slots=S`` (``--pack-size``, ``--pack-slots``; default
   100 and 2: an allocation takes a whole 2-CPU node of the debug partition), i.e. a warm
   pool of ceil(N/K) allocations of S slots, in one run (``--repeats`` interleaved rounds,
   medians), as a ratio (target tfrun <= 0.2x), with the sacct job counts of each (tfrun:
   ceil(N/K) array elements and S job steps each, one per slot; hydra-submitit-launcher: N
   jobs). The tfrun
   submission runs under the phase timers of 3 (same code path as the console script:
   ``tfrun.cli.main.main``), and every point's run dir gives its in-allocation phases; when
   the target is missed, one more small job times, inside an allocation like a pack's,
   an empty ``srun`` step, the interpreter and tfrun's bootstrap imports, so that the
   report says where tfrun's time goes.

Everything is cancelled at the end. Prints a markdown table and appends it, with the
command, date and machine, to bench/RESULTS.md (``--output -`` writes nothing;
``--json PATH`` also writes the headline figures for bench/run.py).

    python bench/bench_sweep.py [--points 200] [--monitor-sizes 10,100] [--profile-points 50]
    python bench/bench_sweep.py --packed [--points 200] [--pack-size 100] [--pack-slots 2] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from benchlib import cpu_model, load_average, publish, versions

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "bench" / ".work"
VENV = WORK / "hsl-venv"
HSL_VERSION = "1.2.0"
TARGET_RATIO = 1.0
PACKED_TARGET = 0.2  # issue 37 (issue 10 asked 0.3): tfrun packed / hydra-submitit-launcher, start to all finished
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
SLURM = {"partition": "debug", "nodes": 1, "tasks_per_node": 1, "timeout_min": 5}
REAL = {name: shutil.which(name) or f"/usr/bin/{name}" for name in ("sacct", "squeue", "scancel")}

TASK = 'import argparse\np = argparse.ArgumentParser()\np.add_argument("--x", type=int)\nprint(p.parse_args().x)\n'
HSL_APP = """import hydra


@hydra.main(version_base="1.3", config_path=".", config_name="config")
def main(cfg) -> int:
    print(cfg.x)
    return cfg.x


if __name__ == "__main__":
    main()
"""
HSL_CONFIG = "defaults:\n  - override hydra/launcher: submitit_slurm\n  - _self_\nx: 0\n"
WRAPPER = '#!/bin/sh\n[ -n "$BENCH_SWEEP_CALLS" ] && echo "$(date +%s.%N) {name} $*" >> "$BENCH_SWEEP_CALLS"\nexec {real} "$@"\n'

# Timers around tfrun's sweep phases (wrapping only: behaviour is unchanged).
PROFILER = """import atexit, functools, json, os, sys, time
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
import tfrun.config.composition, tfrun.config.hydra_files, tfrun.plan.planner, tfrun.runner.sweeps, tfrun.targets.slurm, tfrun.targets.pool
wrap(sweeper.Sweeper, "validate_batch_is_legal", "validate")
import tfrun.config.points  # tfrun_basic's check, point by point (Hydra loads the plugin's class itself)
wrap(tfrun.config.points.PointComposer, "check", "validate")
wrap(config_loader_impl.ConfigLoaderImpl, "load_sweep_config", "compose")
wrap(tfrun.config.hydra_files, "save_yaml", "save_config")
wrap(tfrun.config.hydra_files, "write_texts", "save_config")  # a point planned from resolved values
wrap(tfrun.plan.planner, "plan_points", "plan_points")
wrap(tfrun.config.composition, "points", "config_points")
wrap(tfrun.runner.sweeps, "_job", "job")
wrap(tfrun.runner.sweeps, "run_points", "run_points")
wrap(tfrun.targets.slurm, "submit", "submit")
wrap(tfrun.targets.pool.SlurmPool, "start", "submit")
atexit.register(lambda: open(os.environ["BENCH_SWEEP_PROFILE"], "w").write(json.dumps({"timers": T, "events": EVENTS, "exit": time.time()})))
from tfrun.cli.main import main
main()
"""


def tfrun_command() -> list[str]:
    """The console script beside this interpreter, else ``python -m tfrun.cli``."""
    script = Path(sys.executable).with_name("tfrun")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "tfrun.cli"]


def machine() -> dict[str, str]:
    """What the figures were measured on (load matters: 2 cores run the composition and the jobs)."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "nproc": str(os.cpu_count()),
        "cpu": cpu_model(),
        "python": sys.version.split()[0],
        "tfrun env": ", ".join(versions("hydra-core", "omegaconf", "submitit")),
        "load average (1, 5, 15 min) at start": load_average(),
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


def memory_kb(pid: int) -> dict[str, int]:
    """VmHWM (peak resident set) and VmRSS of a live process, in kB; {} once it has exited."""
    found = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    key, value = line.split(":", 1)
                    found[key] = int(value.split()[0])
    except OSError:
        pass
    return found


def run_sampled(argv: list[str], cwd: Path, env: dict[str, str], timeout: float) -> tuple[int, str, dict[str, float]]:
    """(exit code, stdout+stderr, memory) of a command; while it runs its process's
    /proc status is sampled every 0.2 s (the last VmHWM seen is its peak RSS up to then),
    and ``wait4`` reports its ``ru_maxrss`` (the process or its largest waited-for child)."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, text=True
        )
        deadline, hwm, rss, samples, timeline = time.time() + timeout, 0, 0, 0, []
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                break
            mem = memory_kb(proc.pid)
            if mem:
                samples += 1
                hwm, rss = max(hwm, mem.get("VmHWM", 0)), max(rss, mem.get("VmRSS", 0))
                timeline.append((time.time(), mem.get("VmRSS", 0) / 1024))
            if time.time() > deadline:
                proc.kill()
                proc.wait()
                raise SystemExit(f"bench: command timed out after {timeout:.0f} s: {argv}")
            time.sleep(0.2)
        out.seek(0)
        text = out.read()
    return (
        proc.returncode,
        text,
        {
            "vmhwm_mb": hwm / 1024,
            "vmrss_max_mb": rss / 1024,
            "ru_maxrss_mb": usage.ru_maxrss / 1024,
            "samples": samples,
            "timeline": timeline,
        },
    )


def rss_after(memory: dict, since: float) -> tuple[float, float]:
    """(largest, last) VmRSS sampled from ``since`` (epoch) on, in MB."""
    later = [mb for t, mb in memory.get("timeline", []) if t >= since]
    return (max(later), later[-1]) if later else (float("nan"), float("nan"))


def sacct_rows(job_ids: list[str]) -> list[dict[str, str]]:
    """Allocation rows of jobs/arrays, times as epoch seconds (SLURM_TIME_FORMAT=%s)."""
    out = run(
        [REAL["sacct"], "-X", "-n", "-P", "-j", ",".join(job_ids), "-o", "JobID,State,Submit,Start,End"],
        env={**os.environ, "SLURM_TIME_FORMAT": "%s"},
        timeout=120,
    ).stdout
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


def sacct_counts(job_ids: list[str]) -> dict[str, int]:
    """What Slurm accounted for these arrays: allocations (array elements) and job steps."""
    out = run([REAL["sacct"], "-n", "-P", "-j", ",".join(job_ids), "-o", "JobID"], timeout=120).stdout.split()
    # An array's elements read 123_0, 123_1; a one-element pack is a plain job, 123.
    return {
        "jobs": sum(1 for j in out if re.fullmatch(r"\d+(_\d+)?", j)),
        "steps": sum(1 for j in out if re.fullmatch(r"\d+(_\d+)?\.\d+", j)),
    }


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
        """(start epoch, seconds, stderr+stdout) of a command that must succeed; its memory in self.memory."""
        start = time.time()
        code, out, self.memory = run_sampled(
            argv, cwd, {**self.env, "BENCH_SWEEP_CALLS": str(calls), **extra}, self.args.timeout
        )
        took = time.time() - start
        if code != 0:
            raise SystemExit(f"bench: command failed ({code}): {argv}\n{out[-3000:]}")
        return start, took, out

    def tfrun_sweep(
        self, points: int, wait: bool, label: str, profile: Path | None = None, pack: tuple[int, int, int] | None = None
    ) -> dict:
        """``pack``: (pack_size, pack_slots, the allocation's timeout_min)."""
        timeout_min = pack[2] if pack else SLURM["timeout_min"]
        argv = [
            *tfrun_command(),
            "-m",
            "compute=slurm",
            f"compute.wait={str(wait).lower()}",
            f"compute.partition={SLURM['partition']}",
            f"compute.nodes={SLURM['nodes']}",
            f"compute.tasks_per_node={SLURM['tasks_per_node']}",
            f"compute.timeout_min={timeout_min}",
            f"compute.poll_s={self.args.poll_s}",
            f"compute.job_name={self.name(label)}",
            *([f"compute.pack_size={pack[0]}", f"compute.pack_slots={pack[1]}"] if pack else []),
            "entry.script=num.py",
            f"trainer.x=range({points})",
        ]
        extra = {}
        if profile:
            (self.dir / "profiler.py").write_text(PROFILER)
            argv = [sys.executable, str(self.dir / "profiler.py"), *argv[len(tfrun_command()) :]]
            extra = {"BENCH_SWEEP_PROFILE": str(profile)}
        calls = self.dir / f"calls-{label}.txt"
        start, took, out = self.timed(argv, self.dir, calls, **extra)
        match = re.search(r"as job\(s\) ([\d, ]+); sweep dir (.+)$", out, re.M) or re.search(
            r"to a pool of \d+ allocation\(s\) x \d+ slot\(s\) \(job\(s\) ([\d, ]+)\); sweep dir (.+)$", out, re.M
        )
        if not match:
            raise SystemExit(f"bench: tfrun did not say what it submitted:\n{out[-2000:]}")
        arrays, sweep_dir = match.group(1).split(", "), Path(match.group(2))
        folder = sweep_dir / ("pool" if pack else "") / ".submitit"
        submitted, pickles = last_submitted(folder)
        return {
            "start": start,
            "returned": took,
            "submitted": submitted - start,
            "pickles": pickles,
            "arrays": arrays,
            "calls": count_calls(calls),
            "memory": self.memory,
            "sweep_dir": sweep_dir,
        }

    def hsl_sweep(self, points: int, python: Path, label: str = "") -> dict:
        sweep_dir = self.dir / f"hsl-sweep-{points}{label}"
        argv = [
            str(python),
            "app.py",
            "-m",
            f"hydra.sweep.dir={sweep_dir}",
            f"hydra.launcher.partition={SLURM['partition']}",
            f"hydra.launcher.nodes={SLURM['nodes']}",
            f"hydra.launcher.tasks_per_node={SLURM['tasks_per_node']}",
            f"hydra.launcher.timeout_min={SLURM['timeout_min']}",
            f"hydra.launcher.name={self.name('hsl')}",
            f"x=range({points})",
        ]
        calls = self.dir / f"calls-hsl{label}.txt"
        start, took, out = self.timed(argv, self.dir / "hsl", calls)
        submitted, pickles = last_submitted(sweep_dir / ".submitit")
        arrays = sorted(
            {m.group(1) for p in (sweep_dir / ".submitit").iterdir() if (m := re.fullmatch(r"(\d+)_\d+", p.name))}
        )
        stamps = re.findall(r"^\[([\d\- :,]+)\]\[HYDRA\] \t#\d+ :", out, re.M)
        launcher = (
            (
                time.mktime(time.strptime(stamps[0].split(",")[0], "%Y-%m-%d %H:%M:%S"))
                + int(stamps[0].split(",")[1]) / 1000
                - start
            )
            if stamps
            else float("nan")
        )
        return {
            "start": start,
            "returned": took,
            "submitted": submitted - start,
            "pickles": pickles,
            "arrays": arrays,
            "calls": count_calls(calls),
            "launcher_started": launcher,
            "memory": self.memory,
        }

    def finish(self, result: dict, points: int) -> dict:
        rows = wait_finished(result["arrays"], points, self.args.timeout)
        result["slurm_submit"] = (
            min(float(r["Submit"]) for r in rows) - result["start"],
            max(float(r["Submit"]) for r in rows) - result["start"],
        )
        result["all_finished"] = max(float(r["End"]) for r in rows) - result["start"]
        result["states"] = sorted({r["State"] for r in rows})
        result["rows"] = rows
        return result

    def cancel_all(self) -> None:
        for name in self.names:
            run([REAL["scancel"], f"--name={name}"], timeout=60)


def profile_table(path: Path, start: float, points: int) -> list[str]:
    data = json.loads(path.read_text())
    t, ev = data["timers"], data["events"]
    get = lambda k: t.get(k, [0, 0.0])[1]  # noqa: E731
    validate, compose, plan_points = get("validate"), get("compose"), get("plan_points")
    compositions = t.get("compose", [0, 0.0])[0]
    rows = [
        (
            "start-up: interpreter, imports, master config (to the sweeper's check)",
            ev.get("validate:first", ev.get("plan_points:first", start)) - start,
        ),
        (
            "the sweeper checks every point (tfrun_basic: a point planned from resolved values is not composed)",
            validate,
        ),
        (f"  of which Hydra composes (load_sweep_config, {compositions} call(s): one per base)", compose),
        (
            "  of which the rest (each point's values read; a point that is composed: its copy)",
            max(0.0, validate - compose),
        ),
        ("plan every point (tfrun.plan.planner.plan_points)", plan_points),
        (
            "  of which each point's run config: composed or resolved, checked (tfrun.config.composition.points)",
            get("config_points"),
        ),
        (
            "  of which the rest (the plans built from them: build_plan, the sbatch request)",
            plan_points - get("config_points"),
        ),
        ("run dirs: .hydra/*.yaml and a JobReturn per point (tfrun.runner.sweeps._job)", get("job")),
        ("  of which .hydra/*.yaml per point", get("save_config")),
        ("launch: plan.json, sbatch, status.json (run_points)", get("run_points")),
        ("  of which submit (pickles + one sbatch per array)", get("submit")),
        ("exit", data["exit"] - ev["run_points:last"]),
    ]
    total = data["exit"] - start
    lines = [
        f"| phase of `tfrun -m` submitting {points} points | seconds | ms per point | share |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {sec:.2f} | {1000 * sec / points:.0f} | {100 * sec / total:.0f}% |" for name, sec in rows]
    lines.append(f"| total | {total:.2f} | {1000 * total / points:.0f} | |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", default="200", help="sweep size(s), comma-separated; '' skips the submission part")
    parser.add_argument("--monitor-sizes", default="10,100")
    parser.add_argument("--profile-points", type=int, default=50, help="0: no profile")
    parser.add_argument("--poll-s", type=float, default=2.0, help="tfrun's compute.poll_s")
    parser.add_argument("--timeout", type=float, default=1800, help="per command / per sweep to finish")
    parser.add_argument("--output", default="-", help="also write the report here (bench/run.py does)")
    parser.add_argument("--json", default=None, help="also write the headline figures here (for bench/run.py)")
    packed = parser.add_argument_group("--packed (issue 10)")
    packed.add_argument("--packed", action="store_true", help="only the packed comparison, start to all finished")
    packed.add_argument("--pack-size", type=int, default=100, help="compute.pack_size K")
    packed.add_argument("--pack-slots", type=int, default=2, help="compute.pack_slots S (a debug node has 2 CPUs)")
    packed.add_argument(
        "--pack-timeout-min", type=int, default=20, help="compute.timeout_min of a pack (the allocation runs K points)"
    )
    packed.add_argument("--repeats", type=int, default=1, help="interleaved rounds (medians)")
    packed.add_argument(
        "--breakdown",
        choices=("missed", "always", "never"),
        default="missed",
        help="time an empty srun step, the interpreter and tfrun's bootstrap in an allocation",
    )
    args = parser.parse_args()
    sizes = [int(x) for x in str(args.points).split(",") if x.strip()]

    if run([str(REPO / "scripts" / "local-slurm"), "status"], timeout=60).returncode != 0:
        raise SystemExit("bench: the local Slurm cluster is not up: scripts/local-slurm start")
    python = ensure_venv()
    hsl_versions = run(
        [
            str(python),
            "-c",
            "from importlib.metadata import version as v; "
            "print(*(f'{n} {v(n)}' for n in ('hydra-submitit-launcher', 'hydra-core', 'submitit')), sep=', ')",
        ],
        timeout=60,
    ).stdout.strip()
    info = machine()
    info["other jobs in the queue at start"] = str(len(run([REAL["squeue"], "-h"], timeout=60).stdout.splitlines()))
    info["hydra-submitit-launcher venv"] = hsl_versions
    if args.packed:
        return packed_main(args, python, info, sizes[0] if sizes else 200)
    bench = Bench(args)
    submitted: dict[int, tuple[dict, dict]] = {}
    try:
        for size in sizes:
            hsl = bench.finish(bench.hsl_sweep(size, python), size)
            tf = bench.finish(bench.tfrun_sweep(size, wait=False, label=f"tfrun{size}"), size)
            submitted[size] = (tf, hsl)
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

    figures: dict = {"submit": {}, "monitor": {}}
    lines: list[str] = []
    if len(submitted) > 1:
        lines += [
            f"| points | tfrun submitted, s | hydra-submitit-launcher {HSL_VERSION} submitted, s | "
            "**ratio** (target <= 1.0x) | tfrun all finished, s | hydra-submitit-launcher all finished, s |",
            "|---|---|---|---|---|---|",
        ]
        for size, (tf, hsl) in submitted.items():
            r = tf["submitted"] / hsl["submitted"]
            lines.append(
                f"| {size} | {tf['submitted']:.1f} | {hsl['submitted']:.1f} | **{r:.2f}x**: "
                f"{'met' if r <= TARGET_RATIO else 'MISSED'} | {tf['all_finished']:.0f} | {hsl['all_finished']:.0f} |"
            )
        lines.append("")
    for size, (tf, hsl) in submitted.items():
        figures["submit"][size] = {
            "tfrun": tf["submitted"],
            "hsl": hsl["submitted"],
            "ratio": tf["submitted"] / hsl["submitted"],
            "tfrun_finished": tf["all_finished"],
            "hsl_finished": hsl["all_finished"],
            "hsl_vmhwm_mb": hsl["memory"]["vmhwm_mb"],
        }
    ratio = 0.0
    if submitted:
        n = max(submitted)
        tf, hsl = submitted[n]
        ratio = tf["submitted"] / hsl["submitted"]
        lines += submit_table(n, tf, hsl, ratio)
    mon = monitor_table(args, monitor, figures) if monitor else []

    command = "python bench/bench_sweep.py " + " ".join(sys.argv[1:])
    report = "\n".join(
        [
            "",
            (
                f"## Sweep submission on the local Slurm: tfrun vs hydra-submitit-launcher {HSL_VERSION}"
                if submitted
                else "## Following a sweep on the local Slurm: tfrun's scheduler queries and memory"
            ),
            "",
            f"Command: `{command.strip()}`",
            "",
            *(f"- {k}: {v}" for k, v in info.items()),
            "",
            "Same task (a script / Hydra app printing a number), same Slurm parameters "
            f"(partition {SLURM['partition']}, {SLURM['nodes']} node, {SLURM['tasks_per_node']} task, "
            f"{SLURM['timeout_min']} min). Submitted = the command's start to the ctime of the last "
            "`<id>_submitted.pkl` (submitit renames the pickles into place after sbatch answered), the same "
            "method for both; all finished = the last array element's End in sacct.",
            "",
            *lines,
            "",
            *mon,
            "",
            *(prof or []),
            "",
        ]
    )
    publish(report, args.output, args.json, figures)
    if submitted and ratio > TARGET_RATIO:
        print(f"bench: submit time ratio {ratio:.2f}x misses the target {TARGET_RATIO:.1f}x", file=sys.stderr)


def submit_table(n: int, tf: dict, hsl: dict, ratio: float) -> list[str]:
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
        f"| peak RSS of the command's process (VmHWM), MB | {tf['memory']['vmhwm_mb']:.0f} (returns once submitted) | "
        f"{hsl['memory']['vmhwm_mb']:.0f} (follows every job to the end) |",
    ]
    if hsl["launcher_started"] == hsl["launcher_started"]:
        lines.append(
            f"| hydra-submitit-launcher: start-up + Hydra's validation of every point (to its first `#0` log "
            f"line) | | {hsl['launcher_started']:.1f} s |"
        )
    return lines


def monitor_table(args: argparse.Namespace, monitor: dict[int, dict], figures: dict) -> list[str]:
    mon = [
        f"| `tfrun -m ... compute.wait=true compute.poll_s={args.poll_s}` | "
        + " | ".join(f"{s} points" for s in monitor)
        + " |",
        "|---|" + "---|" * len(monitor),
    ]
    follow = {s: m["returned"] - m["submitted"] for s, m in monitor.items()}

    def polls(size: int) -> float:  # the first poll comes at once, then one every poll_s or more
        return 1 + follow[size] / args.poll_s

    def per_poll(s: int, m: dict) -> float:
        return (len(m["calls"]["sacct"]) + len(m["calls"]["squeue"])) / polls(s)

    rows = {
        "following (submitted to tfrun's exit), s": lambda s, m: f"{follow[s]:.1f}",
        "sacct calls": lambda s, m: str(len(m["calls"]["sacct"])),
        "squeue calls": lambda s, m: str(len(m["calls"]["squeue"])),
        "polls at most (1 + following / poll_s)": lambda s, m: f"{polls(s):.1f}",
        "scheduler queries per poll": lambda s, m: f"{per_poll(s, m):.2f}",
        "job ids named per sacct call (max)": lambda s, m: str(
            max((ids_per_query(a) for a in m["calls"]["sacct"]), default=0)
        ),
        "all finished (last End), s from start": lambda s, m: f"{m['all_finished']:.0f}",
        "tfrun parent: peak RSS (VmHWM, last sample), MB": lambda s, m: f"{m['memory']['vmhwm_mb']:.0f}",
        "tfrun parent: ru_maxrss (wait4; itself or a child), MB": lambda s, m: f"{m['memory']['ru_maxrss_mb']:.0f}",
        "tfrun parent: RSS while following (largest / last sample), MB": lambda s, m: "{:.0f} / {:.0f}".format(
            *rss_after(m["memory"], m["start"] + m["submitted"])
        ),
    }
    mon += [f"| {name} | " + " | ".join(fn(s, m) for s, m in monitor.items()) + " |" for name, fn in rows.items()]
    for s, m in monitor.items():
        figures["monitor"][s] = {
            "queries_per_poll": per_poll(s, m),
            "vmhwm_mb": m["memory"]["vmhwm_mb"],
            "ru_maxrss_mb": m["memory"]["ru_maxrss_mb"],
            "samples": m["memory"]["samples"],
            "following_s": follow[s],
            "following_rss_mb": rss_after(m["memory"], m["start"] + m["submitted"])[0],
        }
    return mon


# --- --packed (issue 10): the same sweep, start to all finished, one job per point vs packed ---

# Run inside an allocation shaped like a pack's (``--breakdown``): what one point's job step
# costs apart from the script, each part timed separately (medians of ``repeats``).
ALLOCATION_PROBE = """import json, statistics, subprocess, sys, time
out, python, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
srun = ["srun", "--exact", "--nodes=1", "--ntasks=1", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
commands = {
    "srun_true": [*srun, "true"],
    "python_pass": [python, "-c", "pass"],
    "python_bootstrap": [python, "-c", "import tfrun.bootstrap"],
    "srun_python_bootstrap": [*srun, python, "-c", "import tfrun.bootstrap"],
}
times = {name: [] for name in commands}
for _ in range(repeats):
    for name, argv in commands.items():
        t = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        times[name].append(time.perf_counter() - t)
json.dump({name: statistics.median(xs) for name, xs in times.items()}, open(out, "w"))
"""


def point_records(sweep_dir: Path) -> list[dict]:
    """Each packed point's timestamps: the runner starting its step (status ``started``), the
    bootstrap's own record in the step (ranks/0.json ``started``/``ended``) and the runner
    settling it (status ``ended``)."""
    found = []
    for point in sorted(sweep_dir.iterdir()):
        try:
            status = json.loads((point / "status.json").read_text())
            rank = json.loads((point / "ranks" / "0.json").read_text())
        except (OSError, ValueError):
            continue
        found.append(
            {
                "state": status.get("state"),
                "allocation": status.get("allocation"),
                "runner_started": status.get("started"),
                "rank_started": rank.get("started"),
                "rank_ended": rank.get("ended"),
                "settled": status.get("ended"),
            }
        )
    return found


def packed_phases(tf: dict, points: int) -> dict[str, float]:
    """Where a packed sweep's time went, from sacct and the points' run dirs."""
    recs = [
        r
        for r in point_records(tf["sweep_dir"])
        if None not in (r["runner_started"], r["rank_started"], r["rank_ended"], r["settled"])
    ]
    rows, start = tf["rows"], tf["start"]
    med = statistics.median
    by_alloc: dict[str, list[dict]] = {}
    for r in recs:
        by_alloc.setdefault(r["allocation"], []).append(r)
    busy = [max(r["settled"] for r in rs) - min(r["runner_started"] for r in rs) for rs in by_alloc.values()]
    return {
        "points_completed": sum(1 for r in recs if r["state"] == "COMPLETED"),
        "submitted": tf["submitted"],
        "returned": tf["returned"],
        "first_start": min(float(r["Start"]) for r in rows) - start,
        "last_start": max(float(r["Start"]) for r in rows) - start,
        "first_point": min(r["runner_started"] for r in recs) - start,
        "last_point_settled": max(r["settled"] for r in recs) - start,
        "all_finished": tf["all_finished"],
        "step_start": med([r["rank_started"] - r["runner_started"] for r in recs]),
        "script": med([r["rank_ended"] - r["rank_started"] for r in recs]),
        "step_end": med([r["settled"] - r["rank_ended"] for r in recs]),
        "per_point": med([r["settled"] - r["runner_started"] for r in recs]),
        "allocation_busy": med(busy) if busy else float("nan"),
        "points_per_slot": math.ceil(len(recs) / max(1, len(by_alloc)) / max(1, tf["pack"][1])),
    }


def probe_allocation(bench: "Bench", slots: int, repeats: int) -> dict[str, float]:
    """Time the parts of a point's job step inside one allocation shaped like a pack's."""
    script, out = bench.dir / "allocation_probe.py", bench.dir / "allocation_probe.json"
    script.write_text(ALLOCATION_PROBE)
    argv = [
        shutil.which("sbatch") or "sbatch",
        "--wait",
        "--parsable",
        f"--partition={SLURM['partition']}",
        "--nodes=1",
        f"--ntasks-per-node={SLURM['tasks_per_node'] * slots}",
        "--time=10",
        f"--job-name={bench.name('probe')}",
        f"--output={bench.dir / 'allocation_probe.log'}",
        f"--wrap={shlex.join([sys.executable, str(script), str(out), sys.executable, str(repeats)])}",
    ]
    result = run(argv, cwd=bench.dir, env=bench.env, timeout=bench.args.timeout)
    if result.returncode != 0 or not out.exists():
        log = bench.dir / "allocation_probe.log"
        print(
            f"bench: the allocation probe failed: {result.stderr[-1000:]} "
            f"{log.read_text()[-1000:] if log.exists() else ''}",
            file=sys.stderr,
        )
        return {}
    return json.loads(out.read_text())


def packed_main(args: argparse.Namespace, python: Path, info: dict[str, str], n: int) -> None:
    k, slots = args.pack_size, args.pack_slots
    jobs = math.ceil(n / k)
    bench = Bench(args)
    rounds: list[tuple[dict, dict]] = []
    probe: dict[str, float] = {}
    try:
        for r in range(args.repeats):

            def hsl_run() -> dict:
                return bench.finish(bench.hsl_sweep(n, python, label=f"-r{r}"), n)

            def tfrun_run() -> dict:
                prof_path = bench.dir / f"profile-packed-r{r}.json"
                res = bench.tfrun_sweep(
                    n, wait=False, label=f"packed-r{r}", profile=prof_path, pack=(k, slots, args.pack_timeout_min)
                )
                res["pack"] = (k, slots)
                res["profile"] = profile_table(prof_path, res["start"], n)
                return bench.finish(res, jobs)

            first, second = (hsl_run, tfrun_run) if r % 2 == 0 else (tfrun_run, hsl_run)
            a, b = first(), second()
            hsl, tf = (a, b) if first is hsl_run else (b, a)
            hsl["counts"], tf["counts"] = sacct_counts(hsl["arrays"]), sacct_counts(tf["arrays"])
            tf["phases"] = packed_phases(tf, n)
            rounds.append((tf, hsl))
            print(
                f"  round {r + 1}/{args.repeats}: tfrun packed {tf['all_finished']:.0f} s, "
                f"hydra-submitit-launcher {hsl['all_finished']:.0f} s",
                file=sys.stderr,
                flush=True,
            )
        med = statistics.median
        tf_wall, hsl_wall = med([t["all_finished"] for t, _ in rounds]), med([h["all_finished"] for _, h in rounds])
        ratio = tf_wall / hsl_wall
        missed = ratio > PACKED_TARGET
        if args.breakdown == "always" or (args.breakdown == "missed" and missed):
            probe = probe_allocation(bench, slots, repeats=5)
    finally:
        bench.cancel_all()

    tf, hsl = rounds[0]
    ph = {key: med([t["phases"][key] for t, _ in rounds]) for key in rounds[0][0]["phases"]}
    hsl_queue = med([float(x["Start"]) - float(x["Submit"]) for x in hsl["rows"]])
    hsl_job = med([float(x["End"]) - float(x["Start"]) for x in hsl["rows"]])
    verdict = "met" if ratio <= PACKED_TARGET else "MISSED"
    each = f" (median of {len(rounds)} interleaved rounds)" if len(rounds) > 1 else ""
    lines = [
        f"| {n}-point trivial sweep, start to all finished{each} | tfrun, pack_size={k}, pack_slots={slots} | "
        f"hydra-submitit-launcher {HSL_VERSION} |",
        "|---|---|---|",
        f"| **all finished (last End in sacct), s from start** | **{tf_wall:.0f}** | **{hsl_wall:.0f}** |",
        f"| **ratio tfrun / hydra-submitit-launcher** (target <= {PACKED_TARGET}x) | **{ratio:.2f}x: {verdict}** | |",
        f"| Slurm jobs (sacct array elements) | {tf['counts']['jobs']} (ceil({n}/{k}) = {jobs}) | {hsl['counts']['jobs']} |",
        f"| Slurm job steps (sacct) | {tf['counts']['steps']} (one per slot) | {hsl['counts']['steps']} |",
        f"| all submitted (last `_submitted.pkl`), s from start | {med([t['submitted'] for t, _ in rounds]):.1f} | "
        f"{med([h['submitted'] for _, h in rounds]):.1f} |",
        f"| command returned, s | {med([t['returned'] for t, _ in rounds]):.1f} (`compute.wait=false`) | "
        f"{med([h['returned'] for _, h in rounds]):.1f} (blocks until done) |",
        f"| final states (allocations) | {', '.join(tf['states'])} | {', '.join(hsl['states'])} |",
        f"| points COMPLETED (own run dir, status.json) | {ph['points_completed']:.0f} / {n} | |",
        f"| all finished in each round, s | {', '.join(str(round(t['all_finished'])) for t, _ in rounds)} | "
        f"{', '.join(str(round(h['all_finished'])) for _, h in rounds)} |",
    ]
    timeline = [
        "| where the packed tfrun sweep's time goes (s from the command's start, medians) | s |",
        "|---|---|",
        f"| submission: {n} points composed, planned, run dirs written, one sbatch (last pickle renamed) | {ph['submitted']:.1f} |",
        f"| first allocation started (sacct Start, 1 s resolution) | {ph['first_start']:.0f} |",
        f"| last allocation started (sacct Start) | {ph['last_start']:.0f} |",
        f"| first point handed to a slot by its allocation's coordinator | {ph['first_point']:.1f} |",
        f"| last point settled by its coordinator | {ph['last_point_settled']:.1f} |",
        f"| last allocation ended (sacct End) | {ph['all_finished']:.0f} |",
        "",
        "| one packed point, in its allocation (median over points) | s |",
        "|---|---|",
        f"| handed to a slot to the bootstrap's rank record (the process forked ahead takes its order; plan) | {ph['step_start']:.2f} |",
        f"| the script (rank record start to end) | {ph['script']:.2f} |",
        f"| rank end to settled by the coordinator (the agent's report, status.json) | {ph['step_end']:.2f} |",
        f"| **one point, end to end** | **{ph['per_point']:.2f}** |",
        f"| points one slot runs one after another (ceil(points / allocations / slots)) | {ph['points_per_slot']:.0f} |",
        f"| one allocation's busy time (first step started to last settled) | {ph['allocation_busy']:.1f} |",
        "",
        "| hydra-submitit-launcher, per job (median) | s |",
        "|---|---|",
        f"| queued (sacct Submit to Start) | {hsl_queue:.0f} |",
        f"| running (sacct Start to End: batch script, srun, interpreter, unpickle, the app) | {hsl_job:.0f} |",
    ]
    notes: list[str] = []
    if probe:
        timeline += [
            "",
            f"| in one allocation like a pack's (1 node, {slots} tasks), median of 5 | s |",
            "|---|---|",
            f"| `srun --exact -n1 true`: an empty job step (create, launch, end) | {probe['srun_true']:.2f} |",
            f"| `python -c pass`: the interpreter | {probe['python_pass']:.2f} |",
            f'| `python -c "import tfrun.bootstrap"`: interpreter + tfrun\'s bootstrap imports | {probe["python_bootstrap"]:.2f} |',
            f'| `srun ... python -c "import tfrun.bootstrap"` | {probe["srun_python_bootstrap"]:.2f} |',
        ]
    if missed:
        budget = PACKED_TARGET * hsl_wall
        in_alloc = ph["last_point_settled"] - ph["first_point"]
        notes = [
            f"Target missed: {PACKED_TARGET}x of {hsl_wall:.0f} s is {budget:.0f} s. tfrun spent "
            f"{ph['submitted']:.0f} s submitting ({1000 * ph['submitted'] / n:.0f} ms per point, see the phase "
            f"table) and {in_alloc:.0f} s running the points in the allocations "
            f"({ph['points_per_slot']:.0f} points per slot x {ph['per_point']:.2f} s per point"
            + (
                f"; of a point's {ph['per_point']:.2f} s, an empty srun step is {probe['srun_true']:.2f} s and "
                f"the interpreter with tfrun's bootstrap imports {probe['python_bootstrap']:.2f} s, on 2 real "
                f"cores shared by all {slots * jobs} slots"
                if probe
                else ""
            )
            + ").",
        ]
    prof = tf.get("profile") or []
    command = "python bench/bench_sweep.py " + " ".join(sys.argv[1:])
    report = "\n".join(
        [
            "",
            f"## Packed sweep on the local Slurm: tfrun pack_size={k} pack_slots={slots} vs hydra-submitit-launcher "
            f"{HSL_VERSION} ({info['date']})",
            "",
            f"Command: `{command.strip()}`",
            "",
            *(f"- {key}: {v}" for key, v in info.items()),
            "",
            f"Same trivial task (print a number), same per-point Slurm request (partition {SLURM['partition']}, "
            f"{SLURM['nodes']} node, {SLURM['tasks_per_node']} task). hydra-submitit-launcher: one job per point "
            f"({SLURM['timeout_min']} min each); tfrun: `compute.pack_size={k} compute.pack_slots={slots} "
            f"compute.timeout_min={args.pack_timeout_min}`, i.e. {jobs} jobs of {SLURM['tasks_per_node'] * slots} "
            f"tasks (a whole 2-CPU debug node each) holding a pool of {slots} slot(s) each, every point a process "
            f"forked from its slot's warm interpreter. Both start to the last "
            "allocation's End in sacct; tfrun ran with `compute.wait=false` under the bench's phase timers "
            "(`tfrun.cli.main.main` with wrapped functions).",
            "",
            *lines,
            "",
            *timeline,
            "",
            *(
                [prof[0].replace("`tfrun -m` submitting", "packed `tfrun -m` submitting (round 1)"), *prof[1:], ""]
                if prof
                else []
            ),
            *notes,
            "",
        ]
    )
    figures = {
        "packed": {
            "points": n,
            "pack_size": k,
            "pack_slots": slots,
            "tfrun_wall": tf_wall,
            "hsl_wall": hsl_wall,
            "ratio": ratio,
            "target": PACKED_TARGET,
            "tfrun_jobs": tf["counts"]["jobs"],
            "tfrun_submitted": med([t["submitted"] for t, _ in rounds]),
            "hsl_submitted": med([h["submitted"] for _, h in rounds]),
            "tfrun_steps": tf["counts"]["steps"],
            "hsl_jobs": hsl["counts"]["jobs"],
            "phases": ph,
            "probe": probe,
            "rounds": len(rounds),
        }
    }
    publish(report, args.output, args.json, figures)
    if missed:
        print(f"bench: packed ratio {ratio:.2f}x misses the target {PACKED_TARGET}x", file=sys.stderr)


if __name__ == "__main__":
    main()
