"""Composing the points of a sweep: one Hydra composition per choice of config-group
options, then each point's value overrides applied as data.

Hydra composes every point from scratch (defaults list, every config file, structured
schemas, merges): about 100 ms per point for tfrun's config, and a sweep composes each
point twice (the sweeper validates the batch, the launcher plans it). Two points that
choose the same group options (``compute=slurm backend=ps``) differ only in their value
overrides (``trainer.lr=0.01``), which Hydra itself applies after composing
(:func:`tfrun.config.hydra_compat.apply_overrides`). So :class:`PointComposer` composes once
per distinct set of group overrides, copies that composition for each point, applies the
point's value overrides the way Hydra does and fills in the ``hydra.overrides`` /
``hydra.job.override_dirname`` fields Hydra would. Anything it cannot reproduce exactly
(overrides of ``hydra.*``, Hydra callbacks) goes to Hydra's own composition.

Planning needs less still: a point that differs from the others only in plain trainer
values (``++trainer.seed=7``) has the resolved config of its base with those values in
place, when nothing in the config interpolates the trainer or the ``hydra`` node
(:meth:`PointComposer.resolved`). A 10,000-point dry run then composes one config, not
10,000; the point's own config is composed only if its run dir is written.
"""

from __future__ import annotations

import math
import pickle
import re
import sys
from types import SimpleNamespace
from typing import Any, Callable, Iterator, NamedTuple, cast

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from tfrun.config import hydra_compat, hydra_files

Compose = Callable[[DictConfig, list[str]], DictConfig]

_INSTALLED = "_tfrun_point_composer"


class _Base(NamedTuple):
    """A resolvable point's base: the composition of its overrides but its trainer values."""

    run_config: dict[str, Any]  # resolved, without ``hydra``
    sweep_dir: str
    raw_config: dict[str, Any]  # as config.yaml holds it: unresolved, without ``hydra``
    raw_hydra: dict[str, Any]  # the ``hydra`` node as hydra.yaml holds it
    keys: dict[str, str]  # each base override line's key (Hydra's ``key_or_group``)
    naming: dict[str, Any]  # hydra.job.config.override_dirname, resolved as Hydra reads it
    typed: frozenset[str]  # trainer keys of a typed node (a structured config's): Hydra checks those
    texts: dict[tuple[str, ...], str]  # the text of the entries every point shares, once dumped


class PointFiles(NamedTuple):
    """A point's ``.hydra`` files: their texts, and the overrides that made it."""

    output_subdir: str | None
    config: str
    hydra: str
    overrides: list[str]


def _mapping(node: DictConfig, resolve: bool, enum_to_str: bool = False) -> dict[str, Any]:
    """A mapping node as a dict. Its keys are strs (a composed config's are), which the type
    of ``OmegaConf.to_container`` (any container, any key) cannot say."""
    return cast(dict[str, Any], OmegaConf.to_container(node, resolve=resolve, enum_to_str=enum_to_str))


