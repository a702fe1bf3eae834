"""Every use tfrun makes of MLflow's private parts, in one place.

MLflow's system metrics (CPU, memory, disk, network, GPU) are public only through its
fluent API: ``mlflow.start_run(log_system_metrics=True)`` makes the run the process's
global active run, which would take MLflow away from the user's script (its own
``mlflow.start_run`` would find a run already active). tfrun keeps to the client, so it
drives the monitor the fluent API starts, ``SystemMetricsMonitor``, itself.
``tests/test_compat.py`` checks each function here against the installed MLflow, naming
the upgrade that changed it. Nothing else in tfrun imports ``mlflow.system_metrics``.
"""

from __future__ import annotations

import sys
from typing import Any


def start_system_metrics(run_id: str, tracking_uri: str, resume: bool) -> Any:
    """A started monitor that samples this machine and logs ``system/*`` metrics to the run
    (``resume``: a later attempt, whose steps follow the earlier attempts')."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, resume_logging=resume, tracking_uri=tracking_uri)
    monitor.start()
    return monitor


def stop_system_metrics(monitor: Any) -> None:
    """Take a last sample (a run shorter than one sampling interval still gets one), log it,
    and stop the monitor. Never raises: the run's end must not depend on a sample."""
    try:
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
    except Exception as exc:  # the metrics already logged stand; only the last sample is lost
        print(f"tfrun: warning: no last system metrics sample ({type(exc).__name__}: {exc})", file=sys.stderr)
    monitor.finish()
