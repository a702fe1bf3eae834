"""The environment cache (``deps.cache_dir``): where each environment lives, the file lock that
makes concurrent runs build it once, and what is there (``tfrun env list|prune``).

Layout::

    pip-<hash>/             a finished environment; tfrun-env.json inside says what it holds
    .tmp-pip-<hash>-<pid>/  a build in progress
    .locks/<key>.lock       held while building or removing <key>, and while a run records its use
    .specs/<key>.json       what a job will build (deps.build_on=job)
    .users/<key>/<id>.json  a run that uses <key>: its run dir and the process that launched it

``tfrun env prune`` removes an environment only when none of the runs that recorded its use
may still start a task: the caller judges them (:func:`prune`'s ``in_use``), from their
status and the scheduler's.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from tfrun import rundir, variables

DEFAULT_CACHE = "~/.cache/tfrun/envs"
META = "tfrun-env.json"  # written last: an environment without it is unfinished
LAST_USED = ".tfrun-last-used"  # touched by every run that uses the environment
BUILD_LOG = "tfrun-build.log"


def cache_root(value: Any = None) -> Path:
    """The environment cache: ``value``, else :data:`tfrun.variables.ENV_CACHE`, else ~/.cache/tfrun/envs."""
    return Path(str(value or os.environ.get(variables.ENV_CACHE) or DEFAULT_CACHE)).expanduser().absolute()


def is_complete(env: Path) -> bool:
    """A finished environment: its META is written last (and a pip env appears by rename)."""
    return (env / META).is_file()


def spec_file(cache: Path, key: str) -> Path:
    """Where a job finds the plan of the environment it builds (deps.build_on=job)."""
    return cache / ".specs" / f"{key}.json"


@contextmanager
def lock(cache: Path, key: str, blocking: bool = True, on_wait: Callable[[], None] | None = None) -> Iterator[bool]:
    """Hold ``.locks/<key>.lock`` (flock: released by the kernel if the holder dies); yields False if
    not ``blocking`` and another process holds it."""
    (cache / ".locks").mkdir(parents=True, exist_ok=True)
    with open(cache / ".locks" / f"{key}.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not blocking:
                yield False
                return
            if on_wait:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def touch_used(env: Path) -> None:
    try:
        (env / LAST_USED).touch()
    except OSError:  # a read-only shared cache still serves (and nobody can prune it)
        pass


def users_dir(cache: Path, key: str) -> Path:
    """Where the runs that use environment ``key`` are recorded."""
    return cache / ".users" / key


def record_use(cache: Path, key: str, run_dir: str) -> None:
    """Record that the run in ``run_dir`` uses environment ``key``, with the process launching
    it (it has no status yet). The caller holds the key's lock, so a prune deciding meanwhile
    sees the record or removed the environment before it was used."""
    resolved = str(Path(run_dir).resolve())
    record = {
        "run_dir": resolved,
        "recorded": time.time(),
        "launcher_host": rundir.hostname(),
        "launcher_pid": os.getpid(),
        "launcher_started": rundir.process_started(os.getpid()),
    }
    name = hashlib.sha256(resolved.encode()).hexdigest()[:16]
    try:
        rundir.write_json(users_dir(cache, key) / f"{name}.json", record)
    except OSError:  # a read-only shared cache: nobody can prune it either
        pass


def users(cache: Path, key: str) -> dict[Path, dict[str, Any]]:
    """The recorded uses of environment ``key``, by record file."""
    found = {}
    for path in sorted(users_dir(cache, key).glob("*.json")):
        try:
            found[path] = json.loads(path.read_text())
        except (OSError, ValueError):  # being written (never half: written atomically) or removed meanwhile
            continue
    return found


def remove(path: Path) -> None:
    """Remove a dir so that nobody sees it half-removed: rename it away first."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    try:
        os.rename(path, trash)
    except OSError:
        trash = path
    shutil.rmtree(trash, ignore_errors=True)


