"""Runs side by side: the sweep table of ``tfrun runs --sweep`` and ``tfrun plot``."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Sequence

from tfrun import rundir
from tfrun.errors import TfrunError
from tfrun.paths import RunPaths, SweepPaths
from tfrun.states import RunState
from tfrun.tracking import metrics


def epoch_series(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every metric of a run's Keras epochs: name -> [(epoch, value)]."""
    series: dict[str, list[tuple[int, float]]] = {}
    for record in metrics.read_metrics(RunPaths.of(run_dir).metrics):
        if record.get("epoch") is not None:
            for name, value in metrics.epoch_values(record).items():
                series.setdefault(name, []).append((int(record["epoch"]), value))
        elif record.get("name") is not None:  # tfrun.log_metric
            step = record.get("step") or len(series.get(record["name"], []))
            series.setdefault(record["name"], []).append((int(step), float(record["value"])))
    return series


def best_point(sweep_dir: Path, maximize: bool) -> dict[str, Any] | None:
    """The point of a sweep with the best objective value so far (as ``sweep.json`` records
    them); a value that is not a finite number (NaN, infinite) is never the best."""
    index = rundir.read_json(SweepPaths.of(sweep_dir).index, {"points": []})
    scored = [p for p in index["points"] if _finite((p.get("objective") or {}).get("value"))]
    if not scored:
        return None
    return (max if maximize else min)(scored, key=lambda p: p["objective"]["value"])


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def better(metric: str) -> Any:
    """min for losses and errors, max for everything else (accuracy, auc, ...)."""
    return min if any(w in metric for w in ("loss", "error", "mse", "mae")) else max


Objective = tuple[str, bool]  # a tuning study's objective: (metric, larger is better)


def study_objective(sweep_dir: Path) -> Objective | None:
    """The objective of the tuning study in ``sweep_dir`` and its direction, as the study
    recorded them in ``sweep.json``; None for a sweep that is not a study."""
    found = (rundir.read_json(SweepPaths.of(sweep_dir).index) or {}).get("objective")
    return (found["metric"], found["direction"] == "maximize") if found else None


def _pick(metric: str, study: Objective | None) -> Any:
    """max or min: by the study's direction for its objective; by the metric's name otherwise."""
    if study and study[0] == metric:
        return max if study[1] else min
    return better(metric)


def summary(run_dir: Path, study: Objective | None = None) -> dict[str, tuple[float, float]]:
    """metric -> (final value, best value); the best of the finite values (the final one if
    there is none), by :func:`_pick`."""
    found = {}
    for name, values in epoch_series(run_dir).items():
        numbers = [v for _, v in values if math.isfinite(v)]
        found[name] = (values[-1][1], _pick(name, study)(numbers) if numbers else values[-1][1])
    return found


def point_params(sweep_dir: Path, run_dirs: Sequence[Path]) -> list[dict[str, str]]:
    """Each point's overrides as key -> value."""
    index = rundir.read_json(SweepPaths.of(sweep_dir).index) or {"points": []}
    by_dir = {p["run_dir"]: p["overrides"] for p in index["points"]}
    params = []
    for run_dir in run_dirs:
        overrides = by_dir.get(str(run_dir), [])
        params.append({o.split("=", 1)[0].lstrip("+~"): o.split("=", 1)[1] for o in overrides if "=" in o})
    return params


def varying_keys(params: Sequence[dict[str, str]]) -> list[str]:
    """The parameters whose value is not the same in every point, sorted."""
    return sorted(k for k in {k for p in params for k in p} if len({p.get(k) for p in params}) > 1)


