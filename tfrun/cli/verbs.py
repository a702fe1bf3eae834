"""``tfrun status|logs|cancel|runs|resume|plot|tensorboard|export|serve|env``: act on run directories,
from any shell, any day.

They read the run dir and, for Slurm runs not yet finished, ask Slurm about all the
jobs concerned in one ``sacct`` call (:mod:`tfrun.targets.control`).
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tfrun import rundir
from tfrun.errors import TfrunError
from tfrun.targets.control import cancel, refresh, run_dirs_of
from tfrun.targets.report import failure_text


def _duration(status: dict[str, Any]) -> str:
    start = status.get("started")
    if not start:
        return "-"
    return f"{(status.get('ended') or time.time()) - start:.0f}s"


def latest_epoch(run_dir: Path) -> str:
    """'epoch 7: loss=0.12 val_accuracy=0.97' from the run's metrics, or ''."""
    from tfrun.tracking import metrics

    epochs = [r for r in metrics.read_metrics(run_dir / metrics.METRICS_FILE) if r.get("epoch") is not None]
    if not epochs:
        return ""
    last = epochs[-1]
    values = " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.epoch_values(last).items()))
    return f"epoch {last['epoch'] + 1}: {values}"


def show_run(run_dir: Path, status: dict[str, Any]) -> None:
    """Everything `tfrun status` says about one run."""
    print(f"run {status.get('run_id', run_dir.name)}: {status.get('state', 'UNKNOWN')}")
    print(f"  dir: {run_dir}")
    print(f"  target: {status.get('target', '?')}  backend: {status.get('backend', '?')}  "
          f"tasks: {status.get('world_size', '?')}  duration: {_duration(status)}")
    if status.get("job_ids"):
        print(f"  slurm job: {', '.join(status['job_ids'])}  nodes: {status.get('nodes') or '-'}")
    for rank, rec in sorted(rundir.rank_records(run_dir).items()):
        if rec.get("ended") is not None:
            end = f"exit {rec.get('exit_code')}"
        else:
            end = "killed before it finished" if status.get("state") in rundir.FINAL_STATES else "running"
        print(f"  rank {rank}: {rec.get('host', '?')} pid {rec.get('pid', '?')} {end}")
    latest = latest_epoch(run_dir)
    if latest:
        print("  latest epoch: " + latest)
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
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(attempt["started"])) if attempt.get("started") else "-"
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