def _size(path: Path) -> int:
    total = 0
    for root, dirs, files in os.walk(path):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:  # removed while counted: it no longer takes room
                pass
    return total


def entries(cache: Path) -> list[dict[str, Any]]:
    """Every environment in the cache: key, kind, packages, size, last use, complete or not."""
    rows: list[dict[str, Any]] = []
    if not cache.is_dir():
        return rows
    for path in sorted(cache.iterdir()):
        if path.name.startswith(".") or not path.is_dir():
            continue
        try:
            meta = json.loads((path / META).read_text())
        except (OSError, ValueError):
            meta = None
        stamp = next((p for p in (path / LAST_USED, path / META, path) if p.exists()), path)
        rows.append(
            {
                "key": path.name,
                "path": str(path),
                "complete": meta is not None,
                "kind": (meta or {}).get("kind") or path.name.split("-")[0],
                "packages": (meta or {}).get("packages", []),
                "size": _size(path),
                "last_used": stamp.stat().st_mtime,
            }
        )
    return rows


def prune(
    cache: Path,
    older_than_days: float | None = None,
    remove_all: bool = False,
    in_use: Callable[[Sequence[dict[str, Any]]], list[bool]] | None = None,
) -> dict[str, list[str]]:
    """Remove environments (all, or unused for longer than the days given) and unfinished builds.

    An environment being built or removed by another process (its lock is held) is left
    alone, and so is one that a recorded run may still use: ``in_use`` tells, for the
    recorded uses, which runs are queued, running or requeued (without it, every recorded
    run counts as one). The records of runs that ended are dropped.
    """
    done: dict[str, list[str]] = {"removed": [], "kept": [], "busy": [], "in_use": []}
    now = time.time()
    candidates = []
    for entry in entries(cache):
        stale = older_than_days is not None and now - entry["last_used"] > older_than_days * 86400
        if remove_all or stale or not entry["complete"]:
            candidates.append(entry)
        else:
            done["kept"].append(entry["key"])
    seen = {key: users(cache, key) for key in (e["key"] for e in candidates)}
    judged = _judge(seen, in_use)
    for entry in candidates:
        key = entry["key"]
        with lock(cache, key, blocking=False) as got:
            if not got:
                done["busy"].append(key)
                continue
            # Judged before the lock was taken: a use recorded since (a new record, or a run
            # resumed since, which wrote its record again) counts as in use.
            found = users(cache, key)
            live = {
                path: record
                for path, record in found.items()
                if record != seen[key].get(path) or judged.get(path, True)
            }
            for path in set(found) - set(live):
                path.unlink(missing_ok=True)
            if live:
                done["in_use"].append(f"{key} ({', '.join(sorted(Path(r['run_dir']).name for r in live.values()))})")
                continue
            remove(Path(entry["path"]))
            (cache / ".specs" / f"{key}.json").unlink(missing_ok=True)
            shutil.rmtree(users_dir(cache, key), ignore_errors=True)
            done["removed"].append(key)
    _remove_leftovers(cache)
    return done


def _judge(
    records: dict[str, dict[Path, dict[str, Any]]], in_use: Callable[[Sequence[dict[str, Any]]], list[bool]] | None
) -> dict[Path, bool]:
    """For every record file of every key: may its run still use the environment? (one call of
    ``in_use`` for them all: one scheduler query)."""
    files = [path for found in records.values() for path in found]
    every = [record for found in records.values() for record in found.values()]
    flags = in_use(every) if in_use is not None and every else [True] * len(every)
    return dict(zip(files, flags))


def _remove_leftovers(cache: Path) -> None:
    """What killed builds and removals left (``.tmp-*``, ``.trash-*``), unless their key is locked."""
    if not cache.is_dir():
        return
    for leftover in sorted(cache.glob(".tmp-*")) + sorted(cache.glob(".trash-*")):
        key = leftover.name.split("-", 1)[1].rsplit("-", 1)[0].removesuffix(".log")
        with lock(cache, key, blocking=False) as got:
            if got and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
