"""The environment cache (``deps.cache_dir``): where each environment lives, the file lock that
makes concurrent runs build it once, and what is there (``tfrun env list|prune``).

Layout::

    pip-<hash>/             a finished environment; tfrun-env.json inside says what it holds
    .tmp-pip-<hash>-<pid>/  a build in progress
    .locks/<key>.lock       held while building or removing <key>
    .specs/<key>.json       what a job will build (deps.build_on=job)
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

DEFAULT_CACHE = "~/.cache/tfrun/envs"
META = "tfrun-env.json"  # written last: an environment without it is unfinished
LAST_USED = ".tfrun-last-used"  # touched by every run that uses the environment
BUILD_LOG = "tfrun-build.log"


def cache_root(value: Any = None) -> Path:
    """The environment cache: ``value``, else $TFRUN_ENV_CACHE, else ~/.cache/tfrun/envs."""
    return Path(str(value or os.environ.get("TFRUN_ENV_CACHE") or DEFAULT_CACHE)).expanduser().absolute()


def is_complete(env: Path) -> bool:
    """A finished environment: its META is written last (and a pip env appears by rename)."""
    return (env / META).is_file()


def spec_file(cache: Path, key: str) -> Path:
    """Where a job finds the plan of the environment it builds (deps.build_on=job)."""
    return cache / ".specs" / f"{key}.json"


@contextmanager
def lock(cache: Path, key: str, blocking: bool = True,
          on_wait: Callable[[], None] | None = None) -> Iterator[bool]:
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
    except OSError:  # a read-only shared cache still serves
        pass


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
            except OSError:
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
        rows.append({"key": path.name, "path": str(path), "complete": meta is not None,
                     "kind": (meta or {}).get("kind") or path.name.split("-")[0],
                     "packages": (meta or {}).get("packages", []), "size": _size(path),
                     "last_used": stamp.stat().st_mtime})
    return rows


def prune(cache: Path, older_than_days: float | None = None, remove_all: bool = False) -> dict[str, list[str]]:
    """Remove environments (all, or unused for longer than the days given) and unfinished builds.

    An environment being built or removed by another process (its lock is held) is left alone.
    """
    done: dict[str, list[str]] = {"removed": [], "kept": [], "busy": []}
    now = time.time()
    for entry in entries(cache):
        stale = older_than_days is not None and now - entry["last_used"] > older_than_days * 86400
        if not (remove_all or stale or not entry["complete"]):
            done["kept"].append(entry["key"])
            continue
        with lock(cache, entry["key"], blocking=False) as got:
            if got:
                remove(Path(entry["path"]))
                (cache / ".specs" / f"{entry['key']}.json").unlink(missing_ok=True)
        done["removed" if got else "busy"].append(entry["key"])
    for leftover in sorted(cache.glob(".tmp-*")) + sorted(cache.glob(".trash-*")) if cache.is_dir() else []:
        key = leftover.name.split("-", 1)[1].rsplit("-", 1)[0].removesuffix(".log")
        with lock(cache, key, blocking=False) as got:
            if got and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    return done