def cmd_status(args: argparse.Namespace) -> int:
    path = rundir.find_run(args.run)
    dirs = run_dirs_of(path)
    statuses = refresh(dirs)
    if args.full:
        for run_dir, status in zip(dirs, statuses):
            show_run(run_dir, status)
            show_attempts(run_dir)
        return 0
    if len(dirs) == 1 and rundir.is_run_dir(path):
        show_run(dirs[0], statuses[0])
        return 0
    print(f"sweep {path}: {len(dirs)} run(s)")
    for run_dir, status in zip(dirs, statuses):
        jobs = ",".join(status.get("job_ids") or []) or "-"
        extra = f"  rank {status['failed_rank']}: {status.get('reason')}" if status.get("failed_rank") is not None else ""
        print(f"  {run_dir.name:>4}  {status.get('state', 'UNKNOWN'):<10} job {jobs:<10} {_duration(status):>6}{extra}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    path = rundir.find_run(args.run)
    run_dir = run_dirs_of(path)[0] if not rundir.is_run_dir(path) else path
    log = rundir.rank_log(run_dir, args.rank)
    offset = 0
    while True:
        if log.exists():
            with open(log, "rb") as f:
                f.seek(offset)
                data = f.read()
            offset += len(data)
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        if not args.follow:
            return 0 if log.exists() else 1
        if refresh([run_dir])[0].get("state") in rundir.FINAL_STATES:
            args.follow = False  # one last read for what landed before the end
            continue
        time.sleep(1.0)


def cmd_cancel(args: argparse.Namespace) -> int:
    for what in cancel(rundir.find_run(args.run)):
        print(f"tfrun: cancelled {what}")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    """Launch a stopped, cancelled, failed or timed-out run again in its own run dir."""
    from tfrun import targets
    from tfrun.plan import Plan
    from tfrun.targets.report import print_outcome

    path = rundir.find_run(args.run)
    status = refresh([path])[0]
    if status.get("state") not in rundir.FINAL_STATES or status.get("state") == "COMPLETED":
        raise TfrunError(f"run {path} is {status.get('state', 'UNKNOWN')}: only a stopped, cancelled, failed "
                         f"or timed-out run can be resumed")
    plan = Plan.load(path)
    print(f"tfrun: resuming {plan.run_id} (it continues from its last backup)", file=sys.stderr)
    state = targets.get(plan.target).run(plan)
    print_outcome(plan, state)
    return 0 if state in rundir.OK_STATES else 1


def cmd_plot(args: argparse.Namespace) -> int:
    from tfrun.tracking.compare import labels, plot

    path = rundir.find_run(args.run)
    dirs = run_dirs_of(path)
    out = Path(args.output) if args.output else path / f"plot-{args.metric}.png"
    print(plot(dirs, args.metric, out, labels(path, dirs)))
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    if args.sweep:
        from tfrun.tracking.compare import sweep_table

        sweep = rundir.find_run(args.sweep)
        dirs = run_dirs_of(sweep)
        print(sweep_table(sweep, dirs, refresh(dirs), sort=args.sort))
        return 0
    root = rundir.runs_root(args.runs_dir)
    dirs = list(rundir.iter_runs(root))[-args.last:]
    statuses = refresh(dirs)
    print(f"{'RUN':<34} {'STATE':<10} {'BACKEND':<8} {'COMPUTE':<8} {'JOBS':<10} DURATION")
    for run_dir, status in zip(dirs, statuses):
        run_id = status.get("run_id") or run_dir.name
        jobs = ",".join(status.get("job_ids") or []) or "-"
        print(f"{run_id:<34} {status.get('state', 'UNKNOWN'):<10} {status.get('backend', '?'):<8} "
              f"{status.get('target', '?'):<8} {jobs:<10} {_duration(status)}")
    return 0


def cmd_tensorboard(args: argparse.Namespace) -> int:
    """TensorBoard over a sweep's (or a run's) events, each run named by its differing parameters."""
    import tempfile

    from tfrun.tracking import board

    try:
        path = rundir.find_run(args.run)
        if not board.is_run_or_sweep(path):
            raise TfrunError(f"{path} is neither a run dir nor a sweep dir")
        runs = board.board_runs(path, run_dirs_of(path))
    except TfrunError as exc:
        print(f"tfrun: error: {exc}", file=sys.stderr)
        return 2
    if not board.available():
        raise TfrunError("TensorBoard is not installed here: pip install tensorboard")
    links = board.link_runs(runs, Path(tempfile.mkdtemp(prefix="tfrun-tensorboard-")))
    cmd = board.command(links, args.host, args.port)
    print(board.describe(runs, cmd), file=sys.stderr)
    # tfrun.log_metric values become TensorBoard scalars here, not in the task (a child
    # process: converting imports TensorFlow, which tfrun's CLI never does).
    convert = [sys.executable, "-m", "tfrun.tracking.board", *(str(r.run_dir) for r in runs)]
    if args.print_command:  # the links stay: the command is meant to be run
        if any(board.has_values(r.run_dir) for r in runs):
            subprocess.run(convert, stdin=subprocess.DEVNULL, check=False)
        print(shlex.join(cmd))
        return 0
    return _serve_tensorboard(cmd, links, [convert[0], *convert[1:3], "--every", "5", *convert[3:]])


def _serve_tensorboard(cmd: list[str], links: Path, convert: list[str]) -> int:
    """Run TensorBoard (and the conversion of logged values, every few seconds) until it
    ends or tfrun is stopped; then remove its dir of links."""
    import shutil
    import signal

    converter = subprocess.Popen(convert, stdin=subprocess.DEVNULL)
    child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    # A SIGTERM to tfrun ends TensorBoard too: as an exit, the `finally` below runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        return child.wait()
    except KeyboardInterrupt:  # Ctrl-C: TensorBoard, in the same process group, got it too
        return 130
    finally:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if converter.poll() is None:
            converter.terminate()
            converter.wait()
        shutil.rmtree(links, ignore_errors=True)


def cmd_export(args: argparse.Namespace) -> int:
    """Convert a finished run's model to ONNX and check it (tfrun/model/export.py)."""
    from tfrun.cli.watch import step
    from tfrun.model import export

    with step("exporting the model to ONNX and checking it against the model"):
        return export.cmd_export(args.run, opset=args.opset, tolerance=args.tolerance, samples=args.samples,
                                 model=args.model, output=args.output)


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a run's ONNX model over HTTP (tfrun/model/serve.py)."""
    from tfrun.model import serve

    return serve.cmd_serve(args.run, host=args.host, port=args.port, model=args.model, tracking_uri=args.tracking_uri)


def cmd_sync(args: argparse.Namespace) -> int:
    """Send a run's (or each point's) metrics, artifacts and end state to MLflow (tracking/mlflow_sync.py)."""
    from tfrun.tracking import mlflow_sync

    dirs = run_dirs_of(rundir.find_run(args.run))
    code = 0
    for run_dir, status in zip(dirs, refresh(dirs)):
        try:
            known = mlflow_sync.sync(run_dir, status.get("state"))
        except ValueError as exc:
            print(f"tfrun: error: {exc}", file=sys.stderr)
            return 2
        except Exception as exc:
            print(f"tfrun: {run_dir.name}: MLflow unreachable ({type(exc).__name__}: {str(exc)[:300]}); "
                  "nothing lost: the run dir keeps everything, run tfrun sync again later", file=sys.stderr)
            code = 1
            continue
        ended = f", ended {known['ended']}" if known.get("ended") else ", still running"
        print(f"{run_dir.name}: MLflow run {known['run_id']} at {known['tracking_uri']} up to date{ended}")
    return code


def _human(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def _when(stamp: float) -> str:
    days = (time.time() - stamp) / 86400
    ago = f"{days:.0f} d ago" if days >= 1 else f"{days * 24:.0f} h ago" if days * 24 >= 1 else "just now"
    return f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(stamp))} ({ago})"


