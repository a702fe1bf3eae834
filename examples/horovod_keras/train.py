"""The classic Horovod Keras script, as Horovod's own examples write it.

Nothing tfrun-specific: ``hvd.init()``, a DistributedOptimizer, the broadcast and
metric-averaging callbacks, checkpoints on rank 0 only. tfrun's horovod backend makes
``hvd.init()`` join every task of the run (no horovodrun).

    tfrun entry.script=examples/horovod_keras/train.py backend=horovod compute.tasks_per_node=2
"""

import argparse
import hashlib
import json
import os

import horovod.tensorflow.keras as hvd
import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits

parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--epochs", type=int, default=4)
parser.add_argument("--batch_size", type=int, default=32)
parser.add_argument("--output_dir", default=os.environ.get("TFRUN_OUTPUT_DIR", "outputs"))
args = parser.parse_args()

hvd.init()
tf.keras.utils.set_random_seed(hvd.rank())  # different initial weights: the broadcast must fix them

digits = load_digits()
x = (digits.data / 16.0).astype("float32")[hvd.rank() :: hvd.size()]
y = digits.target[hvd.rank() :: hvd.size()]

model = tf.keras.Sequential(
    [
        tf.keras.Input(shape=(64,)),
        tf.keras.layers.Dense(64, activation="relu"),
        tf.keras.layers.Dense(10),
    ]
)
opt = hvd.DistributedOptimizer(tf.keras.optimizers.SGD(args.lr * hvd.size()))
model.compile(optimizer=opt, loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])

callbacks = [hvd.callbacks.BroadcastGlobalVariablesCallback(0), hvd.callbacks.MetricAverageCallback()]
os.makedirs(args.output_dir, exist_ok=True)
if hvd.rank() == 0:
    callbacks.append(tf.keras.callbacks.ModelCheckpoint(os.path.join(args.output_dir, "checkpoint-{epoch}.h5")))

history = model.fit(
    x, y, batch_size=args.batch_size, epochs=args.epochs, callbacks=callbacks, verbose=2 if hvd.rank() == 0 else 0
)

weights = np.concatenate([w.ravel() for w in model.get_weights()])
record = {
    "rank": hvd.rank(),
    "size": hvd.size(),
    "loss": [float(v) for v in history.history["loss"]],
    "weights_sha": hashlib.sha256(np.round(weights, 5).tobytes()).hexdigest()[:16],
}
with open(os.path.join(args.output_dir, f"history-rank{hvd.rank()}.json"), "w") as f:
    json.dump(record, f)
print(f"rank {hvd.rank()} of {hvd.size()}: loss {record['loss'][0]:.3f} -> {record['loss'][-1]:.3f}")
