"""Digits classifier that runs unchanged under backend=none, horovod, ps and mwms.

It uses ``tfrun.distributed`` for the few things that differ between backends (the
strategy, the optimizer wrapper, the callbacks, how data reaches ``fit``). Every task
writes its final loss history and a digest of its weights to the run's outputs, so
that identical weights across ranks can be checked.

    tfrun entry.script=examples/digits_distributed/train.py backend=mwms compute.tasks_per_node=2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os

import tfrun
import tfrun.distributed as dist


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--steps_per_epoch", type=int, default=20)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import numpy as np
    import tensorflow as tf
    from sklearn.datasets import load_digits

    tf.keras.utils.set_random_seed(0)
    digits = load_digits()
    x, y = (digits.data / 16.0).astype("float32"), digits.target.astype("int64")

    def make_dataset(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        ds = tf.data.Dataset.from_tensor_slices((x, y)).shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
        return ds.shuffle(len(x), seed=0).batch(args.batch_size).repeat()

    strategy = dist.strategy()
    with strategy.scope():
        model = tf.keras.Sequential(
            [
                tf.keras.Input(shape=(64,)),
                tf.keras.layers.Dense(64, activation="relu"),
                tf.keras.layers.Dense(10),
            ]
        )
        model.compile(
            optimizer=dist.optimizer(tf.keras.optimizers.SGD(args.lr * dist.num_replicas())),
            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    history = model.fit(
        dist.dataset(make_dataset),
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        callbacks=dist.callbacks(),
        verbose=2 if dist.is_chief() else 0,
    )

    ctx = tfrun.context()
    weights = np.concatenate([np.asarray(w).ravel() for w in model.get_weights()])
    digest = hashlib.sha256(np.round(weights, 5).tobytes()).hexdigest()[:16]
    record = {
        "rank": ctx.rank,
        "role": ctx.role,
        "loss": [float(v) for v in history.history["loss"]],
        "weights_sha": digest,
        "replicas_in_sync": strategy.num_replicas_in_sync,
    }
    os.makedirs(ctx.output_dir, exist_ok=True)
    with open(os.path.join(ctx.output_dir, f"history-rank{ctx.rank}.json"), "w") as f:
        json.dump(record, f)
    print(
        f"rank {ctx.rank}: loss {record['loss'][0]:.3f} -> {record['loss'][-1]:.3f}, weights {digest}, "
        f"{strategy.num_replicas_in_sync} replica(s) in sync"
    )


if __name__ == "__main__":
    main()
