"""A tuning study's settings (``hydra/sweeper=tfrun``): checked, described, and turned into
Optuna's sampler and storage; its account at the end (:func:`summary`). The study itself runs
in :mod:`tfrun.tune.study`.

Every check here runs before anything is submitted or any run dir is made: a bad sampler,
policy, storage or space is a :class:`~tfrun.errors.ConfigError` (exit 2).
Optuna is imported only inside functions: ``--dry-run`` and ``--help`` do not need it.
"""

from __future__ import annotations

import errno
import fcntl
import importlib.util
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, Mapping, Sequence, cast

from tfrun import rundir
from tfrun.config.space import Space
from tfrun.config.validate import is_whole
from tfrun.errors import TUNE, ConfigError, TfrunError, require
from tfrun.paths import RunPaths, SweepPaths
from tfrun.states import RunState
from tfrun.tune import policies

# sampler -> the packages it needs beyond Optuna (cmaes and gp are Optuna's, with extras).
SAMPLERS: dict[str, tuple[str, ...]] = {
    "random": (),
    "grid": (),
    "tpe": (),
    "qmc": ("scipy",),
    "cmaes": ("cmaes",),
    "gp": ("torch", "scipy"),
}
Direction = Literal["maximize", "minimize"]  # as Optuna spells a study's direction
DIRECTIONS: tuple[Direction, ...] = ("maximize", "minimize")
STARTUP_SAMPLERS = ("tpe", "gp", "cmaes")  # the samplers that start with random trials
_INVOCATION: dict[str, Any] = {}


def remember_invocation(overrides: list[str], config_dir: str | None, config_name: str) -> None:
    """The command line of ``tfrun -m`` (the CLI tells it): kept in the sweep dir for resume."""
    _INVOCATION.update(overrides=list(overrides), config_dir=config_dir, config_name=config_name)


@dataclass(frozen=True)
class Settings:
    """``hydra.sweeper.*`` checked, with the objective and the sweep dir."""

    sampler: str
    n_trials: int
    max_parallel: int
    direction: Direction
    seed: int | None
    storage: str | None
    policy: policies.Policy
    objective: str
    sweep_dir: Path
    n_startup_trials: int | None = None  # None: the default of make_sampler
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def maximize(self) -> bool:
        """Is a larger objective better?"""
        return self.direction == "maximize"

    @property
    def study_name(self) -> str:
        """The study's name in its storage: the sweep's in a storage several sweeps may share;
        in the sweep's own journal file, always ``tfrun`` (so that Hyperband's brackets, drawn
        from the name and the trial number, are the same in every study)."""
        return self.sweep_dir.name if self.storage else "tfrun"

    def storage_text(self) -> str:
        """Where the study lives, as a person reads it."""
        if self.storage and "://" in self.storage:
            return f"database {self.storage} (study {self.study_name})"
        return f"journal file {journal_path(self)}"


def _positive(key: str, value: Any) -> int:
    if not is_whole(value, 1):
        raise ConfigError.invalid(f"hydra.sweeper.{key}", value, "a whole number, 1 or more")
    return value


