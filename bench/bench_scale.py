"""Planning at scale: ``tfrun --dry-run -m`` of sweeps of growing size (issue 21).

Each size N is a grid sweep on Slurm (``compute=slurm trainer.seed=range(0,N)``), planned
whole (every point's config composed, its command, environment and sbatch text built) and
printed, as ``tfrun --dry-run -m`` does. Measured per size, from outside: wall time and the
process's peak RSS (``wait4``'s ``ru_maxrss``). The cost per point is the time above a
1-point sweep's (the fixed cost: interpreter, imports, composing once), divided by N - 1;
it must stay flat as the sweep grows. Target (issue 21): 10,000 points in <= 30 s and
<= 1 GB peak.

    python bench/bench_scale.py [--sizes 100,1000,10000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import load_average, publish

TARGET_S, TARGET_MB, FLAT = 30.0, 1024.0, 1.5


def dry_run(n: int, work: Path, env: dict[str, str]) -> dict[str, float]:
    """One ``tfrun --dry-run -m`` of an n-point sweep: wall seconds, peak RSS (MB), output lines."""
    argv = ["tfrun", "--dry-run", "-m", "compute=slurm", f"trainer.seed=range(0,{n})"]
    start = time.perf_counter()
    with open(work / f"dry-{n}.out", "w") as out:
        proc = subprocess.Popen(argv, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"bench: {' '.join(argv)} failed ({code}):\n{(work / f'dry-{n}.out').read_text()[-2000:]}")
    return {"seconds": wall, "peak_mb": usage.ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds (medians)")
    parser.add_argument("--output", default="-", help="also write the report here (bench/run.py does)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    work = Path(tempfile.mkdtemp(prefix="tfrun-bench-scale-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TFRUN_", "SLURM_"))}
    env.update(TFRUN_RUNS_DIR=str(work / "runs"))
    start_load = load_average()
    found: dict[int, list[dict[str, float]]] = {n: [] for n in [1, *sizes]}
    for r in range(args.repeats):
        for n in list(found) if r % 2 == 0 else list(reversed(found)):
            found[n].append(dry_run(n, work, env))
            print(
                f"  round {r + 1}/{args.repeats}: {n} points {found[n][-1]['seconds']:.1f} s, "
                f"{found[n][-1]['peak_mb']:.0f} MB",
                file=sys.stderr,
                flush=True,
            )
    med = statistics.median
    figures: dict = {"sizes": {}, "fixed_s": med(x["seconds"] for x in found[1])}
    rows = []
    for n in sizes:
        secs, mb = med(x["seconds"] for x in found[n]), med(x["peak_mb"] for x in found[n])
        per_ms = 1000 * (secs - figures["fixed_s"]) / (n - 1)
        figures["sizes"][str(n)] = {"seconds": secs, "peak_mb": mb, "per_point_ms": per_ms, "rounds": found[n]}
        verdict = ""
        if n >= 10_000:
            verdict = "met" if secs <= TARGET_S and mb <= TARGET_MB else "**MISSED**"
        rows.append(f"| {n:,} | {secs:.1f} | {mb:.0f} | {per_ms:.2f} | {verdict} |")
    # Flat: the largest sweep's cost per point against the next size's (a 100-point sweep's is
    # within the noise of the fixed cost, so it is reported, not compared).
    figures["growth_from"] = str(sizes[-2] if len(sizes) > 2 else sizes[0])
    figures["per_point_growth"] = (
        (figures["sizes"][str(sizes[-1])]["per_point_ms"] / figures["sizes"][figures["growth_from"]]["per_point_ms"])
        if len(sizes) > 1
        else 1.0
    )
    report = "\n".join(
        [
            f"## Planning at scale: `tfrun --dry-run -m` ({time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())})",
            "",
            f"- `tfrun --dry-run -m compute=slurm trainer.seed=range(0,N)`, timed from outside, peak RSS from "
            f"`wait4`; median of {args.repeats} interleaved round(s); load average at start {start_load}, at end "
            f"{load_average()}",
            f"- fixed cost (a 1-point sweep): {figures['fixed_s']:.2f} s; cost per point = (time - fixed) / (N - 1)",
            "",
            f"| points | s | peak MB | ms per point | target: 10,000 in <= {TARGET_S:.0f} s and <= {TARGET_MB:.0f} MB |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"- cost per point from {int(figures['growth_from']):,} to {sizes[-1]:,} points: {figures['per_point_growth']:.2f}x "
            f"(target: flat, <= {FLAT}x)",
            "",
        ]
    )
    publish(report, args.output, args.json, {"scale": figures})


if __name__ == "__main__":
    main()
