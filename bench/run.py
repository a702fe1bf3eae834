"""Every benchmark with one command, and one table of ratios against their targets.

    python bench/run.py                               # full sizes (about an hour here); appends to bench/RESULTS.md
    python bench/run.py --quick                       # small sizes (minutes): checks the benchmarks themselves
    python bench/run.py --only packed,throughput,memory
    python bench/run.py --list                        # the benchmarks and the commands they run

Each benchmark is its own script (bench_core.py, bench_backends.py, bench_sweep.py,
throughput.py), run here with the flags below; each writes its detailed tables to a
scratch file and its headline figures to a JSON file under bench/.work/run-<date>/. At
the end this prints one summary table (issue 9's list and issue 10's packed sweep: ratio
against the alternative, target, met or missed) and APPENDS one section to
bench/RESULTS.md: the command, date, machine, the summary and every detailed table.
With ``--quick`` nothing is written to bench/RESULTS.md unless ``--output`` says so.

The Slurm benchmarks (sweep, packed, memory) need the local cluster
(``scripts/local-slurm start``); Horovod needs ``horovodrun``. A benchmark that fails is
reported as such and the others still run. CI does not run any of this.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from benchlib import cpu_model, load_average, versions

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PY = sys.executable

# name: (what it measures, script, full-size flags, --quick flags)
BENCHMARKS: dict[str, tuple[str, str, list[str], list[str]]] = {
    "core": ("CLI latency and local launch overhead", "bench_core.py",
             [], ["--repeats-startup", "2", "--repeats-run", "1", "--epochs", "2"]),
    "backends": ("Horovod tfrun vs horovodrun; parameter-server start-up", "bench_backends.py",
                 [], ["--repeats", "1", "--steps", "20"]),
    "sweep": ("sweep submission tfrun vs hydra-submitit-launcher, queries per poll, tfrun's memory", "bench_sweep.py",
              ["--points", "10,100,500", "--monitor-sizes", "10,100,500", "--profile-points", "50"],
              ["--points", "5,10", "--monitor-sizes", "5,10", "--profile-points", "0"]),
    "packed": ("packed sweep (issue 10) vs hydra-submitit-launcher, start to all finished", "bench_sweep.py",
               ["--packed", "--points", "200", "--pack-size", "100", "--pack-slots", "2", "--repeats", "3"],
               ["--packed", "--points", "20", "--pack-size", "10", "--pack-slots", "2"]),
    "throughput": ("training throughput under tfrun vs bare", "throughput.py",
                   ["--compare", "--repeats", "5"], ["--compare", "--repeats", "1", "--steps", "200", "--epochs", "2"]),
    "memory": ("peak RSS of the tfrun parent following a 500-job sweep (part of `sweep`)", "bench_sweep.py",
               ["--points", "", "--monitor-sizes", "100,500", "--profile-points", "0"],
               ["--points", "", "--monitor-sizes", "5,20", "--profile-points", "0"]),
}


def machine() -> dict[str, str]:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": f"{platform.node()}, {os.cpu_count()} CPU(s), {cpu_model()}; local Slurm: nodes node1, node2 "
                   "(partition debug, 2 CPUs each) and node3 (partition cpu), all on this machine",
        "software": f"Python {platform.python_version()}, "
                    + ", ".join(versions("tensorflow", "horovod", "hydra-core", "submitit")),
        "load average (1, 5, 15 min) at start": load_average(),
    }


def selected(args: argparse.Namespace) -> list[str]:
    names = [n for part in (args.only or []) for n in part.split(",") if n] or [n for n in BENCHMARKS if n != "memory"]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"run.py: unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    skip = {n for part in (args.skip or []) for n in part.split(",")}
    names = [n for n in BENCHMARKS if n in names and n not in skip]
    if "sweep" in names and "memory" in names:  # the sweep benchmark's largest monitored sweep is the memory figure
        names.remove("memory")
    return names


def command(name: str, quick: bool, out: Path) -> list[str]:
    _, script, full, small = BENCHMARKS[name]
    return [PY, str(BENCH / script), *(small if quick else full),
            "--output", str(out / f"{name}.md"), "--json", str(out / f"{name}.json")]


def shown(name: str, quick: bool) -> str:
    """The command as it reads in RESULTS.md (without the scratch --output/--json)."""
    _, script, full, small = BENCHMARKS[name]
    return " ".join(["python", f"bench/{script}", *(a if a else "''" for a in (small if quick else full))])


def run_one(name: str, argv: list[str], out: Path) -> tuple[dict[str, Any] | None, float, str]:
    """(figures, seconds, error) of one benchmark; its stdout goes to <name>.log, its progress to our stderr."""
    print(f"\n=== {name}: {' '.join(argv)}", file=sys.stderr, flush=True)
    start = time.time()
    with open(out / f"{name}.log", "w") as log:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.PIPE, text=True, bufsize=1)
        assert proc.stderr is not None
        for line in proc.stderr:  # progress to the console, everything to the log
            sys.stderr.write(line)
            log.write(line)
            log.flush()
        code = proc.wait()
    took = time.time() - start
    figures_file = out / f"{name}.json"
    if code != 0 or not figures_file.exists():
        tail = (out / f"{name}.log").read_text()[-1500:]
        print(f"=== {name} FAILED (exit {code}) after {took:.0f} s\n{tail}", file=sys.stderr, flush=True)
        return None, took, f"exit {code}"
    print(f"=== {name} done in {took:.0f} s", file=sys.stderr, flush=True)
    return json.loads(figures_file.read_text()), took, ""


# --------------------------------------------------------------------------- the summary

Row = tuple[str, str, str, str, str, str]  # issue item, measurement, tfrun, alternative, ratio / value, target + verdict


def verdict(ok: bool) -> str:
    return "met" if ok else "**MISSED**"


def core_rows(f: dict) -> list[Row]:
    s, o = f["startup"], f["overhead"]
    tf_import = s['python -c "import tensorflow"']
    ps = next(k for k in s if "backend=ps" in k)
    return [
        ("1 CLI latency", "`tfrun --dry-run`, 2-node ps job on Slurm (median s)", f"{s[ps]:.2f}",
         f"{tf_import:.2f} (`import tensorflow`)", f"{s[ps] / tf_import:.2f}x", f"< 0.5 s: {verdict(s[ps] < 0.5)}"),
        ("1 CLI latency", "`tfrun --dry-run`, default run (median s)", f"{s['tfrun --dry-run']:.2f}",
         f"{tf_import:.2f}", f"{s['tfrun --dry-run'] / tf_import:.2f}x", f"< 0.5 s: {verdict(s['tfrun --dry-run'] < 0.5)}"),
        ("1 CLI latency", "`tfrun --help` (median s)", f"{s['tfrun --help']:.2f}", f"{tf_import:.2f}",
         f"{s['tfrun --help'] / tf_import:.2f}x", "(no TensorFlow import)"),
        ("2 local launch", "digits example, tfrun compute=local vs plain python (median s)", f"{o['tfrun']:.2f}",
         f"{o['python']:.2f}", f"{o['ratio']:.3f}", f"<= 1.05: {verdict(o['ratio'] <= 1.05)}"),
        ("2 local launch", "  CPU seconds, all processes (median): ratio", "", "", f"{o['cpu_ratio']:.3f}", "(context)"),
    ]


def backends_rows(f: dict) -> list[Row]:
    rows: list[Row] = []
    if "horovod" in f:
        h = f["horovod"]
        rows += [
            ("4 Horovod", "2 ranks, wall time (median s)", f"{h['wall']['tfrun']:.2f}",
             f"{h['wall']['horovodrun']:.2f} (`horovodrun --gloo`)", f"{h['ratio']:.3f}",
             f"<= 1.02: {verdict(h['ratio'] <= 1.02)}"),
            ("4 Horovod", "launch to `hvd.init()` returned, slowest rank (median s)",
             f"{h['launch_to_init']['tfrun']:.2f}", f"{h['launch_to_init']['horovodrun']:.2f}",
             f"{h['launch_to_init']['tfrun'] / h['launch_to_init']['horovodrun']:.3f}", "(context)"),
        ]
    if "ps" in f:
        rows.append(("4 ps", "chief + 2 workers + 1 ps: launch to strategy ready (median s)",
                     f"{f['ps']['launch_to_ready']:.2f}", "", "", "(no alternative)"))
    return rows


def sweep_rows(f: dict) -> list[Row]:
    rows: list[Row] = []
    for size, x in sorted(f.get("submit", {}).items(), key=lambda kv: int(kv[0])):
        rows.append(("3 sweep submit", f"{size} points: s to all submitted", f"{x['tfrun']:.1f}",
                     f"{x['hsl']:.1f} (hydra-submitit-launcher)", f"{x['ratio']:.2f}x",
                     f"<= 1.0x: {verdict(x['ratio'] <= 1.0)}"))
    monitor = sorted(f.get("monitor", {}).items(), key=lambda kv: int(kv[0]))
    if monitor:
        per_poll = [m["queries_per_poll"] for _, m in monitor]
        constant = max(per_poll) <= 1.25 * min(per_poll) and max(per_poll) <= 2
        rows.append(("3 sweep monitor", "scheduler queries per poll, " + " / ".join(f"{s} points" for s, _ in monitor),
                     " / ".join(f"{q:.2f}" for q in per_poll), "", "", f"constant: {verdict(constant)}"))
        rows += memory_rows(f)
    return rows


def memory_rows(f: dict) -> list[Row]:
    monitor = sorted(f.get("monitor", {}).items(), key=lambda kv: int(kv[0]))
    if not monitor:
        return []
    size, m = monitor[-1]
    hsl = f.get("submit", {}).get(size, {}).get("hsl_vmhwm_mb")
    rows = [("6 memory", f"tfrun parent, {size}-job sweep with `compute.wait=true`: peak RSS (VmHWM) / "
             "largest RSS while following, MB", f"{m['vmhwm_mb']:.0f} / {m.get('following_rss_mb', float('nan')):.0f}",
             f"{hsl:.0f} (hydra-submitit-launcher app, same size)" if hsl else "",
             f"{m['vmhwm_mb'] / hsl:.2f}x" if hsl else "", "(reported; no target)")]
    if len(monitor) > 1:
        (small, a), (large, b) = monitor[0], monitor[-1]
        rows.append(("6 memory", f"  growth of the peak with the sweep size ({small} to {large} jobs), MB per job",
                     f"{(b['vmhwm_mb'] - a['vmhwm_mb']) / (int(large) - int(small)):.3f}", "", "", "(context)"))
    return rows


def packed_rows(f: dict) -> list[Row]:
    p = f["packed"]
    return [
        ("10 packed sweep", f"{p['points']} trivial points, start to all finished (s), pack_size={p['pack_size']} "
         f"pack_slots={p['pack_slots']}", f"{p['tfrun_wall']:.0f}", f"{p['hsl_wall']:.0f} (hydra-submitit-launcher)",
         f"{p['ratio']:.2f}x", f"<= {p['target']}x: {verdict(p['ratio'] <= p['target'])}"),
        ("10 packed sweep", "Slurm jobs (sacct)", str(p["tfrun_jobs"]), str(p["hsl_jobs"]),
         f"{p['tfrun_jobs'] / p['hsl_jobs']:.3f}", f"ceil(N/K) = {-(-p['points'] // p['pack_size'])}: "
         f"{verdict(p['tfrun_jobs'] == -(-p['points'] // p['pack_size']))}"),
        ("10 packed sweep", "  of tfrun's time: submitting / one point in its allocation (s)",
         f"{p['phases']['submitted']:.1f} / {p['phases']['per_point']:.2f}", "", "", "(where the time goes)"),
    ]


def throughput_rows(f: dict) -> list[Row]:
    t = f["throughput"]
    names = {"loop": "`tf.function` step loop", "fit": "`model.fit` (with tfrun's per-epoch callbacks)"}
    return [("5 throughput", f"{names[m]}: samples/s (median)", f"{t[m]['tfrun']:.0f}", f"{t[m]['bare']:.0f} (bare)",
             f"{t[m]['ratio']:.3f}", f">= 0.99: {verdict(t[m]['ratio'] >= 0.99)}") for m in ("loop", "fit") if m in t]


ROWS: dict[str, Callable[[dict], list[Row]]] = {
    "core": core_rows, "backends": backends_rows, "sweep": sweep_rows, "packed": packed_rows,
    "throughput": throughput_rows, "memory": memory_rows,
}


def summary(results: dict[str, tuple[dict | None, float, str]]) -> list[str]:
    rows: list[Row] = []
    for name, (figures, took, error) in results.items():
        if figures is None:
            rows.append((name, f"FAILED ({error}, after {took:.0f} s): see its log", "", "", "", ""))
            continue
        try:
            rows += ROWS[name](figures)
        except (KeyError, ZeroDivisionError, StopIteration) as exc:
            rows.append((name, f"figures incomplete ({type(exc).__name__}: {exc})", "", "", "", ""))

    def item(row: Row) -> int:  # in the order of issue 9's list, then issue 10
        first = row[0].split()[0]
        return int(first) if first.isdigit() else 99

    lines = ["| issue item | measurement | tfrun | alternative | ratio / value | target |", "|---|---|---|---|---|---|"]
    return lines + ["| " + " | ".join(row) + " |" for row in sorted(rows, key=item)]


def demoted(report: str) -> str:
    """A benchmark's own report as a sub-section: '#' headings one level down, no file title."""
    out = []
    for line in report.splitlines():
        if line.startswith("# ") and not line.startswith("## "):
            continue
        line = re.sub(r" --output [^\s`]+ --json [^\s`]+", "", line)  # run.py's scratch files
        out.append("#" + line if line.startswith("#") else line)
    return "\n".join(out).strip("\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions (checks the benchmarks)")
    parser.add_argument("--only", action="append", help=f"comma-separated, from: {', '.join(BENCHMARKS)}")
    parser.add_argument("--skip", action="append", help="comma-separated benchmarks to leave out")
    parser.add_argument("--output", default=None, help="where the section is appended (default bench/RESULTS.md; "
                        "with --quick: bench/.work/run-<date>/RESULTS.md); '-' writes nothing")
    parser.add_argument("--list", action="store_true", help="print the benchmarks and their commands, run nothing")
    args = parser.parse_args()

    names = selected(args)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = BENCH / ".work" / f"run-{stamp}{'-quick' if args.quick else ''}"
    if args.list:
        for name in names:
            print(f"{name}: {BENCHMARKS[name][0]}\n    {shown(name, args.quick)}")
        return
    out.mkdir(parents=True)
    output = args.output or (str(out / "RESULTS.md") if args.quick else str(BENCH / "RESULTS.md"))
    info = machine()
    results: dict[str, tuple[dict | None, float, str]] = {}
    for name in names:
        results[name] = run_one(name, command(name, args.quick, out), out)
    info["load average (1, 5, 15 min) at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())

    table = summary(results)
    invocation = "python bench/run.py " + " ".join(sys.argv[1:])
    details = []
    for name in names:
        md = out / f"{name}.md"
        if md.exists():
            details += ["", demoted(md.read_text())]
    section = "\n".join([
        "", f"## All benchmarks: `bench/run.py`{' --quick' if args.quick else ''} ({info['date']})", "",
        f"Command: `{invocation.strip()}`", "",
        *(f"- {k}: {v}" for k, v in info.items()),
        *(f"- {name}: `{shown(name, args.quick)}` ({results[name][1]:.0f} s)" for name in names), "",
        *table, "", *details, "",
    ])
    print("\n".join(["", *table, ""]))
    if output != "-":
        target = Path(output)
        lead = "\n" if target.is_file() and target.read_text().strip() else ""
        with open(target, "a") as f:
            f.write(lead + section.lstrip("\n") + "\n")
        print(f"appended to {output}; per-benchmark logs and figures in {out}", file=sys.stderr)
    if any(figures is None for figures, _, _ in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
