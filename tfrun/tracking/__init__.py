"""A run's metrics and where they go: ``metrics.jsonl`` (:mod:`tfrun.tracking.metrics`, written
in the task by the Keras hooks and ``tfrun.log_metric``), TensorBoard event files
(:mod:`tfrun.tracking.tensorboard`), MLflow (:mod:`tfrun.tracking.mlflow_sync`), and a
sweep's comparison table and plots (:mod:`tfrun.tracking.compare`)."""
