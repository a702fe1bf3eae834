"""Backend benchmark: what tfrun's Horovod and parameter-server start-up cost.

1. Horovod: one 2-rank Horovod script (a short DistributedGradientTape loop on the
   digits data) launched by ``tfrun compute=local backend=horovod`` and by
   ``horovodrun -np 2 --gloo -H localhost:2 python script.py``, interleaved. Per run: wall
   time, CPU time of every process, and, from timestamps the script prints
   (``time.time()`` at the top of its body and after ``hvd.init()``) and the run dir
   records (status.json, ranks/<r>.json ``started``), where the time went.
2. Horovod across two nodes of the local Slurm cluster (``--nodes``; each node a host of
   its own, ``scripts/local-slurm``): ``tfrun compute=slurm compute.nodes=2 backend=horovod``
   vs what a Slurm user runs without tfrun: an allocation of the same two nodes
   (``salloc -N2``) whose first node runs ``horovodrun -np 2 --gloo -H node1:1,node2:1``,
   which starts the ranks over ssh (every node of the local cluster runs an sshd).
   Both pay Slurm's allocation; tfrun also its batch job and its poll for the end.
3. Parameter servers: ``tfrun backend=ps`` with a chief + 2 workers + 1 ps; time from
   the launch and from the chief task's start to the chief's strategy being created
   (the cluster is up).

    python bench/bench_backends.py [--repeats 5] [--steps 100] [--nodes] [--output bench/RESULTS.md]

Prints markdown tables and APPENDS them, with the command, date and machine, to
bench/RESULTS.md (``--output -`` writes nothing; ``--json PATH`` also writes the
headline figures, for bench/run.py).
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
from typing import Any, Callable

from benchlib import cpu_model, load_average, publish, versions

REPO = Path(__file__).resolve().parents[1]
TARGET_RATIO = 1.02
SLURM_STATE = Path(os.environ.get("TFRUN_SLURM_DIR", "/var/lib/tfrun-slurm"))
SSH_KEY = SLURM_STATE / "ssh" / "id_ed25519"  # root's key to every node's sshd (scripts/local-slurm)
NODES = ("node1", "node2")

HOROVOD_SCRIPT = """\
import time
T_START = time.time()
import argparse, json, socket
import numpy as np
import tensorflow as tf
import horovod.tensorflow as hvd
from sklearn.datasets import load_digits

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=100)
args = parser.parse_args()
T_IMPORTED = time.time()
hvd.init()
T_INIT = time.time()

digits = load_digits()
x = (digits.data / 16.0).astype("float32")[hvd.rank()::hvd.size()]
y = digits.target[hvd.rank()::hvd.size()]
data = iter(tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=0).batch(32).repeat())
tf.random.set_seed(0)
w = tf.Variable(tf.random.normal([64, 10], stddev=0.1))
b = tf.Variable(tf.zeros([10]))
opt = tf.optimizers.SGD(0.1)


@tf.function
def step(xb, yb):
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=yb, logits=xb @ w + b))
    tape = hvd.DistributedGradientTape(tape)
    opt.apply_gradients(zip(tape.gradient(loss, [w, b]), [w, b]))
    return hvd.allreduce(loss)