def sweep_table(
    sweep_dir: Path, run_dirs: Sequence[Path], statuses: Sequence[dict[str, Any]], sort: str | None = None
) -> str:
    """A text table: the parameters that differ, state, duration, final/best of each metric.
    ``sort``: by that metric's final value, best first (a value that is not a number last).
    In a tuning study its objective is judged by the study's direction, and its best trial
    is marked ``*``."""
    params = point_params(sweep_dir, run_dirs)
    varying = varying_keys(params)
    study = study_objective(sweep_dir)
    summaries = [summary(d, study) for d in run_dirs]
    names = sorted({m for s in summaries for m in s})
    rows = list(zip(run_dirs, params, statuses, summaries))
    if sort:
        numbered = [sort in r[3] and math.isfinite(r[3][sort][0]) for r in rows]
        present = [r for r, n in zip(rows, numbered) if n]
        present.sort(key=lambda r: r[3][sort][0], reverse=_pick(sort, study) is max)
        rows = present + [r for r, n in zip(rows, numbered) if not n]
    best = best_point(sweep_dir, study[1]) if study else None
    header = ["run", *varying, "state", "duration", *(f"{m} final/best" for m in names)]
    table = [header]
    for run_dir, p, status, summ in rows:
        start, end = status.get("started"), status.get("ended") or time.time()
        duration = f"{end - start:.0f}s" if start else "-"
        cells = [f"{summ[m][0]:.4g}/{summ[m][1]:.4g}" if m in summ else "-" for m in names]
        state = status.get("state", RunState.UNKNOWN)
        if state == RunState.PRUNED and status.get("pruned_epoch") is not None:  # a tuning policy stopped it there
            state = f"{RunState.PRUNED}@{status['pruned_epoch']}"
        name = run_dir.name + ("*" if best and best["run_dir"] == str(run_dir) else "")
        table.append([name, *(p.get(k, "-") for k in varying), state, duration, *cells])
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    if best and study:
        lines.append(
            f"* the study's best: {study[0]}={best['objective']['value']:.6g} "
            f"({'maximize' if study[1] else 'minimize'})"
        )
    return "\n".join(lines)


def labels(sweep_dir: Path, run_dirs: Sequence[Path]) -> list[str]:
    """'3: trainer.lr=0.01' for each point: its name and the parameters that differ."""
    params = point_params(sweep_dir, run_dirs)
    varying = varying_keys(params)
    return [
        f"{d.name}: " + " ".join(f"{k}={p.get(k)}" for k in varying) if varying else d.name
        for d, p in zip(run_dirs, params)
    ]


def curves(
    run_dirs: Sequence[Path], metric: str, names: Sequence[str] | None = None
) -> list[tuple[str, list[int], list[float], bool]]:
    """(label, epochs, values, pruned) of each run that recorded ``metric``. Epochs count from
    1, as Keras prints them (``Epoch 1/3``) and ``tfrun status`` and ``watch`` show them;
    ``metrics.jsonl`` keeps Keras's own index, from 0."""
    found = []
    for run_dir, name in zip(run_dirs, names or [d.name for d in run_dirs]):
        values = epoch_series(run_dir).get(metric)
        if values:
            pruned = rundir.read_status(run_dir).get("state") == RunState.PRUNED  # a tuning policy stopped it
            found.append(
                (f"{name} (pruned)" if pruned else name, [e + 1 for e, _ in values], [v for _, v in values], pruned)
            )
    return found


def plot(run_dirs: Sequence[Path], metric: str, out: Path, names: Sequence[str] | None = None) -> Path:
    """A PNG of one metric's learning curves, one line per run."""
    drawn = curves(run_dirs, metric, names)
    if not drawn:
        raise TfrunError(f"no run under {out.parent} recorded the metric {metric!r}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, epochs, values, pruned in drawn:
        ax.plot(epochs, values, marker="o", markersize=3, label=label)
        if pruned:
            ax.plot([epochs[-1]], [values[-1]], marker="x", color="black", markersize=9, linestyle="")
    ax.set_xlabel("epoch")
    locator = ax.xaxis.get_major_locator()
    if isinstance(locator, MaxNLocator):  # the default (AutoLocator); other locators take no integer=
        locator.set_params(integer=True)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if len(drawn) <= 20:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
