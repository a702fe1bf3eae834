"""Where each attempt of a run came from: the source's git commit (and diff), the exact
packages of the tasks' Python, the interpreter, the hosts and the Slurm job.

Rank 0 writes it once per attempt, at task start, in a background thread
(:func:`record_in_background`): collecting takes ~0.05 s of CPU (three git calls, each
bounded by a timeout; the package list, read once per environment), none of it on the
script's path. Files, per attempt (the key of ``attempts.json``):

- ``provenance/<attempt>.json``: the record (see :func:`read` for its shape);
- ``provenance/<attempt>.diff``: ``git diff HEAD`` of the source dir, when it is dirty;
- ``provenance/<attempt>.packages.txt``: ``name==version`` per line, as ``pip freeze``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from tfrun import rundir
from tfrun.paths import RunPaths

if TYPE_CHECKING:
    import importlib.metadata

GIT_TIMEOUT_S = 2.0
KEPT_LISTS = 32  # package lists kept in the cache, the newest (~8 kB each)


@dataclass(frozen=True)
class GitState:
    """The source dir's git state: no commit when it is no git repo (or git is missing)."""

    commit: str | None = None
    dirty: bool = False
    diff: str = ""  # ``git diff HEAD`` when dirty (tracked files)
    untracked: tuple[str, ...] = ()  # files git does not track (not in the diff, not "dirty")
    error: str | None = None  # why git could not say (a timeout, ...)


@dataclass(frozen=True)
class Provenance:
    """One attempt's provenance, as collected in the task."""

    attempt: str
    source_dir: str
    git: GitState
    packages: tuple[str, ...]  # "name==version", sorted case-insensitively
    python_version: str
    python_executable: str
    hosts: tuple[str, ...]  # one per rank, in rank order
    job_id: str | None
    recorded: float = field(default_factory=time.time)


def _git(source_dir: str, *args: str, timeout: float) -> str:
    return subprocess.run(
        ["git", "-C", source_dir, *args],
        capture_output=True,
        text=True,
        errors="replace",
        check=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"},
    ).stdout


def git_state(source_dir: str, timeout: float = GIT_TIMEOUT_S, ignore: Sequence[str] = ()) -> GitState:
    """The commit checked out in ``source_dir`` and, if tracked files differ from it (as
    ``git describe --dirty`` sees it), the diff. Untracked files are listed, except those
    that hold a path of ``ignore`` (the run dir, when the runs dir is in the repo). Never
    raises: a dir outside any git repo has no commit."""
    try:
        top, commit = _git(source_dir, "rev-parse", "--show-toplevel", "HEAD", timeout=timeout).splitlines()
    except (OSError, ValueError, subprocess.SubprocessError):
        return GitState()  # no repo, no commit yet, or no git
    try:
        # GIT_OPTIONAL_LOCKS=0: status must not take the index lock a user's git may hold.
        entries = [e for e in _git(source_dir, "status", "--porcelain", "-z", timeout=timeout).split("\0") if e]
        dirty = any(not e.startswith("?? ") for e in entries)
        diff = _git(source_dir, "diff", "--no-color", "--no-ext-diff", "HEAD", timeout=timeout) if dirty else ""
    except (OSError, subprocess.SubprocessError) as exc:
        return GitState(commit=commit, error=f"git: {type(exc).__name__}: {exc}")
    skip = [Path(p).resolve() for p in ignore]
    untracked = tuple(
        e[3:]
        for e in entries
        if e.startswith("?? ")  # paths relative to the repo's top
        and not any(s.is_relative_to(Path(top, e[3:]).resolve()) for s in skip)
    )
    return GitState(commit=commit, dirty=dirty, diff=diff, untracked=untracked)


def _name_version(dist: importlib.metadata.Distribution) -> tuple[str, str] | None:
    # The headers only: dist.metadata parses the whole file with the email parser, ~10x slower.
    text = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or ""
    name = version = None
    for line in text.splitlines():
        if not line.strip():
            break  # end of the headers
        if line.startswith("Name:"):
            name = line[5:].strip()
        elif line.startswith("Version:"):
            version = line[8:].strip()
        if name and version:
            return name, version
    return None