hvd.broadcast_variables([w, b], root_rank=0)
WARMUP = min(10, args.steps // 2)  # the first steps trace the function and warm Gloo's buffers
losses = [float(step(*next(data))) for _ in range(WARMUP)]
T_WARM = time.time()
losses += [float(step(*next(data))) for _ in range(args.steps - WARMUP)]
T_END = time.time()
print("BENCH " + json.dumps({"rank": hvd.rank(), "size": hvd.size(), "host": socket.gethostname(), "start": T_START, "imported": T_IMPORTED,
                              "init": T_INIT, "end": T_END, "loss": [losses[0], losses[-1]],
                              "step_ms": 1000 * (T_END - T_WARM) / max(1, args.steps - WARMUP)}), flush=True)
"""

PS_SCRIPT = """\
import time
T_START = time.time()
import json
import tensorflow as tf

resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
T_IMPORTED = time.time()
strategy = tf.distribute.ParameterServerStrategy(resolver)
T_READY = time.time()
print("BENCH " + json.dumps({"start": T_START, "imported": T_IMPORTED, "ready": T_READY}), flush=True)
"""


def tfrun_command() -> list[str]:
    """The console script beside this interpreter, else ``python -m tfrun.cli``."""
    script = Path(sys.executable).with_name("tfrun")
    if script.is_file():
        return [str(script)]
    found = shutil.which("tfrun")
    return [found] if found else [sys.executable, "-m", "tfrun.cli"]


def horovodrun_command() -> list[str]:
    """horovodrun, installed beside this interpreter by Horovod's build (pyenv may need a rehash)."""
    script = Path(sys.executable).with_name("horovodrun")
    if script.is_file():
        return [str(script)]
    if not shutil.which("horovodrun") and shutil.which("pyenv"):
        subprocess.run(["pyenv", "rehash"], check=False)
    found = shutil.which("horovodrun")
    if not found:
        raise SystemExit("horovodrun not found: build Horovod first (scripts/build-horovod)")
    return [found]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(argv: list[str], cwd: Path, env: dict[str, str]) -> dict[str, Any]:
    """One command, which must succeed: wall time, launch time, CPU seconds, output."""
    cpu = children_cpu()
    launch, start = time.time(), time.perf_counter()
    result = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(
            f"benchmark command failed ({result.returncode}): {argv}\n{result.stderr[-3000:]}\n{result.stdout[-3000:]}"
        )
    return {
        "wall": wall,
        "launch": launch,
        "cpu": children_cpu() - cpu,
        "stdout": result.stdout,
        "stderr": result.stderr,
    }


def bench_lines(stdout: str) -> list[dict[str, Any]]:
    """The BENCH records the ranks printed (tfrun prefixes ``[rankN] ``, horovodrun ``[N]<stdout>:``)."""
    return [json.loads(m.group(1)) for m in re.finditer(r"BENCH (\{.*\})", stdout)]


def run_dir_of(stderr: str) -> Path:
    match = re.search(r"^tfrun: run dir (.+)$", stderr, re.M)
    if not match:
        raise SystemExit(f"tfrun did not say where the run went:\n{stderr[-2000:]}")
    return Path(match.group(1))


def read(path: Path) -> Any:
    return json.loads(path.read_text())


def common_phases(r: dict[str, Any], ranks: list[dict[str, Any]]) -> dict[str, float]:
    """Phases both launchers share, from the script's own timestamps (slowest rank)."""
    if len(ranks) != 2 or any(x["size"] != 2 for x in ranks):
        raise SystemExit(f"expected 2 ranks in one Horovod group, got {ranks}")
    end_of_command = r["launch"] + r["wall"]
    return {
        "wall": r["wall"],
        "cpu": r["cpu"],
        "launch_to_init": max(x["init"] for x in ranks) - r["launch"],
        "launch_to_script": max(x["start"] for x in ranks) - r["launch"],
        "script_to_init": max(x["init"] - x["start"] for x in ranks),
        "init_to_end": max(x["end"] for x in ranks) - max(x["init"] for x in ranks),
        "end_to_exit": end_of_command - max(x["end"] for x in ranks),
        "step_ms": max(x["step_ms"] for x in ranks),  # steady state: after the warm-up steps
    }


def rank_records(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The BENCH records from the command's output, else from a tfrun run's rank logs (on Slurm
    tfrun shows rank 0's output only)."""
    shown = bench_lines(r["stdout"])
    if len(shown) > 1:
        return shown
    logs = sorted((run_dir_of(r["stderr"]) / "logs").glob("rank*.log"))
    return bench_lines("\n".join(p.read_text() for p in logs))


def tfrun_phases(r: dict[str, Any]) -> dict[str, float]:
    run_dir = run_dir_of(r["stderr"])
    ranks = rank_records(r)
    phases = common_phases(r, ranks)
    status = read(run_dir / "status.json")
    started = [read(run_dir / "ranks" / f"{x}.json")["started"] for x in (0, 1)]
    phases.update(
        {
            "cli": status["started"] - r["launch"],  # interpreter, compose, plan, run dir
            "spawn": max(started) - status["started"],  # Popen, interpreter, bootstrap imports
            "prepare": max(x["start"] for x in ranks) - max(started),  # rendezvous, TF import, hvd.init, size check
            "wind_down": status["ended"] - max(x["end"] for x in ranks),  # interpreter exit, log pumps
            "report": r["launch"] + r["wall"] - status["ended"],
        }
    )
    return phases


def horovodrun_phases(r: dict[str, Any]) -> dict[str, float]:
    ranks = bench_lines(r["stdout"])
    phases = common_phases(r, ranks)
    phases["import"] = max(x["imported"] - x["start"] for x in ranks)
    return phases


def ps_phases(r: dict[str, Any]) -> dict[str, float]:
    (chief,) = bench_lines(r["stdout"])
    run_dir = run_dir_of(r["stderr"])
    started = [rec["started"] for rec in map(read, (run_dir / "ranks").glob("*.json"))]
    chief_started = read(run_dir / "ranks" / "0.json")["started"]
    return {
        "wall": r["wall"],
        "launch_to_ready": chief["ready"] - r["launch"],
        "chief_task_to_ready": chief["ready"] - chief_started,
        "last_task_to_ready": chief["ready"] - max(started),
        "chief_task_to_script": chief["start"] - chief_started,
        "import": chief["imported"] - chief["start"],
        "strategy": chief["ready"] - chief["imported"],
    }


def interleave(
    commands: dict[str, tuple[list[str], Callable[[dict[str, Any]], dict[str, float]]]],
    repeats: int,
    cwd: Path,
    env: dict[str, str],
) -> dict[str, list[dict[str, float]]]:
    """Every command once per round; the order flips each round so neither always goes first."""
    out: dict[str, list[dict[str, float]]] = {name: [] for name in commands}
    names = list(commands)
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else names[::-1]:
            argv, phases = commands[name]
            out[name].append(phases(run(argv, cwd, env)))
            print(f"  round {round_ + 1}/{repeats} {name}: {out[name][-1]['wall']:.2f} s", file=sys.stderr, flush=True)
    return out


def nodes_ready() -> None:
    """The local cluster is up, with an sshd on every node (``horovodrun`` starts ranks over ssh)."""
    status = subprocess.run([str(REPO / "scripts" / "local-slurm"), "status"], capture_output=True, text=True)
    if status.returncode != 0 or not SSH_KEY.is_file():
        raise SystemExit(
            "bench: --nodes needs the local Slurm cluster with its sshd: scripts/local-slurm start\n"
            + status.stdout[-2000:]
        )


def on_two_nodes(phases: Callable[[dict[str, Any]], dict[str, float]]) -> Callable[[dict[str, Any]], dict[str, float]]:
    """The run's phases, once its ranks are seen on the two nodes (not both on one)."""

    def checked(r: dict[str, Any]) -> dict[str, float]:
        hosts = sorted(x["host"] for x in rank_records(r))
        if hosts != list(NODES):
            raise SystemExit(f"expected one rank on each of {NODES}, got {hosts}")
        return phases(r)

    return checked


def two_node_commands(steps: int) -> dict[str, tuple[list[str], Callable[[dict[str, Any]], dict[str, float]]]]:
    """tfrun's Slurm launch vs an allocation of the same nodes whose first node runs horovodrun."""
    hosts = ",".join(f"{n}:1" for n in NODES)
    horovodrun = [
        *horovodrun_command(),
        "-np",
        "2",
        "--gloo",
        "-H",
        hosts,
        "--ssh-identity-file",
        str(SSH_KEY),
        sys.executable,
        "hvd_bench.py",
        "--steps",
        str(steps),
    ]
    return {
        "tfrun": (
            [
                *tfrun_command(),
                "compute=slurm",
                "compute.partition=debug",
                "compute.nodes=2",
                "compute.tasks_per_node=1",
                "compute.poll_s=0.5",
                "backend=horovod",
                "entry.script=hvd_bench.py",
                f"trainer.steps={steps}",
            ],
            on_two_nodes(tfrun_phases),
        ),
        # salloc runs its command here; srun puts horovodrun on the allocation's first node, as a
        # batch script would run it, and relays its output.
        "horovodrun": (
            [
                "salloc",
                "-Q",
                "-p",
                "debug",
                "-N2",
                "--ntasks-per-node=1",
                f"--nodelist={','.join(NODES)}",
                "srun",
                "-N1",
                "-n1",
                f"--nodelist={NODES[0]}",
                "--overlap",
                *horovodrun,
            ],
            on_two_nodes(horovodrun_phases),
        ),
    }


def med(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def machine() -> dict[str, str]:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": f"{platform.node()}, {os.cpu_count()} CPU(s), {cpu_model()}",
        "software": f"Python {platform.python_version()}, " + ", ".join(versions("tensorflow", "horovod")),
        "load average (1, 5, 15 min) at start": load_average(),
    }


def horovod_tables(
    hvd: dict[str, list[dict[str, float]]], where: str = "", phases: bool = True
) -> tuple[list[str], float]:
    t, h = hvd["tfrun"], hvd["horovodrun"]
    ratio = med(t, "wall") / med(h, "wall")
    verdict = "met" if ratio <= TARGET_RATIO else "MISSED"
    rows = [
        ("wall time (s)", "wall"),
        ("CPU time, all processes (s)", "cpu"),
        ("launch to hvd.init() returned, slowest rank (s)", "launch_to_init"),
        ("launch to script body start (s)", "launch_to_script"),
        ("script body start to hvd.init() returned (s)", "script_to_init"),
        ("hvd.init() to end of training (s)", "init_to_end"),
        ("steady-state step, after 10 warm-up steps, slowest rank (ms)", "step_ms"),
        ("end of training to command exit (s)", "end_to_exit"),
    ]
    if not phases:  # the ranks ran under slurmd: this machine's children are only the launchers
        rows = [row for row in rows if row[1] != "cpu"]
    lines = [
        f"| Horovod, 2 ranks{where} (median of {len(t)}) | tfrun | horovodrun | tfrun / horovodrun |",
        "|---|---|---|---|",
    ]
    for label, key in rows:
        a, b = med(t, key), med(h, key)
        lines.append(
            f"| {label} | {a:.2f} | {b:.2f} | {a / b:.3f} |" if b > 0.005 else f"| {label} | {a:.2f} | {b:.2f} | |"
        )
    lines.append(f"| **wall time ratio** (target <= {TARGET_RATIO}) | | | **{ratio:.3f}: {verdict}** |")
    step = med(t, "step_ms") / med(h, "step_ms")
    lines.append(
        f"| **steady-state step ratio** (target <= {TARGET_RATIO}) | | | "
        f"**{step:.3f}: {'met' if step <= TARGET_RATIO else 'MISSED'}** |"
    )
    fastest = min(r["wall"] for r in t) / min(r["wall"] for r in h)
    lines.append(f"| wall time ratio of the fastest runs (less sensitive to load) | | | {fastest:.3f} |")

    def rounds(runs: list[dict[str, float]]) -> str:
        return ", ".join(f"{r['wall']:.2f}" for r in runs) + "; " + ", ".join(f"{r['step_ms']:.1f}" for r in runs)

    lines += [
        "",
        "Every round, in the order run (wall s; step ms):",
        "",
        f"- tfrun: {rounds(t)}",
        f"- horovodrun: {rounds(h)}",
    ]
    if not phases:
        return lines, ratio
    lines += ["", "| where a `tfrun` Horovod run's time goes (median) | s |", "|---|---|"]
    for label, key in [
        ("CLI: interpreter, compose, plan, run dir (launch to status RUNNING)", "cli"),
        ("spawn: Popen, interpreter, bootstrap imports (to the last rank's record)", "spawn"),
        ("prepare: rendezvous, TensorFlow + Horovod import, hvd.init() and size check (to script start)", "prepare"),
        ("script start to hvd.init() returned (already initialised by the bootstrap)", "script_to_init"),
        ("training (hvd.init() to end)", "init_to_end"),
        ("wind-down: interpreter exit and log pumps (end of training to status COMPLETED)", "wind_down"),
        ("report and tfrun exit", "report"),
    ]:
        lines.append(f"| {label} | {med(t, key):.2f} |")
    lines += ["", "| where a `horovodrun` run's time goes (median) | s |", "|---|---|"]
    for label, key in [
        ("horovodrun start-up and spawn (launch to script body start)", "launch_to_script"),
        ("script: TensorFlow + Horovod import", "import"),
        ("script start to hvd.init() returned (import + init)", "script_to_init"),
        ("training (hvd.init() to end)", "init_to_end"),
        ("end of training to horovodrun exit", "end_to_exit"),
    ]:
        lines.append(f"| {label} | {med(h, key):.2f} |")
    return lines, ratio


def ps_table(ps: list[dict[str, float]]) -> list[str]:
    lines = [
        f"| tfrun backend=ps, chief + 2 workers + 1 ps (median of {len(ps)}) | s | min | max |",
        "|---|---|---|---|",
    ]
    for label, key in [
        ("wall time", "wall"),
        ("launch to the chief's ParameterServerStrategy created (cluster ready)", "launch_to_ready"),
        ("chief task start (ranks/0.json) to cluster ready", "chief_task_to_ready"),
        ("last task start to cluster ready", "last_task_to_ready"),
        ("  of which: chief task start to script body start (tfrun: rendezvous, TF_CONFIG)", "chief_task_to_script"),
        ("  of which: the script's `import tensorflow` (4 processes importing on the same cores)", "import"),
        ("  of which: ParameterServerStrategy(...) (connects to every worker and ps)", "strategy"),
    ]:
        xs = [r[key] for r in ps]
        lines.append(f"| {label} | {statistics.median(xs):.2f} | {min(xs):.2f} | {max(xs):.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100, help="training steps of the Horovod script")
    parser.add_argument("--ps-repeats", type=int, default=None, help="default: --repeats; 0 skips the ps part")
    parser.add_argument("--skip-horovod", action="store_true", help="only the parameter-server part")
    parser.add_argument(
        "--nodes",
        action="store_true",
        help="also Horovod across two nodes of the local Slurm cluster (tfrun vs salloc + horovodrun)",
    )
    parser.add_argument("--output", default="-", help="also write the report here (bench/run.py does)")
    parser.add_argument("--json", default=None, help="also write the headline figures here (for bench/run.py)")
    args = parser.parse_args()
    ps_repeats = args.repeats if args.ps_repeats is None else args.ps_repeats

    info = machine()
    work = Path(tempfile.mkdtemp(prefix="tfrun-bench-backends-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TFRUN_", "SLURM_", "HOROVOD_", "OMPI_"))}
    env.update(TFRUN_RUNS_DIR=str(work / "runs"), TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    # The same Keras on both sides: tfrun's Horovod tasks run legacy Keras (Horovod's Keras API
    # needs it on TF >= 2.16), and the script's tf.optimizers.SGD is then tf-keras's, ~6 % slower a
    # step here than Keras 3's. A horovodrun user on this TensorFlow sets it too.
    env["TF_USE_LEGACY_KERAS"] = "1"
    (work / "hvd_bench.py").write_text(HOROVOD_SCRIPT)
    (work / "ps_bench.py").write_text(PS_SCRIPT)
    steps = ["--steps", str(args.steps)]

    lines: list[str] = []
    ratio = None
    if not args.skip_horovod:
        print("Horovod: tfrun and horovodrun, interleaved", file=sys.stderr)
        hvd = interleave(
            {
                "tfrun": (
                    [
                        *tfrun_command(),
                        "compute=local",
                        "backend=horovod",
                        "compute.tasks_per_node=2",
                        "entry.script=hvd_bench.py",
                        f"trainer.steps={args.steps}",
                    ],
                    tfrun_phases,
                ),
                "horovodrun": (
                    [
                        *horovodrun_command(),
                        "-np",
                        "2",
                        "--gloo",
                        "-H",
                        "localhost:2",
                        sys.executable,
                        "hvd_bench.py",
                        *steps,
                    ],
                    horovodrun_phases,
                ),
            },
            args.repeats,
            work,
            env,
        )
        lines, ratio = horovod_tables(hvd)
    nodes_ratio = None
    if args.nodes:
        nodes_ready()
        print("Horovod across two nodes: tfrun compute=slurm and salloc + horovodrun, interleaved", file=sys.stderr)
        hvd_nodes = interleave(two_node_commands(args.steps), args.repeats, work, env)
        node_lines, nodes_ratio = horovod_tables(hvd_nodes, " across two nodes (Slurm)", phases=False)
        lines += ["", *node_lines]
    if ps_repeats:
        print("parameter servers: tfrun backend=ps", file=sys.stderr)
        ps = interleave(
            {
                "ps": (
                    [*tfrun_command(), "backend=ps", "compute.tasks_per_node=4", "entry.script=ps_bench.py"],
                    ps_phases,
                )
            },
            ps_repeats,
            work,
            env,
        )["ps"]
        lines += ["", *ps_table(ps)] if lines else ps_table(ps)
    info["load average (1, 5, 15 min) at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())

    command = "python bench/bench_backends.py " + " ".join(sys.argv[1:])
    report = "\n".join(
        [
            f"## tfrun backends benchmark ({info['date']})",
            "",
            f"Command: `{command.strip()}`",
            "",
            *(
                [
                    f"Horovod commands: `tfrun compute=local backend=horovod compute.tasks_per_node=2 "
                    f"entry.script=hvd_bench.py trainer.steps={args.steps}` vs `horovodrun -np 2 --gloo -H localhost:2 "
                    f"python hvd_bench.py --steps {args.steps}`.",
                    "",
                ]
                if not args.skip_horovod
                else []
            ),
            *(
                [
                    f"Two-node commands: `tfrun compute=slurm compute.partition=debug compute.nodes=2 "
                    f"compute.tasks_per_node=1 compute.poll_s=0.5 backend=horovod entry.script=hvd_bench.py "
                    f"trainer.steps={args.steps}` vs `salloc -N2 -p debug srun -N1 -n1 -w node1 --overlap horovodrun -np 2 "
                    f"--gloo -H node1:1,node2:1 --ssh-identity-file {SSH_KEY} python hvd_bench.py --steps {args.steps}` "
                    "(horovodrun on the allocation's first node starts both ranks over ssh).",
                    "",
                ]
                if args.nodes
                else []
            ),
            *(
                ["Parameter-server command: `tfrun backend=ps compute.tasks_per_node=4 entry.script=ps_bench.py`.", ""]
                if ps_repeats
                else []
            ),
            "The scripts are in bench/bench_backends.py; every figure is a median over interleaved runs. Both "
            "launchers run with TF_USE_LEGACY_KERAS=1 (tfrun sets it for Horovod; Horovod's Keras API needs it).",
            "",
            *(f"- {k}: {v}" for k, v in info.items()),
            "",
            *lines,
            "",
        ]
    )
    shutil.rmtree(work, ignore_errors=True)
    figures: dict[str, Any] = {}
    if not args.skip_horovod:
        figures["horovod"] = {
            key: {"tfrun": med(hvd["tfrun"], key), "horovodrun": med(hvd["horovodrun"], key)}
            for key in ("wall", "launch_to_init", "cpu", "step_ms")
        }
        figures["horovod"]["rounds"] = {name: [r["wall"] for r in runs] for name, runs in hvd.items()}
        figures["horovod"]["ratio"] = ratio
    if args.nodes:
        figures["horovod_nodes"] = {
            key: {"tfrun": med(hvd_nodes["tfrun"], key), "horovodrun": med(hvd_nodes["horovodrun"], key)}
            for key in ("wall", "launch_to_init", "cpu", "step_ms")
        }
        figures["horovod_nodes"]["rounds"] = {name: [r["wall"] for r in runs] for name, runs in hvd_nodes.items()}
        figures["horovod_nodes"]["ratio"] = nodes_ratio
    if ps_repeats:
        figures["ps"] = {key: statistics.median(r[key] for r in ps) for key in ps[0]}
    publish(report, args.output, args.json, figures)
    if ratio is not None and ratio > TARGET_RATIO:
        print(f"the wall time target (tfrun / horovodrun <= {TARGET_RATIO}) was missed", file=sys.stderr)


if __name__ == "__main__":
    main()
