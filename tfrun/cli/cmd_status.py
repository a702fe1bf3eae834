"""``tfrun status [RUN] [--full]``: the state of a run or sweep, per rank, and why it failed."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from tfrun import rundir
from tfrun.cli.common import add_run, duration
from tfrun.paths import RunPaths, is_run_dir
from tfrun.runner.control import refresh, run_dirs_of
from tfrun.states import FINAL, RunState
from tfrun.targets.report import failure_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``status``'s arguments."""
    add_run(parser)
    parser.add_argument(
        "--full", action="store_true", help="also each attempt: git commit (dirty?), hosts, Slurm job, Python, packages"
    )


def latest_epoch(run_dir: Path) -> str:
    """'epoch 7: loss=0.12 val_accuracy=0.97' from the run's metrics, or ''."""
    from tfrun.tracking import metrics

    epochs = [r for r in metrics.read_metrics(RunPaths.of(run_dir).metrics) if r.get("epoch") is not None]
    if not epochs:
        return ""
    last = epochs[-1]
    values = " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.epoch_values(last).items()))
    return f"epoch {last['epoch'] + 1}: {values}"


def rank_state(record: dict[str, Any], state: str | None) -> str:
    """How a rank's task ended, or that it runs: only while its run is RUNNING (a preempted or
    requeued run waits with no task running; its ranks' records are the last attempt's)."""
    if record.get("ended") is not None:
        return f"exit {record.get('exit_code')}"
    if state in FINAL:
        return "killed before it finished"
    return "running" if state == RunState.RUNNING else f"not running (the run is {state or RunState.UNKNOWN})"


def show_run(run_dir: Path, status: dict[str, Any]) -> None:
    """Everything `tfrun status` says about one run."""
    print(f"run {status.get('run_id', run_dir.name)}: {status.get('state', RunState.UNKNOWN)}")
    print(f"  dir: {run_dir}")
    name = (rundir.read_json(RunPaths.of(run_dir).plan) or {}).get("config", {}).get("tfrun", {}).get("name")
    if name:
        print(f"  name: {name}")
    print(
        f"  target: {status.get('target', '?')}  backend: {status.get('backend', '?')}  "
        f"tasks: {status.get('world_size', '?')}  duration: {duration(status)}"
    )
    if status.get("job_ids"):
        print(f"  slurm job: {', '.join(status['job_ids'])}  nodes: {status.get('nodes') or '-'}")
    for rank, rec in sorted(rundir.rank_records(run_dir).items()):
        print(f"  rank {rank}: {rec.get('host', '?')} pid {rec.get('pid', '?')} {rank_state(rec, status.get('state'))}")
    latest = latest_epoch(run_dir)
    if latest:
        print("  latest epoch: " + latest)
    for note in (status.get("watchdog") or {}).get("notes", []):  # what the hang watchdog cannot watch
        print(f"  watchdog: {note}")
    if status.get("failed_rank") is not None:
        print("  " + failure_text(str(run_dir), status).replace("\n", "\n  "))
    elif status.get("reason"):
        print(f"  reason: {status['reason']}")
    if status.get("export"):
        from tfrun.model.export import summary

        print(f"  {summary(status['export'])}")


def show_attempts(run_dir: Path) -> None:
    """`tfrun status --full`: each attempt with where it came from (tfrun/tracking/provenance.py)."""
    from tfrun.tracking import provenance

    tried = rundir.attempts(run_dir)
    print(f"  attempts: {len(tried)}")
    for attempt in tried:
        key = str(attempt.get("attempt"))
        started = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(attempt["started"])) if attempt.get("started") else "-"
        )
        print(f"  attempt {key}: started {started}, {attempt.get('reason') or 'running'}")
        prov = provenance.read(run_dir, key)
        if not prov:
            print("    provenance: not recorded (yet)")
            continue
        git = prov["git"]
        commit = git["commit"] or f"none ({git['error'] or 'not a git repo'})"
        if git["dirty"]:
            commit += f" dirty ({run_dir / git['diff_file']})"
        if git["untracked"]:
            commit += f", {len(git['untracked'])} untracked file(s)"
        print(f"    commit: {commit}  (in {prov['source_dir']})")
        print(f"    hosts: {','.join(prov['hosts'])}  slurm job: {prov['job_id'] or '-'}")
        print(f"    python: {prov['python']['version']} {prov['python']['executable']}")
        print(f"    packages: {prov['packages']['count']} ({run_dir / prov['packages']['file']})")


def run(args: argparse.Namespace) -> int:
    """Print the state of the run or sweep."""
    path = rundir.find_run(args.run)
    dirs = run_dirs_of(path)
    statuses = refresh(dirs)
    if args.full:
        for run_dir, status in zip(dirs, statuses):
            show_run(run_dir, status)
            show_attempts(run_dir)
        return 0
    if len(dirs) == 1 and is_run_dir(path):
        show_run(dirs[0], statuses[0])
        return 0
    print(f"sweep {path}: {len(dirs)} run(s)")
    for run_dir, status in zip(dirs, statuses):
        jobs = ",".join(status.get("job_ids") or []) or "-"
        extra = (
            f"  rank {status['failed_rank']}: {status.get('reason')}" if status.get("failed_rank") is not None else ""
        )
        state = status.get("state", RunState.UNKNOWN)
        print(f"  {run_dir.name:>4}  {state:<10} job {jobs:<10} {duration(status):>6}{extra}")
    return 0
