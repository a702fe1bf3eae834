"""TensorBoard event files of a run's metrics, under ``<run dir>/tensorboard`` (rank 0) or
``tensorboard/rank<N>``. Written only where the script already imported TensorFlow."""

from __future__ import annotations

import os
import sys
from typing import Any, Mapping

from tfrun import variables
from tfrun.paths import RunPaths

_writer: Any = None


def scalars(values: Mapping[str, float], step: int) -> None:
    """Values as TensorBoard scalars under ``<run dir>/tensorboard`` (if TF is loaded).

    Recording metrics must never break training: a failure is reported once, then skipped.
    """
    global _writer
    if _writer is False or "tensorflow" not in sys.modules or not os.environ.get(variables.RUN_DIR):
        return  # never import TensorFlow only to log
    try:
        _write_scalars(values, step)
    except Exception as exc:
        print(f"tfrun: warning: no TensorBoard events for this run: {exc}", file=sys.stderr, flush=True)
        _writer = False


def _file_writer() -> Any:
    global _writer
    import tensorflow as tf

    if _writer is None:
        rank = int(os.environ.get(variables.RANK, "0"))
        folder = RunPaths.of(os.environ[variables.RUN_DIR]).tensorboard / ("" if rank == 0 else f"rank{rank}")
        _writer = tf.summary.create_file_writer(str(folder))
    return _writer


def scalar_metadata() -> Any:
    """What marks a summary as a scalar for TensorBoard (what tf.summary.scalar adds)."""
    from tensorflow.core.framework.summary_pb2 import SummaryMetadata

    return SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="scalars"))


def _write_scalars(values: Mapping[str, float], step: int) -> None:
    # tf.summary.write with the scalars plugin's metadata is what tf.summary.scalar does,
    # minus importing tensorboard.summary on first use: that pulls in TensorBoard's
    # TensorFlow stub and, where boto3 is installed, boto3 (~0.1-0.2 s per task).
    import tensorflow as tf

    writer = _file_writer()
    scalar = scalar_metadata()
    with writer.as_default():
        for name, value in values.items():
            tf.summary.write(tag=name, tensor=tf.constant(value, tf.float32), step=step, metadata=scalar)
    writer.flush()