def settings(sweeper: Mapping[str, Any], objective: str | None, sweep_dir: Path) -> Settings:
    """Check ``hydra.sweeper`` (as plain data) and the objective."""
    require("hydra/sweeper=tfrun", ["optuna"], TUNE)
    sampler = str(sweeper.get("sampler"))
    if sampler not in SAMPLERS:
        raise ConfigError.invalid("hydra.sweeper.sampler", sampler, SAMPLERS)
    missing = [p for p in SAMPLERS[sampler] if importlib.util.find_spec(p) is None]
    if missing:
        raise ConfigError(
            f"hydra.sweeper.sampler={sampler} needs the package(s) {', '.join(missing)}, which are not "
            f"installed: pip install {' '.join(missing)}, or choose one of random, grid, tpe, qmc"
        )
    given = str(sweeper.get("direction"))
    if given not in DIRECTIONS:
        raise ConfigError.invalid("hydra.sweeper.direction", given, DIRECTIONS)
    direction = cast(Direction, given)  # one of DIRECTIONS, as checked
    policy = policies.make(str(sweeper.get("policy")), sweeper.get("policy_args") or {}, objective)
    if not objective:
        raise ConfigError(
            "hydra/sweeper=tfrun optimises a metric the trials record: add tfrun.objective=METRIC "
            "(e.g. tfrun.objective=val_accuracy, and hydra.sweeper.direction=minimize for a loss)"
        )
    seed = sweeper.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ConfigError.invalid("hydra.sweeper.seed", seed, "a whole number, or null for a random seed")
    startup = sweeper.get("n_startup_trials")
    if startup is not None:
        if sampler not in STARTUP_SAMPLERS:
            raise ConfigError(
                f"hydra.sweeper.n_startup_trials={startup!r}: only the samplers that model the results "
                f"start with random trials ({', '.join(STARTUP_SAMPLERS)}); sampler={sampler} does not. "
                f"Remove the key, or choose one of those samplers"
            )
        if not is_whole(startup, 0):
            raise ConfigError.invalid(
                "hydra.sweeper.n_startup_trials", startup, "a whole number, 0 or more (null: the sampler's default)"
            )
    found = Settings(
        sampler,
        _positive("n_trials", sweeper.get("n_trials")),
        _positive("max_parallel", sweeper.get("max_parallel")),
        direction,
        seed,
        str(sweeper["storage"]) if sweeper.get("storage") else None,
        policy,
        objective,
        sweep_dir,
        startup,
        extra={"pool": sweeper.get("pool")},
    )  # checked with the trials' compute (targets.pool)
    check_storage(found)
    return found


def journal_path(found: Settings) -> Path:
    """The journal file of a study kept in a file (by default in the sweep dir)."""
    return Path(found.storage).expanduser().resolve() if found.storage else SweepPaths.of(found.sweep_dir).journal


def check_storage(found: Settings) -> None:
    """A journal file must be creatable (its directory exists and is writable); a database URL
    must name a database SQLAlchemy knows. Checked before anything is submitted."""
    if found.storage and "://" in found.storage:
        scheme = found.storage.split("://", 1)[0].split("+", 1)[0]
        if scheme not in ("sqlite", "postgresql", "mysql", "oracle", "mssql"):
            raise ConfigError.invalid(
                "hydra.sweeper.storage",
                found.storage,
                "a journal file path, or a database URL (sqlite:///PATH, postgresql://..., mysql://...)",
            )
        return
    if not found.storage:
        return  # the sweep dir is made for it
    path = journal_path(found)
    where = path.parent
    if path.is_dir() or not where.is_dir() or not os.access(where, os.W_OK):
        raise ConfigError.invalid(
            "hydra.sweeper.storage",
            found.storage,
            f"a journal file in an existing, writable directory ({where} "
            f"{'is a directory itself' if path.is_dir() else 'does not exist or is not writable'}), "
            f"or a database URL such as sqlite:///PATH",
        )


def open_storage(found: Settings) -> Any:
    """Optuna's storage for the study: the journal file (works on a shared filesystem, without a
    server; a lock beside it), or the RDB of the URL given."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if found.storage and "://" in found.storage:
        try:
            return optuna.storages.RDBStorage(found.storage)
        except Exception as exc:  # SQLAlchemy's and the driver's own errors
            raise ConfigError(
                f"hydra.sweeper.storage={found.storage!r}: the database cannot be opened ({exc}); "
                f"give a reachable database URL or a journal file path"
            ) from exc
    path = journal_path(found)
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def startup_trials(found: Settings) -> int | None:
    """Random trials before the sampler models the results: the user's number; else, for TPE,
    a third of the study up to Optuna's 10 (which would be most of a small study); None: the
    sampler's own default."""
    if found.n_startup_trials is not None:
        return found.n_startup_trials
    return max(1, min(10, found.n_trials // 3)) if found.sampler == "tpe" else None


def make_sampler(found: Settings) -> Any:
    """The Optuna sampler. A grid is every combination in the order written, enqueued once
    (:mod:`tfrun.tune.study`), so the sampler behind it only fills nothing: random."""
    import optuna

    seed = found.seed
    startup = startup_trials(found)
    given: dict[str, Any] = {} if startup is None else {"n_startup_trials": startup}
    if found.sampler == "tpe":
        # constant_liar: trials still running count as bad guesses, so that trials started
        # meanwhile do not all pick the same point (the study is asynchronous).
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, **given)
    if found.sampler == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)
    if found.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, **given)
    if found.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, **given)
    return optuna.samplers.RandomSampler(seed=seed)


