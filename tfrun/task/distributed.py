"""Helpers for a script that should run unchanged under every backend.

Scripts written for one backend (a classic Horovod script, a ParameterServerStrategy
script) need none of this. A script that wants to run under all of them writes::

    strategy = tfrun.distributed.strategy()
    with strategy.scope():
        model = ...
        model.compile(optimizer=tfrun.distributed.optimizer(opt), ...)
    model.fit(tfrun.distributed.dataset(make_dataset), steps_per_epoch=...,
              callbacks=tfrun.distributed.callbacks())

Everything here imports TensorFlow (and Horovod) inside the functions only.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from tfrun import variables
from tfrun.task.context import context


def backend() -> str:
    """The run's backend name (``none`` outside tfrun)."""
    return os.environ.get(variables.BACKEND, "none")


def is_chief() -> bool:
    """True on the task that should save models, print progress and write summaries."""
    if backend() == "horovod":
        return int(os.environ.get("HOROVOD_RANK", "0")) == 0
    return context().is_chief


def strategy() -> Any:
    """The tf.distribute strategy for the backend (Horovod: initialised, default strategy)."""
    import tensorflow as tf

    name = backend()
    if name == "mwms":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "ps":
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        return tf.distribute.ParameterServerStrategy(resolver)
    if name == "horovod":
        import horovod.tensorflow.keras as hvd

        hvd.init()
    return tf.distribute.get_strategy()


def num_replicas() -> int:
    """How many copies of the model train at once (scale the learning rate by it)."""
    if backend() == "horovod":
        return int(os.environ.get("HOROVOD_SIZE", "1"))
    if backend() == "mwms":
        return int(os.environ.get(variables.WORLD_SIZE, "1"))
    return 1


def optimizer(opt: Any) -> Any:
    """Horovod: wrap in DistributedOptimizer (gradients averaged across ranks)."""
    if backend() == "horovod":
        import horovod.tensorflow.keras as hvd

        return hvd.DistributedOptimizer(opt)
    return opt


def callbacks() -> list[Any]:
    """Horovod: broadcast rank 0's initial weights and average metrics across ranks."""
    if backend() == "horovod":
        import horovod.tensorflow.keras as hvd

        return [hvd.callbacks.BroadcastGlobalVariablesCallback(0), hvd.callbacks.MetricAverageCallback()]
    return []


def dataset(make: Callable[[Any], Any]) -> Any:
    """What to pass to ``model.fit`` for a dataset function ``make(input_context)``.

    ``make`` should shard by ``input_context`` (``ds.shard(ctx.num_input_pipelines,
    ctx.input_pipeline_id)``) and repeat; pass ``steps_per_epoch`` to fit.
    """
    import tensorflow as tf

    name = backend()
    if name == "ps":
        return tf.keras.utils.experimental.DatasetCreator(make)
    if name == "horovod":
        size, rank = int(os.environ["HOROVOD_SIZE"]), int(os.environ["HOROVOD_RANK"])
        return make(tf.distribute.InputContext(num_input_pipelines=size, input_pipeline_id=rank))
    return make(tf.distribute.InputContext())
