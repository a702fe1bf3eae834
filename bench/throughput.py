"""Training throughput: samples/s of a Keras training step loop on the digits data.

As a training script (bare, or unchanged under tfrun), it times its training from outside,
as wall time from the first batch to the return, and prints one ``THROUGHPUT {...}`` line
per mode:

- ``loop``: a ``tf.function`` train step (Keras model and optimizer, ``GradientTape``),
  ``--warmup`` + ``--steps`` steps, all timed (the first one traces the function);
  tfrun adds nothing inside it, so this shows what the task's environment costs.
- ``fit``: the whole ``model.fit`` call of ``--epochs`` epochs, timed around the call, so
  that every callback is inside the span, tfrun's own included (the per-epoch backup,
  metrics, the stop check, and the backup at the end of fit).

    python bench/throughput.py [--steps 1000] [--batch_size 128] [--mode both]
    tfrun entry.script=bench/throughput.py trainer.steps=1000

With ``--compare`` it runs both of those, interleaved (the order flips every round), and
prints the medians and the ratio tfrun / bare (target >= 0.99, the single-GPU target of
issue 9; on this CPU machine the same figure is the CPU check). The table is appended to
bench/RESULTS.md (``--output -`` writes nothing; ``--json PATH`` for bench/run.py).

    python bench/throughput.py --compare [--repeats 5] [--steps 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import publish

TARGET = 0.99


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="timed training steps per mode")
    parser.add_argument("--warmup", type=int, default=100, help="loop mode: steps before --steps (timed too)")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=5, help="fit mode: epochs of --steps / --epochs steps each")
    parser.add_argument("--mode", choices=("loop", "fit", "both"), default="both")
    parser.add_argument("--beat", action="store_true", help="loop mode: tfrun.heartbeat(step) after every step")
    parser.add_argument("--compare", action="store_true", help="run bare and under tfrun, interleaved, medians")
    parser.add_argument("--repeats", type=int, default=10, help="--compare: interleaved rounds")
    parser.add_argument("--output", default="-", help="--compare: also write the report here (bench/run.py does)")
    parser.add_argument("--json", default=None, help="--compare: also write the figures here")
    return parser.parse_known_args()[0]  # tfrun may pass more trainer keys than this script knows


# ---------------------------------------------------------------------------- the script


def dataset(batch_size: int):
    import tensorflow as tf
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int64")
    return (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(len(x), seed=0)
        .repeat()
        .batch(batch_size, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
    )


def model_for(hidden: int):
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input(shape=(64,)),
            keras.layers.Dense(hidden, activation="relu"),
            keras.layers.Dense(hidden, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    return model


def measure_loop(args: argparse.Namespace) -> dict:
    import keras
    import tensorflow as tf

    model = model_for(args.hidden)
    opt = keras.optimizers.SGD(0.01)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    data = iter(dataset(args.batch_size))

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss

    beat = None
    if args.beat:
        import tfrun

        beat = tfrun.heartbeat
    steps = args.warmup + args.steps
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(steps):
        loss = step(*next(data))
        if beat is not None:
            beat(i)
    float(loss)  # wait for the last step
    return timing("loop", steps, args.batch_size, time.perf_counter() - wall, time.process_time() - cpu)


def measure_fit(args: argparse.Namespace) -> dict:
    import keras

    model = model_for(args.hidden)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    per_epoch = max(1, args.steps // args.epochs)
    data = dataset(args.batch_size)
    # Timed from outside: the call's start to its return, every callback (tfrun's too) inside.
    wall, cpu = time.perf_counter(), time.process_time()
    model.fit(data, epochs=args.epochs, steps_per_epoch=per_epoch, verbose=0)
    return timing(
        "fit", per_epoch * args.epochs, args.batch_size, time.perf_counter() - wall, time.process_time() - cpu
    )


def timing(mode: str, steps: int, batch: int, wall: float, cpu: float) -> dict:
    import tensorflow as tf

    return {
        "mode": mode,
        "steps": steps,
        "batch_size": batch,
        "seconds": wall,
        "cpu_seconds": cpu,
        "samples_per_s": steps * batch / wall,
        "samples_per_cpu_s": steps * batch / cpu,
        "devices": [d.device_type for d in tf.config.list_logical_devices()],
        "under_tfrun": "TFRUN_RUN_ID" in os.environ,
    }


def script(args: argparse.Namespace) -> None:
    for mode, fn in (("loop", measure_loop), ("fit", measure_fit)):
        if args.mode in (mode, "both"):
            print("THROUGHPUT " + json.dumps(fn(args)), flush=True)


# ---------------------------------------------------------------------------- --compare


def tfrun_command() -> list[str]:
    found = Path(sys.executable).with_name("tfrun")
    if found.is_file():
        return [str(found)]
    return [shutil.which("tfrun")] if shutil.which("tfrun") else [sys.executable, "-m", "tfrun.cli"]


def compare(args: argparse.Namespace) -> None:
    here = Path(__file__).resolve()
    work = Path(tempfile.mkdtemp(prefix="tfrun-bench-throughput-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TFRUN_", "SLURM_"))}
    env.update(TFRUN_RUNS_DIR=str(work / "runs"), TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    flags = {
        "steps": args.steps,
        "warmup": args.warmup,
        "batch_size": args.batch_size,
        "hidden": args.hidden,
        "epochs": args.epochs,
        "mode": args.mode,
    }
    commands = {
        "bare": [sys.executable, str(here), *(w for k, v in flags.items() for w in (f"--{k}", str(v)))],
        "tfrun": [
            *tfrun_command(),
            "compute=local",
            "backend=none",
            f"entry.script={here}",
            *(f"trainer.{k}={v}" for k, v in flags.items()),
        ],
    }
    load_start = os.getloadavg()
    found: dict[str, dict[str, list[dict]]] = {name: {} for name in commands}
    names = list(commands)
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            result = subprocess.run(
                commands[name], cwd=work, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True
            )
            if result.returncode != 0:
                raise SystemExit(f"bench: {name} failed ({result.returncode}):\n{result.stderr[-3000:]}")
            records = [json.loads(m) for m in re.findall(r"THROUGHPUT (\{.*\})", result.stdout)]
            if not records:
                raise SystemExit(f"bench: {name} printed no THROUGHPUT line:\n{result.stdout[-2000:]}")
            for rec in records:
                found[name].setdefault(rec["mode"], []).append(rec)
            shown = ", ".join(f"{rec['mode']} {rec['samples_per_s']:.0f}/s" for rec in records)
            print(f"  round {r + 1}/{args.repeats} {name}: {shown}", file=sys.stderr, flush=True)
    shutil.rmtree(work, ignore_errors=True)

    med = statistics.median
    figures: dict = {"target": TARGET}
    lines = [
        f"| samples/s, median of {args.repeats} interleaved runs | bare | under tfrun | **tfrun / bare** "
        f"(target >= {TARGET}) | per CPU-second: tfrun / bare | spread of tfrun / bare (min-max of rounds) |",
        "|---|---|---|---|---|---|",
    ]
    for mode in found["bare"]:
        bare, wrapped = found["bare"][mode], found["tfrun"][mode]
        b, t = med(x["samples_per_s"] for x in bare), med(x["samples_per_s"] for x in wrapped)
        cb, ct = med(x["samples_per_cpu_s"] for x in bare), med(x["samples_per_cpu_s"] for x in wrapped)
        pairs = [w["samples_per_s"] / x["samples_per_s"] for w, x in zip(wrapped, bare)]
        ratio = t / b
        what = {"loop": "`tf.function` step loop", "fit": "`model.fit`, timed around the call"}[mode]
        lines.append(
            f"| {what}, {bare[0]['steps']} steps x {args.batch_size} | {b:.0f} | {t:.0f} | "
            f"**{ratio:.3f}: {'met' if ratio >= TARGET else 'MISSED'}** | {ct / cb:.3f} | "
            f"{min(pairs):.2f}-{max(pairs):.2f} |"
        )
        figures[mode] = {
            "bare": b,
            "tfrun": t,
            "ratio": ratio,
            "cpu_ratio": ct / cb,
            "spread": f"{min(pairs):.3f}-{max(pairs):.3f}",
            "rounds": {"bare": [x["samples_per_s"] for x in bare], "tfrun": [x["samples_per_s"] for x in wrapped]},
        }
    devices = sorted({d for runs in found["bare"].values() for x in runs for d in x["devices"]})
    command = "python bench/throughput.py " + " ".join(sys.argv[1:])
    report = "\n".join(
        [
            "",
            f"## Training throughput: under tfrun vs bare ({time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())})",
            "",
            f"Command: `{command.strip()}`",
            "",
            f"- machine: {platform.node()}, {os.cpu_count()} CPU(s); TensorFlow devices: {', '.join(devices)}",
            f"- load average (1, 5, 15 min) at start: {' '.join(f'{x:.2f}' for x in load_start)}; at end: "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}",
            f"- bare: `python bench/throughput.py --steps {args.steps} ...`; tfrun: `tfrun compute=local backend=none "
            f"entry.script=bench/throughput.py trainer.steps={args.steps} ...`; model 64-{args.hidden}-{args.hidden}-10, "
            f"SGD, digits, batch {args.batch_size}; each timed from outside, first batch to return (the loop's "
            f"tracing and every callback of fit inside the span).",
            "",
            *lines,
            "",
            "Samples/s of every round (bare; tfrun), in the order run:",
            "",
            *(
                f"- {mode}: {', '.join(f'{x:.0f}' for x in figures[mode]['rounds']['bare'])}; "
                f"{', '.join(f'{x:.0f}' for x in figures[mode]['rounds']['tfrun'])}"
                for mode in found["bare"]
            ),
            "",
        ]
    )
    publish(report, args.output, args.json, {"throughput": figures})


if __name__ == "__main__":
    ARGS = parse_args()
    compare(ARGS) if ARGS.compare else script(ARGS)