def packages(path: Sequence[str] | None = None) -> tuple[str, ...]:
    """``name==version`` of every distribution this Python can import (``pip freeze``'s
    list, without its VCS and URL forms), sorted case-insensitively; the first found on
    ``sys.path`` wins, as for imports.

    Reading every distribution's headers takes ~0.15 s of CPU, in every attempt of every
    run: most of what a packed sweep's trivial point costs. The list is kept in
    :func:`packages_cache` under a key of the path's directories and their modification
    times (installing, removing or upgrading a distribution adds or renames entries of its
    directory, which changes its time), and read from there while they are unchanged."""
    # A copy of sys.path: the bootstrap prepends the script's dir while this runs in a thread.
    entries = list(sys.path if path is None else path)
    cached = packages_cache() / f"{_path_key(entries)}.txt"
    try:
        return tuple(cached.read_text().splitlines())
    except OSError:
        pass
    found = _read_packages(entries)
    try:
        rundir.write_atomic(cached, "".join(f"{p}\n" for p in found))
        kept = sorted(cached.parent.glob("*.txt"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in kept[KEPT_LISTS:]:
            old.unlink(missing_ok=True)
    except OSError:  # a read-only home (only slower), or another task pruning meanwhile
        pass
    return found


def packages_cache() -> Path:
    """Where package lists are kept: $XDG_CACHE_HOME/tfrun/packages (~/.cache/tfrun/packages)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "tfrun" / "packages"


def _path_key(entries: Sequence[str]) -> str:
    import hashlib

    parts = [sys.executable]
    for entry in entries:
        try:
            parts.append(f"{entry}\0{os.stat(entry or '.').st_mtime_ns}")
        except OSError:
            parts.append(f"{entry}\0-")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def _read_packages(entries: list[str]) -> tuple[str, ...]:
    import importlib.metadata  # here, in the recording thread: ~40 ms to import

    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions(path=entries):
        pair = _name_version(dist)
        if pair and pair[0].lower() not in found:
            found[pair[0].lower()] = f"{pair[0]}=={pair[1]}"
    return tuple(sorted(found.values(), key=str.lower))


def collect(
    attempt: str,
    source_dir: str,
    hosts: Sequence[str],
    job_id: str | None,
    git_timeout: float = GIT_TIMEOUT_S,
    run_dir: str | None = None,
) -> Provenance:
    """This process's provenance for one attempt."""
    git = git_state(source_dir, git_timeout, ignore=[run_dir] if run_dir else [])
    return Provenance(
        attempt=attempt,
        source_dir=source_dir,
        git=git,
        packages=packages(),
        python_version=sys.version.split()[0],
        python_executable=sys.executable,
        hosts=tuple(hosts),
        job_id=job_id,
    )


def paths(run_dir: str | os.PathLike[str], attempt: str) -> dict[str, Path]:
    """An attempt's provenance files: ``record``, ``diff``, ``packages``."""
    paths = RunPaths.of(run_dir)
    return {what: paths.provenance_of(attempt, what) for what in ("record", "diff", "packages")}


def write(run_dir: str | os.PathLike[str], prov: Provenance) -> Path:
    """Write an attempt's provenance files (the record last: once it exists, the rest does)."""
    files = paths(run_dir, prov.attempt)
    rundir.write_atomic(files["packages"], "".join(f"{p}\n" for p in prov.packages))
    if prov.git.dirty:
        rundir.write_atomic(files["diff"], prov.git.diff)
    record = asdict(prov)
    record["git"].pop("diff")
    # Relative to the run dir, which may move (a copy, another mount point).
    relative = {what: files[what].relative_to(run_dir).as_posix() for what in ("diff", "packages")}
    record["git"]["diff_file"] = relative["diff"] if prov.git.dirty else None
    record["packages"] = {"count": len(prov.packages), "file": relative["packages"]}
    record["python"] = {"version": record.pop("python_version"), "executable": record.pop("python_executable")}
    record["git"]["untracked"] = list(prov.git.untracked)
    record["hosts"] = list(prov.hosts)
    rundir.write_json(files["record"], record)
    return files["record"]


def record(
    run_dir: str | os.PathLike[str],
    attempt: str,
    source_dir: str,
    node_hosts: Sequence[str],
    task_nodes: Sequence[int],
    job_id: str | None,
) -> None:
    """Collect and write (the hosts of the ranks: ``node_hosts[task_nodes[rank]]``); a failure
    is one line in the log, never the task's."""
    try:
        hosts = [node_hosts[node] if node < len(node_hosts) else "?" for node in task_nodes]
        write(run_dir, collect(attempt, source_dir, hosts, job_id, run_dir=str(run_dir)))
    except Exception as exc:  # provenance must never break training
        print(
            f"tfrun: warning: no provenance for attempt {attempt}: {type(exc).__name__}: {exc}",
            file=sys.stderr,
            flush=True,
        )


def record_in_background(
    run_dir: str | os.PathLike[str],
    attempt: str,
    source_dir: str,
    node_hosts: Sequence[str],
    task_nodes: Sequence[int],
    job_id: str | None,
) -> threading.Thread:
    """:func:`record` in a thread, so that the script starts at once. Not a daemon: an
    interpreter that exits normally waits for it (it ends within the git timeouts)."""
    thread = threading.Thread(
        target=record,
        name="tfrun-provenance",
        args=(run_dir, attempt, source_dir, list(node_hosts), list(task_nodes), job_id),
    )
    thread.start()
    return thread


def read(run_dir: str | os.PathLike[str], attempt: str) -> dict[str, Any] | None:
    """The recorded provenance of one attempt as plain data, or None if none was recorded.

    Shape (paths are relative to the run dir)::

        {"attempt": "slurm-123-0",               # the key of attempts.json
         "recorded": 1767268800.1,               # when (seconds since the epoch)
         "source_dir": "/home/me/project",       # the training script's dir
         "git": {"commit": "3f2c...",            # None: not a git repo (or git missing)
                 "dirty": True,                  # tracked files changed (see diff_file)
                 "diff_file": "provenance/slurm-123-0.diff",  # None when clean
                 "untracked": ["notes.txt"],     # files git does not track (from the repo's top)
                 "error": None},                 # why git could not say, if it could not
         "packages": {"count": 220, "file": "provenance/slurm-123-0.packages.txt"},
         "python": {"version": "3.11.9", "executable": "/usr/bin/python3"},
         "hosts": ["node1", "node2"],            # one per rank, in rank order
         "job_id": "123"}                        # None for local runs
    """
    return rundir.read_json(paths(run_dir, attempt)["record"])


def read_all(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every attempt's recorded provenance (:func:`read`), in the order of ``attempts.json``."""
    found = [read(run_dir, str(a.get("attempt"))) for a in rundir.attempts(run_dir)]
    return [p for p in found if p]
