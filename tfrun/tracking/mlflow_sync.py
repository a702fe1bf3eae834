"""``tracking=mlflow``: each tfrun run is one MLflow run, a sweep one parent run.

Live: the chief task opens the run when it starts (params, tags) and a background thread
sends each metric record as ``metrics.jsonl`` gains it; when the script ends the task
adds the artifacts (config, plan, logs, the saved model, the ONNX export), registers the
model if asked, and ends the MLflow run. A requeued or resumed run continues the same
MLflow run: its id is kept in the run dir (``mlflow.json``), with the time of the last
record sent. The run dir stays the truth: an MLflow server that is down never fails or
slows training (records wait in the run dir), and ``tfrun sync RUN`` or the tfrun process
that sees the run end sends whatever is missing. MLflow is imported only here, only
when asked; the client, not MLflow's global "active run", so a script's own MLflow use
is left alone.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from tfrun import rundir
from tfrun.paths import RunPaths, SweepPaths
from tfrun.states import FINAL, RunState
from tfrun.tracking import metrics, mlflow_compat, provenance
from tfrun.tracking.redact import Redactor

SEND_INTERVAL_S = 2.0
RETRY_INTERVAL_S = 30.0  # after a failed send: the server is down, do not hammer it
END_DEADLINE_S = 20.0  # how long the end of a task may wait for MLflow
_MAX_PARAM = 500  # MLflow rejects long param values; the full config is an artifact anyway
_BATCH = {"metrics": 1000, "params": 100, "tags": 100}  # MLflow's per-request limits
END_LOCK = "mlflow-end"  # held while a run's MLflow run is ended (rundir.locked: .mlflow-end.lock)
# MLflow's own run statuses (its RunStatus names): another vocabulary than tfrun's RunState,
# though two of its words are spelled alike.
MLFLOW_RUNNING = "RUNNING"
MLFLOW_FINISHED = "FINISHED"
MLFLOW_FAILED = "FAILED"
MLFLOW_KILLED = "KILLED"


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


def wanted(config: Mapping[str, Any]) -> bool:
    return bool((config.get("tracking") or {}).get("kind", "none") == "mlflow")


def _quick_failures() -> None:
    """An unreachable server answers within seconds, not after MLflow's ~2 minutes of retries."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


_READY: set[str] = set()  # SQLite stores this process has seen made (their tables created)


def client(uri: str) -> Any:
    """MLflow's client of a store. An SQLite store is made first (:func:`_sqlite_file`), and
    its tables by one process at a time: MLflow creates them on first use, and two processes
    doing it at once (the chiefs of a sweep's points) make one of them fail ("duplicate
    column name"), which would leave its run out of MLflow."""
    from mlflow import MlflowClient

    if not uri.startswith("sqlite:///") or uri in _READY:
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    with rundir.locked(Path(uri[len("sqlite:///") :])):
        _sqlite_file(uri)  # before MLflow opens it: made by SQLite, its mode would ignore the umask
        made = MlflowClient(tracking_uri=uri, registry_uri=uri)
        made.search_experiments(max_results=1)  # its first use: the tables, if missing, are made here
    _READY.add(uri)
    return made


def _sqlite_file(uri: str) -> None:
    """An SQLite store's file, made empty if missing (an empty file is an empty database):
    SQLite would make it 0644 whatever the umask, and a runs dir shared with a group needs
    the group's write permission the umask gives (its journals copy the file's mode)."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        if path.parent.is_dir() and not path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o666))


def _experiment_id(mlflow: Any, cfg: Mapping[str, Any], runs_dir: Path, name: str) -> str:
    """The experiment's id, created if needed; with the default store its artifacts stay beside the runs."""
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    location = None if cfg.get("tracking_uri") else (runs_dir / "mlartifacts").resolve().as_uri()
    try:
        return str(mlflow.create_experiment(name, artifact_location=location))
    except Exception:
        found = mlflow.get_experiment_by_name(name)  # another point of the sweep created it first
        if found is None:
            raise
        return str(found.experiment_id)