def distributions(space: Space) -> dict[str, Any]:
    """Optuna distributions of the space's dimensions."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    found: dict[str, Any] = {}
    for d in space.dimensions:
        if d.kind == "choice":
            found[d.name] = CategoricalDistribution(list(d.choices))
        elif d.kind == "int":
            found[d.name] = IntDistribution(int(d.low or 0), int(d.high or 0), step=int(d.step or 1), log=d.log)
        else:
            found[d.name] = FloatDistribution(float(d.low or 0), float(d.high or 0), log=d.log)
    return found


def describe(found: Settings, space: Space) -> dict[str, Any]:
    """What ``--dry-run -m`` shows of a study."""
    grid = len(space.grid()) if found.sampler == "grid" else None
    startup = startup_trials(found)
    notes = ", ".join(
        note
        for note in (
            "multivariate, constant liar" if found.sampler == "tpe" else "",
            f"{startup} random trial(s) first" if startup is not None else "",
        )
        if note
    )
    return {
        "sweep_dir": str(found.sweep_dir),
        "objective": found.objective,
        "direction": found.direction,
        "sampler": found.sampler
        + (f" ({notes})" if notes else "")
        + (f" ({grid} combination(s), in the order written)" if grid is not None else ""),
        "seed": found.seed,
        "n_trials": min(found.n_trials, grid) if grid is not None else found.n_trials,
        "max_parallel": found.max_parallel,
        "space": [d.describe() for d in space.dimensions],
        "fixed": list(space.fixed),
        "policy": found.policy.describe(),
        "storage": found.storage_text(),
        "pool": found.extra.get("pool"),
    }


def describe_text(info: Mapping[str, Any]) -> str:
    """:func:`describe` as lines."""
    lines = [
        f"tuning study in {info['sweep_dir']} (hydra/sweeper=tfrun, asynchronous: a trial starts as soon as one ends)",
        f"  objective:  {info['objective']} ({info['direction']})",
        f"  sampler:    {info['sampler']}, seed {info['seed']}",
        f"  trials:     {info['n_trials']}, at most {info['max_parallel']} at once",
        f"  policy:     {info['policy']}",
        f"  storage:    {info['storage']}",
        "  space:",
    ]
    lines += [f"    {line}" for line in info["space"]]
    if info["fixed"]:
        lines.append(f"  every trial: {' '.join(info['fixed'])}")
    return "\n".join(lines)


def save_invocation(found: Settings, sweep_overrides: list[str]) -> None:
    """``tune.json``: the command line that started the study, for ``tfrun tune resume``."""
    path = SweepPaths.of(found.sweep_dir).tune
    if path.exists():
        return
    data = {
        "overrides": _INVOCATION.get("overrides") or sweep_overrides,
        "config_dir": _INVOCATION.get("config_dir"),
        "config_name": _INVOCATION.get("config_name", "config"),
        "storage": found.storage_text(),
        "cwd": os.getcwd(),
    }
    rundir.write_json(path, data)


def follow_alone(found: Settings) -> IO[str]:
    """Become the study's one follower: an exclusive ``flock`` on ``follower.lock`` in the sweep
    dir, held while the returned file is open (the kernel drops it when the process ends, however
    it ends: a killed follower leaves nothing to clean up). Two followers would each ask for the
    trials still missing and start them twice, so a second one is refused, naming the first.
    Where the filesystem has no locks (some NFS mounts), the study is followed unlocked."""
    path = SweepPaths.of(found.sweep_dir).follower
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        text = handle.read()
        handle.close()
        raise TfrunError(
            f"the study in {found.sweep_dir} is being followed already, {_follower(text)}: a second "
            f"follower would start its trials twice. Let that one go on, or stop it (Ctrl-C: its Slurm "
            f"trials go on) and then run tfrun tune resume {found.sweep_dir}"
        ) from None
    except OSError as exc:
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            raise
        return handle
    handle.truncate(0)
    handle.write(json.dumps({"pid": os.getpid(), "host": rundir.hostname(), "started": time.time()}) + "\n")
    handle.flush()
    return handle


def _follower(text: str) -> str:
    """'by tfrun pid 123 on node1 since 2026-12-05 21:30:00' from the lock file's record."""
    try:
        holder = json.loads(text)
    except ValueError:  # being written this very moment
        return "by another tfrun"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started") or 0))
    return f"by tfrun pid {holder.get('pid')} on {holder.get('host')} since {since}"