def cmd_env(args: argparse.Namespace) -> int:
    """``tfrun env list`` / ``tfrun env prune [--older-than DAYS] [--all]``: the environment
    cache of deps=pip|conda (tfrun/deps/cache.py)."""
    from tfrun.deps import cache

    root = cache.cache_root(args.cache_dir)
    if args.action == "list":
        rows = cache.entries(root)
        print(f"{'KEY':<22} {'KIND':<6} {'SIZE':>9}  {'LAST USED':<28} PACKAGES")
        for row in rows:
            packages = " ".join(row["packages"]) if row["complete"] else "(unfinished build)"
            print(f"{row['key']:<22} {row['kind']:<6} {_human(row['size']):>9}  {_when(row['last_used']):<28} {packages}")
        print(f"{len(rows)} environment(s), {_human(sum(r['size'] for r in rows))} in {root}")
        return 0
    older_than, remove_all = getattr(args, "older_than", None), getattr(args, "all", False)
    done = cache.prune(root, older_than, remove_all)
    for key in done["removed"]:
        print(f"tfrun: removed {key}")
    for key in done["busy"]:
        print(f"tfrun: kept {key}: another process is building or removing it")
    hint = "" if remove_all or older_than is not None else " (--older-than DAYS or --all remove environments)"
    print(f"tfrun: removed {len(done['removed'])}, kept {len(done['kept']) + len(done['busy'])} in {root}{hint}")
    return 0


