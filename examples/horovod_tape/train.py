"""A custom training loop with ``hvd.DistributedGradientTape`` (no Keras fit).

tfrun entry.script=examples/horovod_tape/train.py backend=horovod compute.tasks_per_node=2
"""

import argparse
import hashlib
import json
import os

import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits

parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float, default=0.1)
parser.add_argument("--steps", type=int, default=60)
parser.add_argument("--batch_size", type=int, default=32)
parser.add_argument("--output_dir", default=os.environ.get("TFRUN_OUTPUT_DIR", "outputs"))
args = parser.parse_args()

hvd.init()
digits = load_digits()
x = (digits.data / 16.0).astype("float32")[hvd.rank() :: hvd.size()]
y = digits.target[hvd.rank() :: hvd.size()]
data = iter(tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=hvd.rank()).batch(args.batch_size).repeat())

tf.random.set_seed(hvd.rank())
w1 = tf.Variable(tf.random.normal([64, 64], stddev=0.1))
b1 = tf.Variable(tf.zeros([64]))
w2 = tf.Variable(tf.random.normal([64, 10], stddev=0.1))
b2 = tf.Variable(tf.zeros([10]))
variables = [w1, b1, w2, b2]
opt = tf.optimizers.SGD(args.lr)


@tf.function
def step(xb, yb, first):
    with tf.GradientTape() as tape:
        logits = tf.nn.relu(xb @ w1 + b1) @ w2 + b2
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=yb, logits=logits))
    tape = hvd.DistributedGradientTape(tape)
    opt.apply_gradients(zip(tape.gradient(loss, variables), variables))
    if first:  # after the first step, so that the optimizer's slots exist too
        hvd.broadcast_variables(variables, root_rank=0)
        hvd.broadcast_variables(opt.variables, root_rank=0)
    return hvd.allreduce(loss)


losses = [float(step(*next(data), i == 0)) for i in range(args.steps)]
weights = np.concatenate([v.numpy().ravel() for v in variables])
os.makedirs(args.output_dir, exist_ok=True)
record = {
    "rank": hvd.rank(),
    "size": hvd.size(),
    "loss": losses,
    "weights_sha": hashlib.sha256(np.round(weights, 5).tobytes()).hexdigest()[:16],
}
with open(os.path.join(args.output_dir, f"history-rank{hvd.rank()}.json"), "w") as f:
    json.dump(record, f)
print(f"rank {hvd.rank()} of {hvd.size()}: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
