"""Core benchmark: what tfrun costs on top of the user's script.

1. Start-up: median wall time of ``tfrun --dry-run`` (the default run, and a 2-node
   parameter-server job on Slurm: ``backend=ps compute=slurm compute.nodes=2
   compute.tasks_per_node=2``) and ``tfrun --help`` against ``python -c "import
   tensorflow"`` (what any TensorFlow script pays anyway).
2. Overhead: ``tfrun compute=local backend=none`` running the digits example against
   ``python examples/digits/train.py`` with the same flags; runs are interleaved so that
   machine noise hits both, and the tfrun runs are split into phases from the run dir's
   own timestamps (status.json, ranks/0.json).

    python bench/bench_core.py [--repeats-startup 7] [--repeats-run 11] [--epochs 15]

Prints a markdown table and writes it, with the command, date and machine, to
bench/RESULTS.md (``--output``; ``--output -`` writes nothing; ``--json PATH`` also
writes the headline figures, for bench/run.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import cpu_model, load_average, publish, versions

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "examples" / "digits" / "train.py"
DRY_RUN_PS = "tfrun --dry-run backend=ps compute=slurm compute.nodes=2 compute.tasks_per_node=2"
TARGETS = {"tfrun --dry-run": 0.5, DRY_RUN_PS: 0.5, "tfrun --help": 0.5, "overhead ratio": 1.05}
# The least a Hydra app pays: one with a single @hydra.main function and no config, as a user
# would write it. tfrun's --dry-run and --help are held to 1.2x its run and --help, measured
# in the same interleaved run.
BARE_APP = """\
import hydra
from omegaconf import DictConfig


@hydra.main(version_base=None, config_path=None, config_name=None)
def main(cfg: DictConfig) -> None:
    pass


if __name__ == "__main__":
    main()
"""
BARE_RATIO = 1.2
SECTION = "## tfrun core benchmark"


def tfrun_command() -> list[str]:
    """The console script beside this interpreter, else ``python -m tfrun.cli``."""
    script = Path(sys.executable).with_name("tfrun")
    if script.is_file():
        return [str(script)]
    found = shutil.which("tfrun")
    return [found] if found else [sys.executable, "-m", "tfrun.cli"]


def cpu_of_children() -> float:
    """User + system CPU seconds of every waited-for descendant so far (ranks included)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


CPU: dict[str, list[float]] = {}  # CPU seconds by command name: less sensitive to a busy machine


def timed(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, subprocess.CompletedProcess[str]]:
    """(wall time, epoch time at start, result) of one command, which must succeed."""
    cpu = cpu_of_children()
    wall_start, start = time.time(), time.perf_counter()
    result = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    took = time.perf_counter() - start
    CPU.setdefault(" ".join(argv), []).append(cpu_of_children() - cpu)
    if result.returncode != 0:
        raise SystemExit(f"benchmark command failed ({result.returncode}): {argv}\n{result.stderr[-2000:]}")
    return took, wall_start, result


def interleaved(
    commands: dict[str, list[str]], repeats: int, cwd: Path, env: dict[str, str], after: dict | None = None
) -> dict[str, list[float]]:
    """Run each command ``repeats`` times, round-robin; wall times by name."""
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, argv in commands.items():
            took, wall_start, result = timed(argv, cwd, env)
            times[name].append(took)
            if after and name in after:
                after[name](result, took, wall_start)
    return times


