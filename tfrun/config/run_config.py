"""The run config plan/ builds from: one typed, frozen, validated value per run.

A composed config (:mod:`tfrun.config.compose`) is resolved to plain data, checked once
(:func:`tfrun.config.validate.check_run`, the backend's task counts, the script's path) and
made into a :class:`RunConfig` by :func:`from_data`. The plan floor reads its sections'
attributes; :attr:`RunConfig.data` is the same run as plain data, which the plan stores as
it is (``plan.json``'s ``config``, read back by every task).

:class:`tfrun.config.schema.RootConfig` is the Hydra-side schema a composition is checked
against; this is what that composition becomes once resolved and checked.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, TypeVar

from tfrun import backends
from tfrun.config import validate

_Section = TypeVar("_Section")


def _frozen(value: Any) -> Any:
    """A section's value as a frozen dataclass holds it: lists as tuples, mappings read-only."""
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return MappingProxyType(dict(value))
    return value


_FIELDS: dict[type, frozenset[str]] = {}  # a section's field names, read once per class


def _field_names(cls: type) -> frozenset[str]:
    if cls not in _FIELDS:
        _FIELDS[cls] = frozenset(f.name for f in dataclasses.fields(cls))
    return _FIELDS[cls]


def _section(cls: type[_Section], data: Mapping[str, Any], **given: Any) -> _Section:
    """``cls`` from a section's keys that name its fields (others stay in the plain data); a
    field the section lacks keeps the dataclass's default (a key another option of the group has)."""
    names = _field_names(cls)
    values = {k: _frozen(v) for k, v in data.items() if k in names and k not in given}
    return cls(**values, **given)


@dataclass(frozen=True)
class Entry:
    """The user's script and how its parameters reach it (the ``entry`` section)."""

    script: Path  # absolute, an existing file
    source_dir: Path  # absolute, an existing directory: the tasks' working directory
    flag_style: str = "keep"
    flag_prefix: str = "--"
    bool_style: str = "flag"
    args: tuple[str, ...] = ()
    python: str | None = None  # the tasks' interpreter (None: the one running tfrun)


@dataclass(frozen=True)
class Compute:
    """Where and how the tasks run (the ``compute`` section). Fields only one target's option
    has are None (or their default) for the other's."""

    target: str
    nodes: int
    tasks_per_node: int
    gpus_per_node: int = 0
    timeout_min: int = 60
    gpus_per_task: int | None = None
    hang_timeout_s: float | None = None
    warm: str = "fork"
    preload: str | tuple[str, ...] = "auto"
    stop_grace_s: float = 5.0
    partition: str | None = None
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclude: str | None = None
    nodelist: str | None = None
    job_name: str = "tfrun"
    setup: tuple[str, ...] = ()
    srun_args: tuple[str, ...] = ()
    additional_parameters: Mapping[str, Any] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    signal_delay_s: int = 120
    max_requeues: int = 3
    requeue_on_preempt: bool = True
    requeue_on_hang: bool = False
    array_parallelism: int = 256
    pack: str = "off"
    pack_size: int = 1
    pack_slots: int = 1
    wait: bool = True
    poll_s: float = 2.0

    @classmethod
    def of(cls, compute: Mapping[str, Any]) -> "Compute":
        """The typed form of a compute section checked before (a plan's, a pool's)."""
        return _section(cls, compute)

    @property
    def world_size(self) -> int:
        """Tasks in the run."""
        return self.nodes * self.tasks_per_node

    @property
    def gpus_per_rank(self) -> int:
        """GPUs each task gets."""
        return self.gpus_per_task or self.gpus_per_node // self.tasks_per_node

    @property
    def packed(self) -> bool:
        """Does a sweep on these settings pack several points into one Slurm job?"""
        return self.pack == "auto" or int(self.pack_size or 1) > 1


@dataclass(frozen=True)
class Backend:
    """How the tasks cooperate (the ``backend`` section). Each backend module reads the rest of
    its own options from :attr:`options`, at plan time and in the task (from ``plan.json``)."""

    name: str
    legacy_keras: bool = False
    options: Mapping[str, Any] = dataclasses.field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class Deps:
    """The tasks' Python environment (the ``deps`` section); :func:`tfrun.deps.plan_for` reads
    the options of its kind from :attr:`options`."""

    kind: str = "none"
    env: Mapping[str, str] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    options: Mapping[str, Any] = dataclasses.field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class Export:
    """What happens to the trained model (the ``export`` section; its fields are ONNX's)."""

    format: str = "none"
    model: str | None = None
    output: str = "model.onnx"
    opset: int = 17
    tolerance: float = 1e-4
    samples: int = 16


@dataclass(frozen=True)
class Tracking:
    """Where params and metrics go besides the run dir (the ``tracking`` section)."""

    kind: str = "none"
    options: Mapping[str, Any] = dataclasses.field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class Settings:
    """tfrun's own settings (the ``tfrun`` section)."""

    runs_dir: Path  # from the cwd the run was asked from (not resolved: a plan resolves it)
    name: str | None = None
    objective: str | None = None
    tags: Mapping[str, str] = dataclasses.field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class RunConfig:
    """One run's config, composed, resolved and checked: what a plan is built from."""

    entry: Entry
    compute: Compute
    backend: Backend
    deps: Deps
    export: Export
    tracking: Tracking
    tfrun: Settings
    trainer: Mapping[str, Any]  # free-form: the script's flags, in order
    cwd: Path  # where the run was asked from: relative paths of the config mean from here
    data: Mapping[str, Any]  # the same run as plain, JSON-ready data (plan.json's ``config``)
    warnings: tuple[str, ...] = ()  # things that will run but probably not as meant


def from_data(data: Mapping[str, Any], cwd: Path | None = None) -> RunConfig:
    """The checked, typed form of a composed, resolved run config (``cwd``: where relative
    paths start, default the current directory). Raises :class:`tfrun.errors.ConfigError`,
    naming key, value and what is allowed, for anything that cannot run."""
    cwd = cwd or Path.cwd()
    validate.check_run(data)
    backend = _section(Backend, data["backend"], options=MappingProxyType(data["backend"]))
    backend_module = backends.get(backend.name)
    script, source_dir = validate.resolve_script(data["entry"], cwd)
    compute = Compute.of(data["compute"])
    backend_module.check(data["backend"], compute.world_size)
    tracking = data.get("tracking")  # a config without the tracking group has none (a plain value)
    warning = validate.keras3_warning(script, data["backend"])
    return RunConfig(
        entry=_section(Entry, data["entry"], script=script, source_dir=source_dir),
        compute=compute,
        backend=backend,
        deps=_section(Deps, data["deps"], options=MappingProxyType(data["deps"])),
        export=_section(Export, data["export"]),
        tracking=_section(Tracking, tracking, options=MappingProxyType(tracking))
        if isinstance(tracking, Mapping)
        else Tracking(),
        tfrun=_section(Settings, data["tfrun"], runs_dir=cwd / str(data["tfrun"]["runs_dir"])),
        trainer=MappingProxyType(data["trainer"]),
        cwd=cwd,
        data=MappingProxyType(dict(data)),
        warnings=(warning,) if warning else (),
    )