def parser() -> argparse.ArgumentParser:
    """The verbs' command line."""
    p = argparse.ArgumentParser(prog="tfrun", description="Inspect and control tfrun runs.")
    sub = p.add_subparsers(dest="verb", required=True)
    run_help = "run or sweep dir, run id, unique part of an id (default: the latest run)"
    s = sub.add_parser("status", help="state of a run or sweep, per rank; why it failed")
    s.add_argument("run", nargs="?", help=run_help)
    s.add_argument("--full", action="store_true",
                   help="also each attempt: git commit (dirty?), hosts, Slurm job, Python, packages")
    s.set_defaults(func=cmd_status)
    from tfrun.cli import watch

    watch.add_parser(sub)  # tfrun/cli/watch.py
    s = sub.add_parser("logs", help="a rank's log")
    s.add_argument("run", nargs="?", help=run_help)
    s.add_argument("--rank", type=int, default=0)
    s.add_argument("-f", "--follow", action="store_true", help="keep printing until the run ends")
    s.set_defaults(func=cmd_logs)
    s = sub.add_parser("cancel", help="cancel a run or every unfinished point of a sweep")
    s.add_argument("run", nargs="?", help=run_help)
    s.set_defaults(func=cmd_cancel)
    s = sub.add_parser("resume", help="continue a stopped (or failed, cancelled, timed-out) run from its backup")
    s.add_argument("run", nargs="?", help=run_help)
    s.set_defaults(func=cmd_resume)
    s = sub.add_parser("runs", help="recent runs")
    s.add_argument("--runs-dir", help="where runs are (default: $TFRUN_RUNS_DIR or ./tfrun-runs)")
    s.add_argument("--last", type=int, default=20, help="how many to show")
    s.add_argument("--sweep", help="a sweep (dir or id): its runs with the parameters that differ and their metrics")
    s.add_argument("--sort", help="with --sweep: order by this metric's final value, best first")
    s.set_defaults(func=cmd_runs)
    s = sub.add_parser("plot", help="PNG of a metric's learning curves, one line per run")
    s.add_argument("run", nargs="?", help=run_help)
    s.add_argument("--metric", default="loss")
    s.add_argument("-o", "--output", help="PNG path (default: plot-METRIC.png in the run or sweep dir)")
    s.set_defaults(func=cmd_plot)
    s = sub.add_parser("tensorboard", help="TensorBoard over a sweep's runs, named by the parameters that differ")
    s.add_argument("run", nargs="?", help=run_help)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    s.add_argument("--port", type=int, default=6006, help="port to serve on")
    s.add_argument("--print-command", action="store_true",
                   help="print the TensorBoard command (its dir of links is kept) and exit")
    s.set_defaults(func=cmd_tensorboard)
    s = sub.add_parser("export", help="convert a finished run's model to ONNX and check it against the model")
    s.add_argument("run", nargs="?", help=run_help)
    s.add_argument("--opset", type=int, help="ONNX opset (default: the run's export.opset, else 17)")
    s.add_argument("--tolerance", type=float, help="largest max abs difference allowed (default 1e-4)")
    s.add_argument("--samples", type=int, help="random inputs compared (default 16)")
    s.add_argument("--model", help="the model, relative to outputs/ (default: found there)")
    s.add_argument("--output", help="file name written in outputs/ (default model.onnx)")
    s.set_defaults(func=cmd_export)
    s = sub.add_parser("sync", help="send MLflow what a run (tracking=mlflow) recorded and it lacks")
    s.add_argument("run", nargs="?", help=run_help)
    s.set_defaults(func=cmd_sync)
    s = sub.add_parser("serve", help="serve a run's outputs/model.onnx (or a registered models:/NAME/VERSION) "
                                     "over HTTP with onnxruntime")
    s.add_argument("run", nargs="?", help=run_help + "; or models:/NAME/VERSION from MLflow's registry")
    s.add_argument("--tracking-uri", help="MLflow of models:/ (default: $MLFLOW_TRACKING_URI, else the "
                                          "runs dir's mlflow.db)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    s.add_argument("--port", type=int, default=8080, help="port (0: any free one)")
    s.add_argument("--model", help="an .onnx file to serve instead (relative to the run's outputs/)")
    s.set_defaults(func=cmd_serve)
    s = sub.add_parser("env", help="the cached environments of deps=pip|conda: list, prune")
    env_sub = s.add_subparsers(dest="action", required=True)
    cache_help = "the cache (default: $TFRUN_ENV_CACHE or ~/.cache/tfrun/envs)"
    e = env_sub.add_parser("list", help="every environment: hash, packages, size, last used")
    e.add_argument("--cache-dir", help=cache_help)
    e = env_sub.add_parser("prune", help="remove unfinished builds, and environments unused for DAYS (or all)")
    e.add_argument("--cache-dir", help=cache_help)
    e.add_argument("--older-than", type=float, metavar="DAYS", help="also remove environments unused for DAYS days")
    e.add_argument("--all", action="store_true", help="remove every environment")
    s.set_defaults(func=cmd_env)
    # `tfrun tune` composes and runs a multirun again: tfrun.cli.main does it, with this parser.
    s = sub.add_parser("tune", help="tuning studies of hydra/sweeper=tfrun")
    tune_sub = s.add_subparsers(dest="action", required=True)
    t = tune_sub.add_parser("resume", help="follow a study again after its tfrun was stopped or killed: trials "
                                           "still running are followed, ended ones told, missing ones started")
    t.add_argument("sweep", help="the study's sweep dir, its id, or a unique part of it")
    return p


def main(argv: list[str]) -> int:
    """Run a verb; errors are one line and exit 1."""
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except TfrunError as exc:
        print(f"tfrun: error: {exc}", file=sys.stderr)
        return 1