class PointComposer:
    """Stands in for a Hydra config loader's ``load_sweep_config`` during a multirun.

    Compositions are kept for the life of the multirun (a tuning sweeper launches batch
    after batch), pickled (~15 kB each), one per distinct choice of group options.
    Points the sweeper validated are handed to the launcher once (:meth:`take`), so a
    point is built once, not twice.
    """

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.hydra_compose: Compose = loader.load_sweep_config
        self.bases: dict[tuple[int, tuple[str, ...]], bytes] = {}
        self.built: dict[tuple[int, tuple[str, ...]], DictConfig] = {}
        self.repos: dict[int, Any] = {}
        self.resolved_bases: dict[tuple[int, tuple[str, ...]], _Base | None] = {}

    def __call__(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        """Hydra's ``load_sweep_config``, same signature, cheaper."""
        config = self._compose(master_config, list(sweep_overrides))
        self.built[(id(master_config), tuple(sweep_overrides))] = config
        return config

    def take(self, master: DictConfig, overrides: list[str]) -> DictConfig:
        """The point's config: the one built for validation if there is one (handed out once)."""
        found = self.built.pop((id(master), tuple(overrides)), None)
        return found if found is not None else self._compose(master, list(overrides))

    def check(self, master: DictConfig, overrides: list[str]) -> None:
        """What a sweeper's check of a batch asks of each point (that it composes), without
        composing one that :meth:`resolved` gives: its base composed, its values literals.
        Any other point is composed (and kept for :meth:`take`); an error raises here."""
        if self.resolved(master, overrides) is None:
            self(master, overrides)

    def validated(self, master: DictConfig, overrides: list[str]) -> bool:
        """Whether the sweeper composed this point already (:meth:`take` hands it out)."""
        return (id(master), tuple(overrides)) in self.built

    def resolved(self, master: DictConfig, overrides: list[str]) -> tuple[dict[str, Any], str] | None:
        """(the point's run config, resolved, without ``hydra``; its sweep dir), or None where
        only composing the point gives them exactly.

        The point's plain trainer values (``++trainer.NAME=LITERAL``) are set into the
        resolved config of the rest of its overrides (composed once per distinct rest);
        anything else, a value that is not a plain literal, or a config that interpolates
        the trainer or the ``hydra`` node (whose job number differs per point) gives None.
        """
        found = self._base_and_values(master, overrides)
        if found is None:
            return None
        base, values = found
        # A shallow copy: the plan reads the config, never changes it. An existing key keeps
        # its place and a new one comes last, as OmegaConf.update does (the script's argv order).
        return {**base.run_config, "trainer": {**base.run_config["trainer"], **values}}, base.sweep_dir

    def files(self, master: DictConfig, overrides: list[str], idx: int, output_dir: str) -> PointFiles:
        """The ``.hydra`` files of a point :meth:`resolved` gives, as composing it would write
        them (tests/test_plan.py compares the text): its base's, with the point's trainer
        values and the fields Hydra and the launcher set per job (``overrides.task``,
        ``job.override_dirname``, ``job.num``, ``job.id``, ``runtime.output_dir``)."""
        found = self._base_and_values(master, overrides)
        assert found is not None, "only a point resolved() gives"
        base, values = found
        hydra, naming = base.raw_hydra, base.naming
        # Hydra's own naming, which reads only each override's line and key.
        keyed = [
            SimpleNamespace(input_line=line, key_or_group=base.keys.get(line, line.partition("=")[0].lstrip("+")))
            for line in overrides
        ]
        dirname = hydra_compat.overrides_dirname(
            keyed, naming["kv_sep"], naming["item_sep"], list(naming["exclude_keys"])
        )
        own = {
            ("trainer",): {**base.raw_config["trainer"], **values},
            ("hydra", "overrides", "task"): list(overrides),
            ("hydra", "job", "num"): idx,
            ("hydra", "job", "id"): str(idx),  # a str in Hydra's schema
            ("hydra", "job", "override_dirname"): dirname,
            ("hydra", "runtime", "output_dir"): output_dir,
        }
        config = hydra_files.mapping_text(base.raw_config, own, base.texts)
        node = hydra_files.mapping_text({"hydra": hydra}, own, base.texts)
        subdir = hydra["output_subdir"]
        return PointFiles(None if subdir is None else str(subdir), config, node, list(overrides))

    def _base_and_values(self, master: DictConfig, overrides: list[str]) -> tuple[_Base, dict[str, Any]] | None:
        base_lines, values = [], {}
        for line in overrides:
            found = _TRAINER_VALUE.fullmatch(line)
            if found is None:
                if _TRAINER_KEY.match(line):  # +trainer.x, trainer.x.y=..., ~trainer.x: Hydra's order and merges
                    return None
                base_lines.append(line)
                continue
            value = literal(found.group(2))
            if value is _NOT_LITERAL:
                return None
            values[found.group(1)] = value
        key = (id(master), tuple(base_lines))
        if key not in self.resolved_bases:
            self.resolved_bases[key] = self._resolved_base(master, base_lines)
        base = self.resolved_bases[key]
        if base is None:
            return None
        trainer = base.run_config["trainer"]
        if any(isinstance(trainer.get(name), (dict, list)) or name in base.typed for name in values):
            return None  # Hydra would merge into it, or check the value against its type
        return base, values

    def _resolved_base(self, master: DictConfig, lines: list[str]) -> _Base | None:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        if master.hydra.get("callbacks"):
            return None
        try:
            cfg = self._compose(master, lines)
        except Exception:  # noqa: BLE001 -- composing the point itself reports it, the slow way
            return None
        if str(_mapping(cfg.hydra.sweep, resolve=False).get("subdir")) != "${hydra.job.num}":
            return None  # the run dir depends on more than the job number
        sweep_dir = str(cfg.hydra.sweep.dir)
        raw_hydra = _mapping(cfg.hydra, resolve=False, enum_to_str=True)
        naming = _mapping(cfg.hydra.job.config.override_dirname, resolve=True)
        with open_dict(cfg):
            del cfg["hydra"]
        raw = _mapping(cfg, resolve=False, enum_to_str=True)
        assert isinstance(raw, dict) and isinstance(raw_hydra, dict) and isinstance(naming, dict)
        for path, text in _interpolations(raw):
            if path[0] == "trainer" or "trainer" in text or "hydra" in text:
                return None
        data = _mapping(cfg, resolve=True)
        assert isinstance(data, dict)
        if not isinstance(data.get("trainer"), dict) or not isinstance(raw.get("trainer"), dict):
            return None
        trainer = cfg.trainer
        if OmegaConf.get_type(trainer) is not dict:  # a structured config: Hydra checks its keys and types
            return None
        typed = hydra_compat.typed_keys(trainer)
        parsed = OverridesParser.create().parse_overrides(overrides=lines)  # one per line, in order
        keys = {line: o.key_or_group for line, o in zip(lines, parsed)}
        return _Base(data, sweep_dir, raw, raw_hydra, keys, naming, typed, {})

    def forget_points(self) -> None:
        self.built.clear()

    def _compose(self, master: DictConfig, overrides: list[str]) -> DictConfig:
        split = self._split(master, overrides)
        if split is None:
            return self.hydra_compose(master, overrides)
        group_lines, values, parsed = split
        key = (id(master), tuple(group_lines))
        base = self.bases.get(key)
        if base is None:
            # Kept pickled: unpickling makes each point's own copy (same nodes, types and
            # flags) ~5x faster than copy.deepcopy of the composed config.
            base = self.bases[key] = pickle.dumps(self.hydra_compose(master, group_lines))
        config = pickle.loads(base)
        self._apply(config, values, parsed)
        OmegaConf.copy_cache(from_config=master, to_config=config)
        return config

    def _split(self, master: DictConfig, overrides: list[str]) -> tuple[list[str], list[Any], list[Any]] | None:
        """(group override lines, value overrides, all parsed) or None for Hydra's own path."""
        from hydra.core.override_parser.overrides_parser import OverridesParser

        if master.hydra.get("callbacks"):
            return None
        parsed = OverridesParser.create().parse_overrides(overrides=overrides)
        if any(o.is_hydra_override() or o.is_sweep_override() for o in parsed):
            return None
        repo = self._repo(master)
        if repo is None:
            return None
        groups, values = [], []
        for line, override in zip(overrides, parsed):  # one per line, in order
            # Hydra's own test (defaults_list._create_overrides_from_overrides_list): a key
            # that names a config group, with a non-dict value, selects an option.
            if repo.group_exists(override.key_or_group) and not isinstance(override.value(), dict):
                groups.append(line)
            else:
                values.append(override)
        return groups, values, parsed

    def _repo(self, master: DictConfig) -> Any:
        repo = self.repos.get(id(master))
        if repo is None:
            # Unresolved, as Hydra's load_sweep_config reads them: hydra.sweep.subdir=${...} stays text.
            hydra_lines = OmegaConf.to_container(master.hydra.overrides.hydra, resolve=False)
            assert isinstance(hydra_lines, list)
            repo = hydra_compat.caching_repo(self.loader, master.hydra.job.config_name, hydra_lines)
            if repo is None:  # another Hydra: compose every point the slow way
                return None
            self.repos[id(master)] = repo
        return repo

    @staticmethod
    def _apply(config: DictConfig, values: list[Any], parsed: list[Any]) -> None:
        """What Hydra's ``_load_configuration_impl`` does after composing, for these overrides."""
        from hydra.errors import ConfigCompositionException

        try:
            hydra_compat.apply_overrides(values, config)
        except OmegaConfBaseException as exc:  # as Hydra's load_configuration reports it
            raise ConfigCompositionException().with_traceback(sys.exc_info()[2]) from exc
        naming = config.hydra.job.config.override_dirname
        with open_dict(config.hydra):
            config.hydra.overrides.task = [o.input_line for o in parsed]
            config.hydra.job.override_dirname = hydra_compat.overrides_dirname(
                parsed, naming.kv_sep, naming.item_sep, list(naming.exclude_keys)
            )


_TRAINER_VALUE = re.compile(r"\+\+trainer\.([A-Za-z_][A-Za-z0-9_]*)=(.*)", re.DOTALL)
_TRAINER_KEY = re.compile(r"[+~]*trainer\b")
_NOT_LITERAL = object()
# Hydra's grammar, for the literals a grid or a sampler writes (anything else: Hydra's parser).
_INT = re.compile(r"[+-]?(?:0|[1-9][0-9]*)")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?[0-9]+[eE][+-]?[0-9]+")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEYWORDS = {"true": True, "false": False, "null": None}
_FLOAT_WORDS = {
    "inf": math.inf,
    "+inf": math.inf,
    "-inf": -math.inf,
    "nan": math.nan,
    "+nan": math.nan,
    "-nan": math.nan,
}


def literal(text: str) -> Any:
    """The value Hydra's override parser gives a plain literal (int, float, bool, null, a
    word), or ``_NOT_LITERAL`` for anything else (quoted, lists, functions, interpolations,
    words Hydra reads otherwise)."""
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    lower = text.lower()
    if lower in _KEYWORDS:
        return _KEYWORDS[lower]
    if lower in _FLOAT_WORDS:
        return _FLOAT_WORDS[lower]
    if _WORD.fullmatch(text):
        return text
    return _NOT_LITERAL


def _interpolations(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], str]]:
    """(path, text) of every string with an interpolation in a plain container."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _interpolations(value, (*path, str(key)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _interpolations(value, (*path, str(i)))
    elif isinstance(node, str) and "${" in node:
        yield path or ("",), node


def install(loader: Any) -> PointComposer:
    """Route a config loader's sweep compositions (the sweeper's and the launcher's) through
    one :class:`PointComposer`; idempotent."""
    composer = getattr(loader, _INSTALLED, None)
    if composer is None:
        composer = PointComposer(loader)
        hydra_compat.route_sweep_compositions(loader, composer)
        setattr(loader, _INSTALLED, composer)
    return composer
