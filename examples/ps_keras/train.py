"""TensorFlow parameter-server training with Keras, as TF's tutorial writes it.

Runs on the chief (the coordinator); tfrun runs tf.distribute.Server on the workers
and parameter servers and stops them when this script ends.

    tfrun entry.script=examples/ps_keras/train.py backend=ps compute.tasks_per_node=4
"""

import argparse
import json
import os

import tensorflow as tf
from sklearn.datasets import load_digits

parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float, default=0.1)
parser.add_argument("--epochs", type=int, default=4)
parser.add_argument("--steps_per_epoch", type=int, default=20)
parser.add_argument("--output_dir", default=os.environ.get("TFRUN_OUTPUT_DIR", "outputs"))
args = parser.parse_args()

resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
strategy = tf.distribute.ParameterServerStrategy(resolver)
digits = load_digits()
x, y = (digits.data / 16.0).astype("float32"), digits.target


def dataset_fn(ctx):
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
    return ds.shuffle(len(x)).batch(64).repeat()


with strategy.scope():
    model = tf.keras.Sequential(
        [
            tf.keras.Input(shape=(64,)),
            tf.keras.layers.Dense(64, activation="relu"),
            tf.keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer=tf.keras.optimizers.SGD(args.lr), loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )

history = model.fit(
    tf.keras.utils.experimental.DatasetCreator(dataset_fn),
    epochs=args.epochs,
    steps_per_epoch=args.steps_per_epoch,
    verbose=2,
)
os.makedirs(args.output_dir, exist_ok=True)
with open(os.path.join(args.output_dir, "history-rank0.json"), "w") as f:
    json.dump({"loss": [float(v) for v in history.history["loss"]]}, f)
model.save(os.path.join(args.output_dir, "model"))
print(f"chief: loss {history.history['loss'][0]:.3f} -> {history.history['loss'][-1]:.3f}")
