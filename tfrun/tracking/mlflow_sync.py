"""``tracking=mlflow``: each tfrun run becomes one MLflow run, a sweep one parent run.

Synced from the run dir by the tfrun process that sees the run end (the one that
launched it, or a later ``tfrun status``): the composed config as params, every metric
with its step, the run's files (config, plan, status, logs, exported model) as
artifacts. MLflow is imported only here, only when asked.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Mapping

from tfrun import rundir
from tfrun.tracking import metrics

_MAX_PARAM = 500  # MLflow rejects long param values; the full config is an artifact anyway


def tracking_uri(cfg: Mapping[str, Any], runs_dir: Path) -> str:
    """The configured URI, else an SQLite store beside the runs."""
    uri = cfg.get("tracking_uri")
    return uri or f"sqlite:///{(runs_dir / 'mlflow.db').resolve()}"


def flatten(data: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """``{"a": {"b": 1}}`` -> ``("a.b", "1")``."""
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from flatten(value, name + ".")
        else:
            yield name, str(value)[:_MAX_PARAM]


def _client(cfg: Mapping[str, Any], runs_dir: Path) -> Any:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg, runs_dir))
    return mlflow


def _experiment_id(mlflow: Any, cfg: Mapping[str, Any], runs_dir: Path, name: str) -> str:
    """The experiment's id, created if needed; with the default store its artifacts stay beside the runs."""
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    location = None if cfg.get("tracking_uri") else (runs_dir / "mlartifacts").resolve().as_uri()
    return str(mlflow.create_experiment(name, artifact_location=location))


def parent_run(cfg: Mapping[str, Any], runs_dir: Path, sweep_dir: Path) -> str:
    """The sweep's parent run (created once; its id is kept in the sweep dir)."""
    marker = sweep_dir / "mlflow.json"
    known = rundir.read_json(marker)
    if known:
        return str(known["run_id"])
    mlflow = _client(cfg, runs_dir)
    experiment_id = _experiment_id(mlflow, cfg, runs_dir, cfg.get("experiment") or sweep_dir.name)
    run = mlflow.MlflowClient().create_run(experiment_id, run_name=sweep_dir.name,
                                           tags={"tfrun.sweep_dir": str(sweep_dir)})
    rundir.write_json(marker, {"run_id": run.info.run_id, "experiment_id": experiment_id,
                             "tracking_uri": tracking_uri(cfg, runs_dir)})
    return str(run.info.run_id)


def sync_run(run_dir: Path, config: Mapping[str, Any], state: str) -> str:
    """Log one finished run to MLflow; returns the MLflow run id (kept in status.json)."""
    cfg = config["tracking"]
    runs_dir = Path(config["tfrun"]["runs_dir"])
    sweep_dir = run_dir.parent if (run_dir.parent / rundir.SWEEP_FILE).exists() else None
    parent = parent_run(cfg, runs_dir, sweep_dir) if sweep_dir else None
    mlflow = _client(cfg, runs_dir)
    if parent:
        experiment_id = rundir.read_json(sweep_dir / "mlflow.json")["experiment_id"]  # type: ignore[operator]
    else:
        experiment_id = _experiment_id(mlflow, cfg, runs_dir, cfg.get("experiment") or "tfrun")
    # The user's tags (tfrun.tags, Experiment.submit(tags=...)) first: tfrun's own keys are its to set.
    tags = {**(config["tfrun"].get("tags") or {}), "tfrun.run_dir": str(run_dir), "tfrun.state": state}
    if parent:
        tags["mlflow.parentRunId"] = parent
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_dir.name if parent else
                          rundir.read_status(run_dir).get("run_id", run_dir.name), tags=tags) as run:
        mlflow.log_params(dict(flatten({k: v for k, v in config.items() if k != "hydra"})))
        for record in metrics.read_metrics(run_dir / metrics.METRICS_FILE):
            step = record.get("epoch") if record.get("epoch") is not None else (record.get("step") or 0)
            if record.get("name") is not None:
                mlflow.log_metric(record["name"], float(record["value"]), step=int(step))
                continue
            for key, value in record.items():
                if key not in ("epoch", "time", "step") and isinstance(value, (int, float)):
                    mlflow.log_metric(key, float(value), step=int(step))
        for name in ("plan.json", "status.json", "attempts.json", "export.json"):
            if (run_dir / name).exists():
                mlflow.log_artifact(str(run_dir / name))
        for folder in (".hydra", "logs"):
            if (run_dir / folder).is_dir():
                mlflow.log_artifacts(str(run_dir / folder), artifact_path=folder.lstrip("."))
        onnx = run_dir / "outputs" / "model.onnx"
        if onnx.exists():
            mlflow.log_artifact(str(onnx), artifact_path="model")
        status = "FINISHED" if state == "COMPLETED" else "FAILED" if state in ("FAILED", "TIMEOUT") else "KILLED"
        mlflow.end_run(status=status)
        return str(run.info.run_id)


def sync_if_asked(run_dir: str | os.PathLike[str], state: str) -> None:
    """Sync a finished run once, if its config asks for MLflow; failures are reported, not fatal."""
    import sys

    from tfrun.rundir import Plan

    path = Path(run_dir)
    if state not in rundir.FINAL_STATES or rundir.read_status(path).get("mlflow_run_id"):
        return
    config = Plan.load(path).config
    if config.get("tracking", {}).get("kind", "none") != "mlflow":
        return
    try:
        run_id = sync_run(path, config, state)
    except Exception as exc:  # the run's own result must not depend on the tracking server
        print(f"tfrun: warning: could not log run {path.name} to MLflow: {exc}", file=sys.stderr)
        return
    rundir.update_status(path, mlflow_run_id=run_id)
    print(f"tfrun: logged to MLflow ({tracking_uri(config['tracking'], Path(config['tfrun']['runs_dir']))}) "
          f"as run {run_id}", file=sys.stderr)


def finish_sweep(sweep_dir: Path, failed: bool) -> None:
    """Close a sweep's parent run, if it has one."""
    marker = rundir.read_json(sweep_dir / "mlflow.json")
    if not marker:
        return
    import mlflow

    mlflow.set_tracking_uri(marker["tracking_uri"])
    mlflow.MlflowClient().set_terminated(marker["run_id"], status="FAILED" if failed else "FINISHED")
