"""The run directory's records: the plan it holds, the status file, per-rank records,
attempts, and lookup by id.

The run dir is the job's shared memory; where each of its files is, is
:class:`tfrun.paths.RunPaths`'s to say, and what they hold is this module's:
:class:`Plan` is what ``plan.json`` holds (written by the launcher, read by every task's
bootstrap), so it lives here, below both. Everything is written atomically (temp file +
rename) so that a reader on another node, or a kill at any moment, never sees half a file.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import json
import os
import secrets
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from tfrun import variables
from tfrun.errors import UsageError
from tfrun.paths import RunPaths, SweepPaths, is_run_dir
from tfrun.states import RunState

LAUNCHED = "launched"  # status.json: when the run was first submitted or started (written once)


@dataclass(frozen=True)
class Task:
    """One process of the run."""

    rank: int
    local_rank: int
    node_index: int
    role: str  # worker, chief, ps, evaluator
    role_index: int
    runs_script: bool  # false for tasks that only serve (parameter servers)
    argv: list[str]  # sys.argv the script sees
    env: dict[str, str]  # variables tfrun sets in this task (hosts and ports are filled in the task)
    gpus: str | None  # CUDA_VISIBLE_DEVICES when known at plan time (local), else None
    tf_config: dict[str, Any] | None  # TF_CONFIG with host/port placeholders


@dataclass(frozen=True)
class Plan:
    """Everything the run will do, as plain data."""

    run_id: str
    run_dir: str
    target: str  # compute target: local or slurm
    backend: str
    script: str
    source_dir: str
    python: str
    command: list[str]  # what each task's process runs (before the bootstrap takes over)
    tasks: list[Task]
    config: dict[str, Any]  # the composed, resolved config
    request: dict[str, Any] = field(default_factory=dict)  # launcher-specific (sbatch text, ...)
    warnings: list[str] = field(default_factory=list)  # things that will run but probably not as meant
    deps: dict[str, Any] = field(default_factory=dict)  # the environment (a tfrun.deps DepsPlan as data)

    @property
    def output_dir(self) -> str:
        """Where the script should write what it produces."""
        return str(RunPaths.of(self.run_dir).outputs)

    @property
    def compute(self) -> dict[str, Any]:
        """The composed compute section."""
        return self.config["compute"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    def save(self) -> Path:
        """Write plan.json into the run dir atomically."""
        path = RunPaths.of(self.run_dir).plan
        write_json(path, self.to_dict())
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Plan":
        """Inverse of :meth:`to_dict`."""
        fields = dict(data)
        fields["tasks"] = [Task(**t) for t in data["tasks"]]
        return cls(**fields)

    @classmethod
    def load(cls, run_dir: str | os.PathLike[str]) -> "Plan":
        """Read plan.json from a run dir."""
        return cls.from_dict(json.loads(RunPaths.of(run_dir).plan.read_text()))


def _new_file(folder: Path, prefix: str) -> tuple[int, Path]:
    """A new file of a name of its own in ``folder``, open for writing, with the permissions
    any other file of the user's gets (mode 0666 less the umask, the folder's default ACL):
    ``tempfile.mkstemp`` makes it 0600, which a run dir or an environment cache shared with
    a group cannot use."""
    while True:
        path = folder / f"{prefix}{secrets.token_hex(6)}.tmp"
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue


def write_atomic(path: str | os.PathLike[str], data: bytes | str, durable: bool = False) -> None:
    """Write a file atomically: readers (on any node) see the old file or the new one, never
    a part; the temporary file has a name of its own, so concurrent writers of one path do
    not trip over each other's, and a writer killed midway leaves the old file. The file
    follows the umask, like any file the user writes. ``durable``: on disk when this returns
    (the file, then its directory's entry), so that a machine that crashes does not leave
    the new name on an empty file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_file(path.parent, f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        sync_dir(path.parent)


def sync_dir(folder: str | os.PathLike[str]) -> None:
    """Put a directory's entries (a file renamed into it) on disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str | os.PathLike[str], data: Any, durable: bool = False) -> None:
    """Write JSON atomically (:func:`write_atomic`)."""
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True, default=str) + "\n", durable)


@contextlib.contextmanager
def locked(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock for updating ``path`` (``flock`` on ``.<name>.lock`` beside it;
    the kernel drops it if the holder dies). Where the filesystem has no locks (some NFS
    mounts without lockd answer ENOLCK), updates go on unlocked: concurrent updates of one
    file can then lose a field, as they could before locks."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
            held = True
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            held = False
        try:
            yield
        finally:
            if held:
                fcntl.flock(handle, fcntl.LOCK_UN)


def update_json(path: str | os.PathLike[str], change: Callable[[Any], None], default: Any = None) -> Any:
    """Change a JSON file that several processes write: ``change`` gets what the file holds
    (a copy of ``default`` if there is no file) and changes it in place; read, change and
    write happen under the file's lock (:func:`locked`), so no writer's change is lost. What
    was written."""
    with locked(path):
        data = read_json(path, copy.deepcopy(default))
        change(data)
        write_json(path, data)
    return data


def read_json(path: str | os.PathLike[str], default: Any = None) -> Any:
    """Read a JSON file, or ``default`` if it does not exist."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return default


def update_rank(run_dir: str | os.PathLike[str], rank: int, **fields: Any) -> None:
    """Merge fields into a rank's record. Only that rank writes it."""
    path = RunPaths.of(run_dir).rank_record(rank)
    record = read_json(path, {"rank": rank})
    record.update(fields)
    write_json(path, record)


def attempts(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every attempt of the run (start, end, reason, requeued), oldest first."""
    records = read_json(RunPaths.of(run_dir).attempts, {}).values()
    return sorted(records, key=lambda a: a.get("started") or 0)


def update_attempt(run_dir: str | os.PathLike[str], key: str, **fields: Any) -> None:
    """Merge fields into one attempt's record (rank 0, and a pack's runner)."""
    update_json(
        RunPaths.of(run_dir).attempts, lambda records: records.setdefault(key, {"attempt": key}).update(fields), {}
    )


def read_status(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The run's status file, or an empty dict."""
    return read_json(RunPaths.of(run_dir).status, {})


def update_status(run_dir: str | os.PathLike[str], **fields: Any) -> dict[str, Any]:
    """Merge fields into the status file. Several processes write it (the launcher, a pack's
    runner, a follower in another shell, the verbs, MLflow's sync): each merge is one
    read-modify-write under the file's lock, so none is lost.

    The first time a run is submitted or started, that time is kept as ``launched`` and never
    changed (a requeue or a resume starts it again, but it stays the run it was): the order
    of runs (:func:`iter_runs`, the latest run of :func:`find_run`) is by it."""

    def merge(status: dict[str, Any]) -> None:
        status.update(fields, updated=time.time())
        first = status.get("submitted") or status.get("started")
        if first and not status.get(LAUNCHED):
            status[LAUNCHED] = first

    return dict(update_json(RunPaths.of(run_dir).status, merge, {}))


def update_point(sweep_dir: str | os.PathLike[str], run_dir: str | os.PathLike[str], **fields: Any) -> None:
    """Merge fields into one point's entry of a sweep's index (its state, its objective)."""

    def merge(index: dict[str, Any]) -> None:
        for point in index["points"]:
            if point["run_dir"] == str(run_dir):
                point.update(fields)

    update_json(SweepPaths.of(sweep_dir).index, merge, {"points": []})


def hang_fields(run_dir: str | os.PathLike[str], state: str) -> dict[str, Any]:
    """A run's final fields when its watchdog found a hang and ended it (not requeued): FAILED,
    with the rank that stopped first as the failed rank and the watchdog's account as reason;
    else nothing."""
    return settled_hang(read_status(run_dir).get("hang"), state)


def settled_hang(hang: dict[str, Any] | None, state: str) -> dict[str, Any]:
    """:func:`hang_fields` of a hang record (``status.json``'s ``hang``): a requeue Slurm
    refused is said in the reason."""
    if not hang or hang.get("requeued") or state == RunState.COMPLETED:
        return {}
    reason = f"hang: {hang['reason']}"
    if hang.get("requeue_failed"):
        reason += f"; not requeued: {hang['requeue_failed']}"
    return {"state": RunState.FAILED, "failed_rank": hang["rank"], "host": hang.get("host"), "reason": reason}


def pruned_fields(run_dir: str | os.PathLike[str], state: str) -> dict[str, Any]:
    """A trial that stopped because its tuning policy pruned it (``prune.json`` in its run dir):
    PRUNED, at which epoch and why, whatever the scheduler called the stop; else nothing."""
    if state not in (RunState.FAILED, RunState.STOPPED, RunState.CANCELLED):
        return {}
    prune = read_json(RunPaths.of(run_dir).prune)
    if not prune:
        return {}
    return {
        "state": RunState.PRUNED,
        "failed_rank": None,
        "pruned_epoch": prune.get("epoch"),
        "reason": f"pruned by policy {prune.get('policy')} at epoch {prune.get('epoch')}: {prune.get('why')}",
    }


def rank_records(run_dir: str | os.PathLike[str]) -> dict[int, dict[str, Any]]:
    """Every rank's record, by rank."""
    records = {}
    for path in sorted(RunPaths.of(run_dir).ranks.glob("*.json")):
        data = read_json(path)
        if data is not None:
            records[int(data["rank"])] = data
    return records


def tail(path: str | os.PathLike[str], lines: int = 20) -> str:
    """The last lines of a text file ('' if it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def process_started(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), or None if there is none. A pid
    and its start time name one process: pids are reused, the pair is not."""
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, ValueError):
        return None


def hostname() -> str:
    """This node's name as Slurm knows it, else the machine's."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def runs_root(runs_dir: str | None = None) -> Path:
    """Where run dirs are looked up: :data:`tfrun.variables.RUNS_DIR`, else ./tfrun-runs."""
    return Path(runs_dir or os.environ.get(variables.RUNS_DIR) or "tfrun-runs")


def sweep_points(path: Path) -> list[Path]:
    """The run dirs of a sweep dir, in point order ([] for anything else)."""
    try:
        points = [p for p in path.iterdir() if p.is_dir() and is_run_dir(p)]
    except OSError:  # not a dir, or not readable
        return []
    return sorted(points, key=lambda p: (len(p.name), p.name))


def is_sweep_dir(path: Path) -> bool:
    """A sweep dir has an index of its points, or run dirs in it."""
    return SweepPaths.of(path).index.is_file() or bool(sweep_points(path))


def launched(path: Path) -> float:
    """When a run was launched (its first submission or start, :func:`update_status`); a sweep
    when its first point was. For a run dir of an older tfrun, or one whose status was never
    written, the best known time: its last start, else when its plan was written."""
    if not is_run_dir(path):
        times = [launched(p) for p in sweep_points(path)]
        return min(times) if times else _mtime(path)
    try:
        status = read_status(path)
    except (OSError, ValueError):  # unreadable: placed by its files' time
        status = {}
    for key in (LAUNCHED, "submitted", "started"):
        if isinstance(status.get(key), (int, float)):
            return float(status[key])
    return _mtime(RunPaths.of(path).plan)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _entries(root: Path) -> list[Path]:
    """The runs and sweeps directly under root, in the order they were launched."""
    try:
        found = [p for p in root.iterdir() if p.is_dir() and (is_run_dir(p) or is_sweep_dir(p))]
    except OSError:  # no runs dir (yet)
        return []
    return sorted(found, key=lambda p: (launched(p), p.name))


def iter_runs(root: Path) -> Iterator[Path]:
    """Every run dir under root (single runs and sweep points), in the order they were
    launched (a sweep's points together, where its first point is)."""
    for entry in _entries(root):
        if is_run_dir(entry):
            yield entry
        else:
            yield from sweep_points(entry)


def find_run(ref: str | None, root: Path | None = None) -> Path:
    """A run (or sweep) dir from a path, an id, a unique part of an id, or the one launched last."""
    root = root or runs_root()
    if ref and Path(ref).is_dir():
        path = Path(ref)
        if not (is_run_dir(path) or is_sweep_dir(path)):
            raise UsageError(f"{path} is neither a run dir nor a sweep dir")
        return path
    candidates = _entries(root)
    if not ref:
        if not candidates:
            raise UsageError(f"no runs under {root} (set {variables.RUNS_DIR} or pass a run dir)")
        return candidates[-1]
    if (root / ref).is_dir() and (is_run_dir(root / ref) or is_sweep_dir(root / ref)):
        return root / ref
    matches = [p for p in candidates if ref in p.name]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise UsageError(f"no run matches {ref!r} under {root}")
    raise UsageError(f"{ref!r} matches several runs: " + ", ".join(p.name for p in matches[:10]))


def find_one_run(ref: str | None, root: Path | None = None) -> Path:
    """A run dir (not a sweep): :func:`find_run`, for the verbs that act on one run."""
    path = find_run(ref, root)
    if not is_run_dir(path):
        points = sweep_points(path)
        example = f" ({points[0]}, ...)" if points else ""
        raise UsageError(f"{path} is a sweep dir: name one of its runs{example}")
    return path
