#!/usr/bin/env python3
"""Check Horovod (Gloo) across 2 local processes started WITHOUT horovodrun.

    python scripts/horovod-selfcheck.py            # allreduce on 2 ranks
    python scripts/horovod-selfcheck.py --keras    # + tf_keras model.fit and DistributedGradientTape

The parent starts two plain processes, as `srun` would.  Each learns its rank from the
command line (under Slurm: SLURM_PROCID / SLURM_NTASKS).  Rank 0 starts Horovod's HTTP
rendezvous server, registers the host allocation plan with it and publishes the port by
an atomic file write; the other rank waits for that file.  Every rank computes the same
plan, exports the HOROVOD_* variables from its own slot, then calls hvd.init().
Exit code 0 when both ranks see size 2 and agree on the results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

SIZE = 2


def publish(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: readers see nothing or the whole content


def wait_for(path: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"rendezvous file {path} did not appear in {timeout}s")
        time.sleep(0.05)
    with open(path) as f:
        return f.read()


def setup_rendezvous(rank: int, size: int, hosts: str, port_file: str):
    """Export the HOROVOD_* environment for this rank. Returns the server (rank 0) or None."""
    from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts

    # Same deterministic plan on every rank: list of SlotInfo(hostname, rank, local_rank,
    # cross_rank, size, local_size, cross_size), indexed by global rank.
    plan = get_host_assignments(parse_hosts(hosts), size)
    server = None
    if rank == 0:
        from horovod.runner.http.http_server import RendezvousServer

        server = RendezvousServer()
        port = server.start()  # binds ('', random free port) and serves in a thread
        server.init(plan)  # the full plan (list of SlotInfo), not one slot
        publish(port_file, json.dumps({"addr": "127.0.0.1", "port": port}))
    info = json.loads(wait_for(port_file, 60))
    slot = plan[rank]
    os.environ.update(
        {
            # Must be the hostname used in the plan: the local scope is "local_<hostname>".
            "HOROVOD_HOSTNAME": slot.hostname,
            "HOROVOD_RANK": str(slot.rank),
            "HOROVOD_SIZE": str(slot.size),
            "HOROVOD_LOCAL_RANK": str(slot.local_rank),
            "HOROVOD_LOCAL_SIZE": str(slot.local_size),
            "HOROVOD_CROSS_RANK": str(slot.cross_rank),
            "HOROVOD_CROSS_SIZE": str(slot.cross_size),
            "HOROVOD_GLOO_RENDEZVOUS_ADDR": info["addr"],
            "HOROVOD_GLOO_RENDEZVOUS_PORT": str(info["port"]),
            "HOROVOD_CONTROLLER": "gloo",
            "HOROVOD_CPU_OPERATIONS": "gloo",
            "HOROVOD_GLOO_IFACE": "lo",
        }
    )
    return server


def weights_digest(weights) -> list[float]:
    import numpy as np

    return [float(np.asarray(w, dtype=np.float64).sum()) for w in weights]


def keras_fit(hvd, tf) -> dict:
    import numpy as np

    rng = np.random.default_rng(100 + hvd.rank())  # different data per rank
    x = rng.normal(size=(256, 8)).astype("float32")
    y = (x @ np.arange(1, 9, dtype="float32") / 10.0)[:, None]
    tf.random.set_seed(hvd.rank())  # different init per rank
    model = tf.keras.Sequential(
        [tf.keras.layers.Input((8,)), tf.keras.layers.Dense(16, activation="relu"), tf.keras.layers.Dense(1)]
    )
    opt = hvd.DistributedOptimizer(tf.keras.optimizers.SGD(0.01 * hvd.size()))
    model.compile(loss="mse", optimizer=opt, metrics=["mae"])
    hist = model.fit(
        x,
        y,
        batch_size=32,
        epochs=3,
        verbose=0,
        callbacks=[
            hvd.callbacks.BroadcastGlobalVariablesCallback(0),
            hvd.callbacks.MetricAverageCallback(),
        ],
    )
    return {
        "optimizer": type(opt).__name__,
        "loss": [round(float(v), 6) for v in hist.history["loss"]],
        "weights": weights_digest(model.get_weights()),
    }


def tape_loop(hvd_tf, tf) -> dict:
    import numpy as np

    rng = np.random.default_rng(200 + hvd_tf.rank())
    x = tf.constant(rng.normal(size=(128, 8)).astype("float32"))
    y = tf.reduce_sum(x, axis=1, keepdims=True)
    tf.random.set_seed(10 + hvd_tf.rank())
    model = tf.keras.Sequential([tf.keras.layers.Input((8,)), tf.keras.layers.Dense(1)])
    opt = tf.keras.optimizers.SGD(0.05)

    @tf.function
    def step(first: bool):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
        tape = hvd_tf.DistributedGradientTape(tape)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        if first:  # after the first step, so the optimizer's slots exist
            hvd_tf.broadcast_variables(model.variables, root_rank=0)
            hvd_tf.broadcast_variables(opt.variables, root_rank=0)
        return loss

    losses = [float(step(i == 0)) for i in range(20)]
    return {
        "loss_first_last": [round(losses[0], 6), round(losses[-1], 6)],
        "weights": weights_digest(model.get_weights()),
    }


def worker(args) -> int:
    if args.keras:
        os.environ["TF_USE_LEGACY_KERAS"] = "1"  # before TensorFlow is imported
    server = setup_rendezvous(args.rank, args.size, args.hosts, args.port_file)
    t0 = time.monotonic()
    import horovod.tensorflow as hvd
    import tensorflow as tf

    hvd.init()
    out = {
        "rank": hvd.rank(),
        "size": hvd.size(),
        "local_rank": hvd.local_rank(),
        "local_size": hvd.local_size(),
        "gloo_enabled": bool(hvd.gloo_enabled()),
        "init_s": round(time.monotonic() - t0, 2),
    }
    out["allreduce_sum"] = float(hvd.allreduce(tf.constant(float(hvd.rank() + 1)), op=hvd.Sum))
    if args.keras:
        import horovod.tensorflow.keras as hvdk

        out["keras_fit"] = keras_fit(hvdk, tf)
        out["tape"] = tape_loop(hvd, tf)
    hvd.allreduce(tf.constant(0.0), name="final_barrier")  # rank 0 keeps the server up till here
    print("RESULT " + json.dumps(out), flush=True)
    hvd.shutdown()
    if server is not None:
        server.stop()
    return 0


def parent(args) -> int:
    with tempfile.TemporaryDirectory(prefix="hvd-selfcheck-") as tmp:
        port_file = os.path.join(tmp, "rendezvous.json")
        # Drop stale rank variables from the caller; keep tuning knobs.
        keep = {"HOROVOD_GLOO_TIMEOUT_SECONDS", "HOROVOD_LOG_LEVEL"}
        env = {k: v for k, v in os.environ.items() if not k.startswith("HOROVOD_") or k in keep}
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--worker",
            "--size",
            str(SIZE),
            "--hosts",
            f"localhost:{SIZE}",
            "--port-file",
            port_file,
        ]
        if args.keras:
            cmd.append("--keras")
        procs = [
            subprocess.Popen(
                cmd + ["--rank", str(r)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for r in range(SIZE)
        ]
        results, ok = [], True
        for r, p in enumerate(procs):
            try:
                so, se = p.communicate(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                print(f"rank {r}: TIMEOUT after {args.timeout}s", file=sys.stderr)
                return 1
            lines = [l for l in so.splitlines() if l.startswith("RESULT ")]
            if p.returncode != 0 or not lines:
                ok = False
                print(f"rank {r}: exit {p.returncode}\n{so[-3000:]}\n{se[-5000:]}", file=sys.stderr)
                continue
            results.append(json.loads(lines[-1][len("RESULT ") :]))
    for res in results:
        print(json.dumps(res))
    if not ok or len(results) != SIZE:
        print("horovod-selfcheck: FAILED")
        return 1
    expected = SIZE * (SIZE + 1) / 2
    checks = [all(r["size"] == SIZE for r in results), all(r["allreduce_sum"] == expected for r in results)]
    if args.keras:
        for part in ("keras_fit", "tape"):
            w = [r[part]["weights"] for r in results]
            checks.append(all(x == w[0] for x in w))
    if all(checks):
        print(
            f"horovod-selfcheck: OK (size {SIZE}, allreduce sum {expected}"
            f"{', keras fit + tape weights identical' if args.keras else ''})"
        )
        return 0
    print(f"horovod-selfcheck: FAILED checks {checks}")
    return 1


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--keras", action="store_true", help="also train with tf_keras (TF_USE_LEGACY_KERAS=1) and a custom loop"
    )
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=SIZE, help=argparse.SUPPRESS)
    ap.add_argument("--hosts", default=f"localhost:{SIZE}", help=argparse.SUPPRESS)
    ap.add_argument("--port-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    return worker(args) if args.worker else parent(args)


if __name__ == "__main__":
    sys.exit(main())