def resume_argv(sweep_dir: Path) -> tuple[list[str], str]:
    """The ``tfrun -m`` command line that reattaches to a study, and the directory to run it in."""
    data = rundir.read_json(SweepPaths.of(sweep_dir).tune)
    if not data:
        raise ConfigError(
            f"{sweep_dir} is not a tuning study of hydra/sweeper=tfrun (no {SweepPaths.of(sweep_dir).tune.name} in it)"
        )
    argv = [o for o in data["overrides"] if not o.startswith("hydra.sweep.dir=")]
    argv = ["-m", *argv, f"hydra.sweep.dir={sweep_dir.resolve()}"]
    if data.get("config_dir"):
        argv = ["--config-dir", data["config_dir"], *argv]
    if data.get("config_name") and data["config_name"] != "config":
        argv = ["--config-name", data["config_name"], *argv]
    return argv, data.get("cwd") or os.getcwd()


def dumps(info: Mapping[str, Any]) -> str:
    """:func:`describe` as JSON (``--dry-run=json -m``)."""
    return json.dumps({"study": info}, indent=1, sort_keys=True)


def preview(overrides: list[str], config_dir: str | None, config_name: str) -> tuple[dict[str, Any], Any]:
    """``--dry-run -m``: the study's settings and the plan of its first trial (the first value
    of every dimension), composed and checked as ``tfrun -m`` would; nothing is written."""
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from tfrun.config import compose, space
    from tfrun.plan import planner

    with compose.session(config_dir):
        sweep = compose.compose_sweep(list(overrides), config_name)
        sweep_dir = Path(str(sweep.hydra.sweep.dir)).resolve()
        found_space = space.parse(list(sweep.hydra.overrides.task), OmegaConf.select(sweep, "hydra.sweeper.params"))
        # A config node's keys are strs, which the type of to_container (any container, any key) cannot say.
        sweeper = cast(dict[str, Any], OmegaConf.to_container(sweep.hydra.sweeper, resolve=True))
        assert isinstance(sweeper, dict)
        found = settings(sweeper, sweep.tfrun.get("objective"), sweep_dir)
        loader = GlobalHydra.instance().config_loader()
        planned = planner.plan_points(loader, sweep, [found_space.overrides(found_space.first())], 0)
    return describe(found, found_space), planned[0].plan


def objective_curve(run_dir: Path, metric: str) -> dict[int, float]:
    """The objective after each epoch: epoch count (1-based) -> value (a Keras epoch's logs,
    or ``tfrun.log_metric(metric, value, step)``)."""
    from tfrun.tracking.compare import epoch_series

    return {step + 1: value for step, value in epoch_series(run_dir).get(metric, [])}


def task_seconds(run_dir: Path) -> float:
    """Seconds its tasks ran, summed over its ranks (every attempt's last record)."""
    total = 0.0
    for record in rundir.rank_records(run_dir).values():
        if record.get("started"):
            total += float(record.get("ended") or time.time()) - float(record["started"])
    return total


def objective_times(run_dir: Path, metric: str) -> list[float]:
    """When each value of the objective was recorded, in order."""
    from tfrun.tracking import metrics

    return [
        float(r["time"])
        for r in metrics.read_metrics(RunPaths.of(run_dir).metrics)
        if r.get("time") is not None and (metric in r if r.get("epoch") is not None else r.get("name") == metric)
    ]


