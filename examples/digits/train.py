"""Train a small Keras model on scikit-learn's bundled digits (no download).

Runs as plain ``python train.py`` and, unchanged, under tfrun:
``tfrun trainer.lr=0.005 trainer.epochs=20``. Parameters arrive as flags.
"""

from __future__ import annotations

import argparse
import json
import os


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default=os.environ.get("TFRUN_OUTPUT_DIR", "outputs"))
    return parser.parse_args()


def load_data(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int64")
    return train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)


def main() -> None:
    args = parse_args()
    import keras

    keras.utils.set_random_seed(args.seed)
    x_train, x_val, y_train, y_val = load_data(args.seed)
    model = keras.Sequential(
        [
            keras.Input(shape=(64,)),
            keras.layers.Dense(args.hidden, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(args.lr), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    history = model.fit(
        x_train, y_train, validation_data=(x_val, y_val), epochs=args.epochs, batch_size=args.batch_size, verbose=2
    )
    os.makedirs(args.output_dir, exist_ok=True)
    if int(os.environ.get("TFRUN_RANK", "0")) == 0:  # one writer per run
        model.save(os.path.join(args.output_dir, "model.keras"))
    final = {k: float(v[-1]) for k, v in history.history.items()}
    with open(os.path.join(args.output_dir, "final_metrics.json"), "w") as f:
        json.dump(final, f)
    print(f"val_accuracy={final['val_accuracy']:.4f} loss={final['loss']:.4f}")


if __name__ == "__main__":
    main()