def phases_of(stderr: str, took: float, wall_start: float, phases: list[dict[str, float]]) -> None:
    """Split one tfrun run by the timestamps it recorded in its run dir."""
    match = re.search(r"^tfrun: run dir (.+)$", stderr, re.M)
    if not match:
        return
    run_dir = Path(match.group(1))
    status = json.loads((run_dir / "status.json").read_text())
    rank = json.loads((run_dir / "ranks" / "0.json").read_text())
    phases.append(
        {
            "cli": status["started"] - wall_start,  # interpreter, imports, compose, plan, run dir
            "spawn": rank["started"] - status["started"],  # Popen + python + bootstrap imports
            "script": rank["ended"] - rank["started"],  # prepare + the user's script
            "wind_down": status["ended"] - rank["ended"],  # process exit, pumps, status.json
            "exit": wall_start + took - status["ended"],  # report, interpreter exit
            "total": took,
        }
    )


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    return {
        "date": subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip(),
        "nproc": str(os.cpu_count()),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "tensorflow": versions("tensorflow")[0].split(" ", 1)[1],
        "load average (1, 5, 15 min) at start": load_average(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats-startup", type=int, default=7)
    # 11 interleaved runs each: run-to-run noise here is several %, the target 5 %.
    parser.add_argument("--repeats-run", type=int, default=11)
    parser.add_argument("--epochs", type=int, default=15, help="digits example epochs (its default: 15)")
    parser.add_argument("--output", default="-", help="also write the report here (bench/run.py does)")
    parser.add_argument("--json", default=None, help="also write the headline figures here (for bench/run.py)")
    args = parser.parse_args()

    info = machine()
    work = Path(tempfile.mkdtemp(prefix="tfrun-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TFRUN_", "SLURM_"))}
    env.update(TFRUN_RUNS_DIR=str(work / "runs"), TF_CPP_MIN_LOG_LEVEL="2")
    tfrun = tfrun_command()

    (work / "hello.py").write_text("print('hello')\n")
    (work / "bare_app.py").write_text(BARE_APP)
    startup = interleaved(
        {
            "bare @hydra.main app": [sys.executable, "bare_app.py"],
            "bare @hydra.main app --help": [sys.executable, "bare_app.py", "--help"],
            "tfrun --dry-run": [*tfrun, "--dry-run"],
            DRY_RUN_PS: [*tfrun, *DRY_RUN_PS.split()[1:]],
            "tfrun --help": [*tfrun, "--help"],
            'python -c "import tensorflow"': [sys.executable, "-c", "import tensorflow"],
            'python -c "pass"': [sys.executable, "-c", "pass"],
            # tfrun's fixed cost of a whole run: a script that does nothing, with and without tfrun.
            "tfrun entry.script=hello.py": [*tfrun, "entry.script=hello.py"],
            "python hello.py": [sys.executable, "hello.py"],
        },
        args.repeats_startup,
        work,
        env,
    )

    flags = ["--epochs", str(args.epochs)]
    phases: list[dict[str, float]] = []
    run_commands = {
        "python train.py": [sys.executable, str(DIGITS), *flags, "--output_dir", str(work / "plain-out")],
        "tfrun": [*tfrun, "compute=local", "backend=none", f"trainer.epochs={args.epochs}"],
    }
    runs = interleaved(
        run_commands, args.repeats_run, work, env, after={"tfrun": lambda r, t, w: phases_of(r.stderr, t, w, phases)}
    )

    plain, wrapped = median(runs["python train.py"]), median(runs["tfrun"])
    ratio = wrapped / plain
    dry = max(median(startup["tfrun --dry-run"]), median(startup[DRY_RUN_PS]))
    lines = [
        "| measurement | median (s) | min (s) | max (s) | runs | target |",
        "|---|---|---|---|---|---|",
    ]
    for name, xs in startup.items():
        target = f"< {TARGETS[name]} s: {'met' if median(xs) < TARGETS[name] else 'MISSED'}" if name in TARGETS else ""
        lines.append(f"| `{name}` | {median(xs):.3f} | {min(xs):.3f} | {max(xs):.3f} | {len(xs)} | {target} |")
    for ours, bare in (("tfrun --dry-run", "bare @hydra.main app"), ("tfrun --help", "bare @hydra.main app --help")):
        ratio_bare = median(startup[ours]) / median(startup[bare])
        verdict_bare = "met" if ratio_bare <= BARE_RATIO else "MISSED"
        lines.append(f"| `{ours}` / `{bare}` (medians) | {ratio_bare:.2f}x | | | | <= {BARE_RATIO}x: {verdict_bare} |")
    for name, xs in runs.items():
        lines.append(
            f"| `{name}` (digits, {args.epochs} epochs) | {median(xs):.3f} | {min(xs):.3f} | "
            f"{max(xs):.3f} | {len(xs)} | |"
        )
    verdict = "met" if ratio <= TARGETS["overhead ratio"] else "MISSED"
    lines.append(f"| overhead ratio tfrun / python (medians) | {ratio:.3f} | | | | <= 1.05: {verdict} |")
    lines.append(f"| overhead tfrun - python (medians) | {wrapped - plain:.3f} | | | | |")
    fastest = min(runs["tfrun"]) / min(runs["python train.py"])
    lines.append(f"| overhead ratio of the fastest runs (less sensitive to load) | {fastest:.3f} | | | | |")
    cpu_plain, cpu_wrapped = (median(CPU[" ".join(run_commands[name])]) for name in ("python train.py", "tfrun"))
    lines.append(
        f"| CPU seconds (user+sys, all processes) python / tfrun (medians) | {cpu_plain:.2f} / "
        f"{cpu_wrapped:.2f} = ratio {cpu_wrapped / cpu_plain:.3f} | | | | |"
    )
    table = "\n".join(lines)

    phase_lines = []
    if phases:
        names = {
            "cli": "CLI start to status RUNNING (interpreter, imports, compose, plan, run dir)",
            "spawn": "status RUNNING to rank record (Popen, interpreter, bootstrap imports)",
            "script": "rank record start to end (env, chdir, the script)",
            "wind_down": "rank end to status COMPLETED (process exit, log pumps)",
            "exit": "status COMPLETED to tfrun exit (report, interpreter exit)",
            "total": "total",
        }
        phase_lines = ["| phase of a `tfrun` run | median (s) |", "|---|---|"]
        phase_lines += [f"| {label} | {median([p[key] for p in phases]):.3f} |" for key, label in names.items()]
    info["load average (1, 5, 15 min) at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    command = "python bench/bench_core.py " + " ".join(sys.argv[1:])
    report = "\n".join(
        [
            SECTION,
            "",
            f"Command: `{command.strip()}`",
            "",
            *(f"- {k}: {v}" for k, v in info.items()),
            "",
            table,
            "",
            *phase_lines,
            "",
        ]
    )
    shutil.rmtree(work, ignore_errors=True)
    publish(
        report,
        args.output,
        args.json,
        {
            "startup": {name: median(xs) for name, xs in startup.items()},
            "overhead": {
                "python": plain,
                "tfrun": wrapped,
                "ratio": ratio,
                "fastest_ratio": fastest,
                "cpu_ratio": cpu_wrapped / cpu_plain,
            },
        },
    )
    if dry >= TARGETS["tfrun --dry-run"] or ratio > TARGETS["overhead ratio"]:
        print("a target was missed", file=sys.stderr)


if __name__ == "__main__":
    main()