def epoch_times(run_dirs: Sequence[Path], metric: str) -> dict[Path, float]:
    """Each trial's seconds per epoch, from the times its objective was recorded: the median
    gap between them; for a trial with one epoch only, the time to it less the start-up the
    other trials took (start to first epoch, less an epoch). Start-up is paid once, not per
    epoch, so it is never counted as part of one."""
    times = {d: objective_times(d, metric) for d in run_dirs}
    started: dict[Path, float] = {}
    for d in run_dirs:
        starts = [float(r["started"]) for r in rundir.rank_records(d).values() if r.get("started")]
        if starts:
            started[d] = min(starts)
    per_epoch = {d: statistics.median([b - a for a, b in zip(ts, ts[1:])]) for d, ts in times.items() if len(ts) > 1}
    startups = [times[d][0] - started[d] - s for d, s in per_epoch.items() if d in started]
    if startups:
        startup = max(0.0, statistics.median(startups))
        for d, ts in times.items():
            if len(ts) == 1 and d in started:
                per_epoch[d] = max(0.0, ts[0] - started[d] - startup)
    return per_epoch


def summary(found: Settings) -> dict[str, Any]:
    """Trials done / pruned / failed, the best, and the compute pruning saved: each pruned
    trial's epochs not run (up to the longest completed trial's) times its time per epoch
    (:func:`epoch_times`; else the study's usual one) times its tasks. Kept in
    ``sweep.json`` under ``study``."""
    from tfrun.tracking.compare import best_point

    path = SweepPaths.of(found.sweep_dir).index
    index = rundir.read_json(path, {"points": []})
    points = [p for p in index["points"] if "trial" in p]
    states = [p.get("state") for p in points]
    curves = {p["run_dir"]: objective_curve(Path(p["run_dir"]), found.objective) for p in points}
    full = max((len(curves[p["run_dir"]]) for p in points if p.get("state") == RunState.COMPLETED), default=0)
    used = sum(task_seconds(Path(p["run_dir"])) for p in points)
    per_epoch = epoch_times([Path(p["run_dir"]) for p in points], found.objective)
    usual = statistics.median(per_epoch.values()) if per_epoch else 0.0
    pruned_used = pruned_full = 0.0
    for p in points:
        if p.get("state") == RunState.PRUNED:
            secs, epochs = task_seconds(Path(p["run_dir"])), len(curves[p["run_dir"]])
            tasks = max(1, len(rundir.rank_records(Path(p["run_dir"]))))
            epoch_s = per_epoch.get(Path(p["run_dir"]), usual)
            pruned_used += secs
            pruned_full += secs + max(full - epochs, 0) * epoch_s * tasks
    best = best_point(found.sweep_dir, found.maximize)
    # Done: completed with a value for the objective (a run that completed without one, or with
    # one that is not a finite number, is a failed trial).
    done = sum(
        1
        for p in points
        if p.get("state") == RunState.COMPLETED and (p.get("objective") or {}).get("value") is not None
    )
    data = {
        "trials": len(points),
        "completed": done,
        "pruned": states.count(RunState.PRUNED),
        "failed": len(points) - done - states.count(RunState.PRUNED),
        "task_seconds": round(used, 1),
        "pruned_task_seconds": round(pruned_used, 1),
        "pruned_full_estimate_s": round(pruned_full, 1),
        "saved_task_seconds": round(pruned_full - pruned_used, 1),
        "best": best and {"run_dir": best["run_dir"], "value": best["objective"]["value"]},
        "policy": found.policy.describe(),
        "sampler": found.sampler,
    }
    rundir.update_json(path, lambda index: index.update(study=data), {"points": []})
    return data


def summary_lines(data: dict[str, Any], objective: str) -> list[str]:
    """The study's account, as printed at its end."""
    lines = [
        f"study: {data['trials']} trial(s): {data['completed']} done, {data['pruned']} pruned, "
        f"{data['failed']} failed; {data['task_seconds']:.0f} task-s in all"
    ]
    if data["pruned"]:
        lines.append(
            f"compute saved by policy {data['policy']}: ~{data['saved_task_seconds']:.0f} task-s (pruned "
            f"trials ran {data['pruned_task_seconds']:.0f} task-s of an estimated "
            f"{data['pruned_full_estimate_s']:.0f} to their end)"
        )
    if data["best"]:
        lines.append(f"best trial: {data['best']['run_dir']} ({objective}={data['best']['value']:.6g})")
    return lines