def _update(folder: Path, change: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    """Change a run's (or sweep's) ``mlflow.json`` under its lock: the chief task's sender,
    the end of the run and ``tfrun sync`` in another shell all write it."""
    return dict(rundir.update_json(RunPaths.of(folder).mlflow, change, {}))


def parent_run(cfg: Mapping[str, Any], runs_dir: Path, sweep_dir: Path) -> dict[str, Any]:
    """The sweep's parent run: created once, by whichever point gets there first."""
    marker = SweepPaths.of(sweep_dir).mlflow
    with rundir.locked(marker):  # held while creating: one parent run, whoever comes first
        known = rundir.read_json(marker)
        if known:
            return dict(known)
        uri = tracking_uri(cfg, runs_dir)
        mlflow = client(uri)
        experiment_id = _experiment_id(mlflow, cfg, runs_dir, cfg.get("experiment") or sweep_dir.name)
        run = mlflow.create_run(experiment_id, run_name=sweep_dir.name, tags={"tfrun.sweep_dir": str(sweep_dir)})
        known = {"run_id": run.info.run_id, "experiment_id": experiment_id, "tracking_uri": uri}
        rundir.write_json(marker, known)
        return known


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _log(
    mlflow: Any,
    run_id: str,
    *,
    metrics: Sequence[Any] = (),
    params: Sequence[Any] = (),
    tags: Sequence[Any] = (),
) -> None:
    for kind, items in (("params", list(params)), ("tags", list(tags)), ("metrics", list(metrics))):
        for chunk in _chunks(items, _BATCH[kind]):
            mlflow.log_batch(run_id, **{kind: chunk})


def open_run(run_dir: Path, config: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The run's MLflow run (created, with its params and tags, the first time) and its record."""
    from mlflow.entities import Param

    cfg = config["tracking"]
    runs_dir = Path(config["tfrun"]["runs_dir"])
    with rundir.locked(RunPaths.of(run_dir).mlflow):  # held while creating: one MLflow run per run
        known = rundir.read_json(RunPaths.of(run_dir).mlflow)
        if known:
            return client(known["tracking_uri"]), dict(known)
        uri = tracking_uri(cfg, runs_dir)
        mlflow = client(uri)
        sweep_dir = run_dir.parent if SweepPaths.of(run_dir.parent).index.exists() else None
        parent = parent_run(cfg, runs_dir, sweep_dir) if sweep_dir else None
        if parent:
            experiment_id = parent["experiment_id"]
        else:
            experiment_id = _experiment_id(mlflow, cfg, runs_dir, cfg.get("experiment") or "tfrun")
        # The user's tags (tfrun.tags, Experiment.submit(tags=...)) first: tfrun's own keys are its to set.
        redactor = Redactor(config)
        run_id = rundir.read_status(run_dir).get("run_id", run_dir.name)
        tags = {
            **redactor.data(config["tfrun"].get("tags") or {}),
            "tfrun.run_dir": str(run_dir),
            "tfrun.run_id": run_id,
        }
        if parent:
            tags["mlflow.parentRunId"] = parent["run_id"]
        run = mlflow.create_run(experiment_id, run_name=run_dir.name if parent else run_id, tags=tags)
        _log(mlflow, run.info.run_id, params=[Param(k, v) for k, v in flatten(params(config, redactor))])
        known = {"run_id": run.info.run_id, "experiment_id": experiment_id, "tracking_uri": uri, "sent_until": 0.0}
        rundir.write_json(RunPaths.of(run_dir).mlflow, known)
        return mlflow, known


def to_metrics(records: list[dict[str, Any]]) -> list[Any]:
    """MLflow metrics of metric records: ``log_metric`` values and each number of an epoch."""
    from mlflow.entities import Metric

    out = []
    for record in records:
        stamp = int(record.get("time", 0) * 1000)
        if record.get("name") is not None:
            out.append(Metric(str(record["name"]), float(record["value"]), stamp, int(record.get("step") or 0)))
            continue
        if record.get("epoch") is None:
            continue  # log_params records: the run's params come from its config
        for key, value in metrics.epoch_values(record).items():
            out.append(Metric(key, value, stamp, int(record["epoch"])))
    return out


class Sender:
    """Sends a run's new metric records to its MLflow run: those after ``sent_until``.

    Reads ``metrics.jsonl`` on from where it last stopped (from the start again if the
    file was replaced, as at a restore), and remembers what was sent in ``mlflow.json``,
    so each record is sent once across attempts and processes.
    """

    def __init__(self, run_dir: Path, mlflow: Any, known: dict[str, Any]):
        self.run_dir, self.mlflow, self.known = run_dir, mlflow, known
        self.tail = metrics.Tail(RunPaths.of(run_dir).metrics)
        self.unsent: list[dict[str, Any]] = []  # read, not yet accepted by MLflow

    def send(self) -> int:
        """Send what is new; the number of records sent. Raises if MLflow cannot be reached."""
        since = float(self.known.get("sent_until") or 0.0)
        fresh = [r for r in self.tail.new_records() if r.get("time", 0) > since]
        self.unsent = fresh if self.tail.restarted else [*self.unsent, *fresh]
        if not self.unsent:
            return 0
        _log(self.mlflow, self.known["run_id"], metrics=to_metrics(self.unsent))
        until = max(r.get("time", 0) for r in self.unsent)
        self.known["sent_until"] = until
        # Another sender (`tfrun sync` in another shell) may have got further: keep the later time.
        _update(self.run_dir, lambda known: known.update(sent_until=max(float(known.get("sent_until") or 0), until)))
        sent, self.unsent = len(self.unsent), []
        return sent


def params(config: Mapping[str, Any], redactor: Redactor) -> dict[str, Any]:
    """The config as the MLflow run's params: secrets masked, and without ``deps.env``
    (variables for the task, not settings of the run: a value there is often a credential)."""
    shown = {k: v for k, v in config.items() if k != "hydra"}
    if isinstance(shown.get("deps"), Mapping):
        shown["deps"] = {k: v for k, v in shown["deps"].items() if k != "env"}
    return dict(redactor.data(shown))


def _artifacts(mlflow: Any, run_id: str, run_dir: Path, redactor: Redactor) -> None:
    """The run dir's records, its logs and its model as the MLflow run's artifacts; every
    text file masked by ``redactor`` on the way (the run dir keeps the real values)."""
    with tempfile.TemporaryDirectory(prefix="tfrun-artifacts-") as temp:
        copies = Path(temp)
        paths = RunPaths.of(run_dir)
        for record in (paths.plan, paths.status, paths.attempts, paths.export):
            if record.exists():
                redactor.copy_file(record, copies / record.name)
        for folder in (paths.hydra, paths.logs, paths.provenance):
            if folder.is_dir():
                redactor.copy_tree(folder, copies / folder.name.lstrip("."))
        if any(copies.iterdir()):
            mlflow.log_artifacts(run_id, str(copies))
    outputs = RunPaths.of(run_dir).outputs
    if outputs.is_dir() and any(outputs.iterdir()):
        mlflow.log_artifacts(run_id, str(outputs), artifact_path="model")


def register(mlflow: Any, run_id: str, name: str, run_dir: Path) -> str:
    """A new version of registered model ``name`` from the run's ``model`` artifacts; its number.
    A version this run registered already is that number: an end that registered and was
    killed before writing ``mlflow.json`` does not make a second one when the end is tried again."""
    from mlflow.exceptions import MlflowException

    for version in mlflow.search_model_versions(f"name='{name}' and run_id='{run_id}'"):
        return str(version.version)
    try:
        mlflow.create_registered_model(name, description="Registered by tfrun from its runs' outputs/.")
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    source = f"{mlflow.get_run(run_id).info.artifact_uri}/model"
    tags = {
        "tfrun.run_dir": str(run_dir),
        "tfrun.onnx": str((RunPaths.of(run_dir).outputs / "model.onnx").exists()).lower(),
    }
    version = mlflow.create_model_version(name, source, run_id=run_id, tags=tags)
    return str(version.version)


def _run_tags(tags: Mapping[str, str]) -> list[Any]:
    from mlflow.entities import RunTag

    # str(): a RunState goes out as its word, a plain str as MLflow's stores expect.
    return [RunTag(key, str(value)) for key, value in tags.items()]


def _mlflow_status(state: str) -> str:
    """How a run's end is said in MLflow: completed is finished, a failure or the time limit
    failed, any other end killed."""
    if state == RunState.COMPLETED:
        return MLFLOW_FINISHED
    return MLFLOW_FAILED if state in (RunState.FAILED, RunState.TIMEOUT) else MLFLOW_KILLED


def finish(run_dir: Path, config: Mapping[str, Any], state: str) -> dict[str, Any]:
    """Send what is missing, the artifacts, the registration if asked; end the MLflow run.

    One end at a time (the chief task's, its launcher's, ``tfrun sync``'s in another
    shell): each reads ``mlflow.json`` once the one before has written it, so the model is
    registered once."""
    with rundir.locked(run_dir / END_LOCK):
        mlflow, known = open_run(run_dir, config)
        Sender(run_dir, mlflow, known).send()
        _artifacts(mlflow, known["run_id"], run_dir, Redactor(config))
        model_name = config["tracking"].get("register_model")
        if model_name and state == RunState.COMPLETED and not known.get("registered"):
            registered = {"name": model_name, "version": register(mlflow, known["run_id"], model_name, run_dir)}
            known = _update(run_dir, lambda found: found.update(registered=registered))
        tried = rundir.attempts(run_dir)
        last = provenance_tags(run_dir, str(tried[-1].get("attempt"))) if tried else {}
        _log(mlflow, known["run_id"], tags=_run_tags({**last, "tfrun.state": state}))
        mlflow.set_terminated(known["run_id"], status=_mlflow_status(state))
        return _update(run_dir, lambda found: found.update(ended=state))


def _say(message: str) -> None:
    print(f"tfrun: {message}", file=sys.stderr, flush=True)


class Live:
    """In the chief task: the run's MLflow run kept up to date while the script trains."""

    def __init__(self, run_dir: Path, config: Mapping[str, Any], attempt: str):
        self.run_dir, self.config, self.attempt = run_dir, config, attempt
        self.sender: Sender | None = None
        self.monitor: Any = None
        self.stop = threading.Event()
        self.warned = False
        self.tagged = False
        self.thread = threading.Thread(target=self._run, name="tfrun-mlflow", daemon=True)

    def start(self) -> None:
        _quick_failures()
        self.thread.start()

    def _connect(self) -> Sender:
        mlflow, known = open_run(self.run_dir, self.config)
        tags = {"tfrun.attempt": self.attempt, "tfrun.state": RunState.RUNNING, "tfrun.host": socket.gethostname()}
        if os.environ.get("SLURM_JOB_ID"):
            tags["tfrun.slurm_job_id"] = os.environ["SLURM_JOB_ID"]
        _log(mlflow, known["run_id"], tags=_run_tags(tags))
        if known.get("ended"):  # a resumed run: its MLflow run is running again
            mlflow.update_run(known["run_id"], status=MLFLOW_RUNNING)
            known.pop("ended")
            _update(self.run_dir, lambda found: found.pop("ended", None))
        if self.config["tracking"].get("system_metrics"):
            self.monitor = mlflow_compat.start_system_metrics(
                known["run_id"], known["tracking_uri"], resume=self.attempt_number() > 1
            )
        _say(f"MLflow run {known['run_id']} at {known['tracking_uri']}")
        return Sender(self.run_dir, mlflow, known)

    def attempt_number(self) -> int:
        return len(rundir.attempts(self.run_dir)) or 1

    def _round(self) -> None:
        if self.sender is None:
            self.sender = self._connect()
        if not self.tagged:  # the provenance is recorded beside the script's start, in a thread
            tags = provenance_tags(self.run_dir, self.attempt)
            _log(self.sender.mlflow, self.sender.known["run_id"], tags=_run_tags(tags))
            self.tagged = bool(tags)
        self.sender.send()
        if self.warned:
            _say("MLflow reachable again: metrics sent")
            self.warned = False

    def _run(self) -> None:
        wait = 0.0
        while not self.stop.wait(wait):
            try:
                self._round()
                wait = SEND_INTERVAL_S
            except Exception as exc:
                wait = RETRY_INTERVAL_S
                if not self.warned:
                    _say(
                        f"warning: MLflow unreachable ({type(exc).__name__}: {str(exc)[:200]}); metrics stay "
                        f"in the run dir and are sent when it answers (or `tfrun sync {self.run_dir}`)"
                    )
                    self.warned = True

    def end(self, state: str | None) -> None:
        """The script returned: last records, then artifacts and the end of the MLflow run
        (``state`` None: the run continues in a later attempt, its MLflow run stays open).
        Bounded by END_DEADLINE_S; never raises."""
        self.stop.set()
        # A stop request (state None) is in a hurry: the node may be wanted by another job.
        self.thread.join(END_DEADLINE_S if state else 5)
        if self.monitor is not None:
            mlflow_compat.stop_system_metrics(self.monitor)
        done = threading.Event()

        def last() -> None:
            try:
                metrics.flush()
                if state is None or self.warned:
                    if self.sender is not None and not self.warned:
                        self.sender.send()
                    return
                finish(self.run_dir, self.config, state)
            except Exception as exc:
                _say(
                    f"warning: could not end the MLflow run ({type(exc).__name__}: {str(exc)[:200]}); "
                    f"`tfrun sync {self.run_dir}` sends the rest"
                )
            finally:
                done.set()

        threading.Thread(target=last, name="tfrun-mlflow-end", daemon=True).start()
        if not done.wait(END_DEADLINE_S):
            _say(
                f"warning: MLflow did not answer within {END_DEADLINE_S:.0f} s; `tfrun sync {self.run_dir}` "
                "sends the rest"
            )


def provenance_tags(run_dir: Path, attempt: str) -> dict[str, str]:
    """The attempt's provenance (:func:`tfrun.tracking.provenance.read`) as MLflow tags;
    empty until rank 0's background thread has recorded it."""
    found = provenance.read(run_dir, attempt)
    if not found:
        return {}
    git = found.get("git") or {}
    tags = {
        "tfrun.git_commit": str(git.get("commit") or "none"),
        "tfrun.git_dirty": str(bool(git.get("dirty"))).lower(),
        "tfrun.source_dir": str(found.get("source_dir")),
        "tfrun.hosts": ",".join(found.get("hosts") or []),
        "tfrun.python": str((found.get("python") or {}).get("version")),
        "tfrun.packages": str((found.get("packages") or {}).get("count")),
    }
    return {k: v[:_MAX_PARAM] for k, v in tags.items()}


def start_live(run_dir: str | os.PathLike[str], config: Mapping[str, Any], attempt: str) -> Live | None:
    """In the chief task, when the run asks for MLflow: the live sync, started."""
    if not wanted(config):
        return None
    live = Live(Path(run_dir), config, attempt)
    live.start()
    return live


def sync(run_dir: str | os.PathLike[str], state: str | None = None) -> dict[str, Any]:
    """``tfrun sync RUN``: send what MLflow lacks; end the MLflow run if the run has ended."""
    from tfrun.rundir import Plan

    path = Path(run_dir)
    config = Plan.load(path).config
    if not wanted(config):
        raise ValueError(
            f"run {path} was not launched with tracking=mlflow (its tracking.kind is "
            f"{(config.get('tracking') or {}).get('kind', 'none')!r})"
        )
    _quick_failures()
    state = state or rundir.read_status(path).get("state")
    if state in FINAL:
        return finish(path, config, state)
    mlflow, known = open_run(path, config)
    Sender(path, mlflow, known).send()
    return known


def sync_if_asked(run_dir: str | os.PathLike[str], state: str) -> None:
    """When a run ended: end its MLflow run if the task could not; failures are reported, not fatal."""
    from tfrun.rundir import Plan

    path = Path(run_dir)
    if state not in FINAL:
        return
    if rundir.read_status(path).get("mlflow_run_id"):
        return
    config = Plan.load(path).config
    if not wanted(config):
        return
    known = rundir.read_json(RunPaths.of(path).mlflow) or {}
    if known.get("ended") != state:  # else the chief task ended it already
        try:
            _quick_failures()
            known = finish(path, config, state)
        except Exception as exc:  # the run's own result must not depend on the tracking server
            print(f"tfrun: warning: could not log run {path.name} to MLflow: {exc}", file=sys.stderr)
            return
    rundir.update_status(path, mlflow_run_id=known["run_id"])
    print(f"tfrun: logged to MLflow ({known['tracking_uri']}) as run {known['run_id']}", file=sys.stderr)
    if known.get("registered"):
        print(f"tfrun: {registered_text(known['registered'])}", file=sys.stderr)


def registered_text(registered: Mapping[str, Any]) -> str:
    """'registered model digits version 3 (serve it: tfrun serve models:/digits/3)'."""
    name, version = registered["name"], registered["version"]
    return f"registered model {name} version {version} (serve it: tfrun serve models:/{name}/{version})"


def registered_onnx(uri: str, tracking: str, dst: Path) -> Path:
    """The ONNX file of ``models:/NAME/VERSION``, downloaded into ``dst``."""
    from mlflow.artifacts import download_artifacts

    name, _, version = uri[len("models:/") :].rstrip("/").partition("/")
    if not name or not version:
        raise ValueError(f"{uri}: expected models:/NAME/VERSION")
    registry = client(tracking)  # its registry is the tracking store's (MLflow's default would be the cwd's)
    if version == "latest":
        version = str(max(int(v.version) for v in registry.search_model_versions(f"name='{name}'")))
    source = registry.get_model_version_download_uri(name, version)
    local = Path(download_artifacts(artifact_uri=source, dst_path=str(dst), tracking_uri=tracking))
    found = sorted(local.rglob("*.onnx")) if local.is_dir() else [local] if local.suffix == ".onnx" else []
    if not found:
        raise FileNotFoundError(f"{uri} has no .onnx file (register a run made with export=onnx)")
    return found[0]


def finish_sweep(sweep_dir: Path, failed: bool) -> None:
    """Close a sweep's parent run, if it has one (recorded in its marker: closed once)."""
    path = SweepPaths.of(sweep_dir).mlflow
    marker = rundir.read_json(path)
    if not marker or marker.get("ended"):
        return
    status = MLFLOW_FAILED if failed else MLFLOW_FINISHED
    client(marker["tracking_uri"]).set_terminated(marker["run_id"], status=status)
    rundir.update_json(path, lambda known: known.update(ended=status), {})


def finish_sweep_if_ended(sweep_dir: Path) -> None:
    """Close a sweep's parent run once every point has ended. A sweep launched with
    ``compute.wait=false`` has no launcher left to do it: whoever sees its last point end
    does (``tfrun status``, ``watch``, ``sync``, ``runs``)."""
    marker = rundir.read_json(SweepPaths.of(sweep_dir).mlflow)
    if not marker or marker.get("ended"):  # no parent run, or closed already: no point to read
        return
    states = [rundir.read_status(p).get("state") for p in rundir.sweep_points(sweep_dir)]
    if states and all(s in FINAL for s in states):
        finish_sweep(sweep_dir, failed=any(s not in (RunState.COMPLETED, RunState.PRUNED) for s in states))
