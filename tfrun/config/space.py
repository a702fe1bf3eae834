"""A tuning study's search space, from Hydra's sweep syntax.

``interval(a,b)`` (a float between; ``tag(log, ...)`` on a log scale, ``tag(int, ...)`` an
integer), ``choice(x,y,...)`` and ``x,y,...`` (one of), ``range(a,b[,step])`` (an integer or
a value of the range): the sweeps of the command line become the space, every other
override is the same in every trial. Pure data: the Optuna distributions are made where the
study runs (:mod:`tfrun.tune.tuning`), so that ``--dry-run`` needs no Optuna.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Any, Sequence

from tfrun.errors import ConfigError


@dataclass(frozen=True)
class Dimension:
    """One searched key: ``kind`` is float, int or choice."""

    key: str  # as written on the command line, with any + or ++ prefix
    kind: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    @property
    def name(self) -> str:
        """The key without its prefix: the name of the parameter in the study."""
        return self.key.lstrip("+~")

    def describe(self) -> str:
        """One line: ``trainer.lr: float in [0.0001, 0.1], log scale``."""
        if self.kind == "choice":
            return f"{self.name}: one of {', '.join(map(_text, self.choices))}"
        scale = ", log scale" if self.log else ""
        step = f", step {self.step:g}" if self.step not in (None, 1) else ""
        return f"{self.name}: {self.kind} in [{self.low:g}, {self.high:g}]{step}{scale}"

    def grid(self) -> list[Any]:
        """Every value (a grid search); an interval of floats has no finite list."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            assert self.low is not None and self.high is not None
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        raise ConfigError(
            f"hydra.sweeper.sampler=grid needs a finite list of values for {self.name}, but "
            f"{self.describe()} is a continuous interval: use choice(...) or range(...) for it, "
            f"or another sampler (random, tpe, qmc)"
        )

    def first(self) -> Any:
        """The first value: the first choice, or the lower bound."""
        if self.kind == "choice":
            return self.choices[0]
        assert self.low is not None  # an int or float dimension is made with its bounds
        return int(self.low) if self.kind == "int" else self.low


@dataclass(frozen=True)
class Space:
    """The searched dimensions and the overrides every trial shares."""

    dimensions: tuple[Dimension, ...]
    fixed: tuple[str, ...]

    def overrides(self, params: dict[str, Any]) -> list[str]:
        """A trial's overrides: its values, then the shared ones."""
        return [f"{d.key}={_text(params[d.name])}" for d in self.dimensions] + list(self.fixed)

    def grid(self) -> list[dict[str, Any]]:
        """Every combination, in the order written (the last key varies fastest)."""
        names = [d.name for d in self.dimensions]
        return [dict(zip(names, values)) for values in itertools.product(*(d.grid() for d in self.dimensions))]

    def first(self) -> dict[str, Any]:
        """The first value of every dimension (the example trial ``--dry-run`` plans)."""
        return {d.name: d.first() for d in self.dimensions}


def _text(value: Any) -> str:
    """A value as an override's text that Hydra reads back as that one value: a string with a
    comma, a quote, a bracket, a space (``choice("a,b",sgd)``) or that would read as another
    type (``'1'``, ``'null'``) is quoted; ``None`` is ``null`` (``None`` reads as a string)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # nan, inf and -inf read back as floats too
    if isinstance(value, str) and _read(value) != value:
        return _quoted(value)
    return str(value)


def _read(text: str) -> Any:
    """What Hydra's override grammar makes of ``key=text``: its value, or None for a sweep or an
    override it cannot parse (either way, not ``text``)."""
    from hydra.errors import HydraException

    try:
        override = _parser().parse_override(f"key={text}")
    except HydraException:
        return None
    if override.is_sweep_override():
        return None
    value = override.value()
    return value if isinstance(value, str) else None


@functools.lru_cache(maxsize=1)
def _parser() -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def _quoted(text: str) -> str:
    """``text`` in Hydra's single quotes: a quote is escaped, and so are the backslashes just
    before a quote or at the end (the only places the grammar reads a backslash as an escape)."""
    out, pending = [], 0  # pending: backslashes seen and not yet written
    for char in text:
        if char == "\\":
            pending += 1
            continue
        out.append("\\" * (pending * 2 if char == "'" else pending))
        pending = 0
        out.append("\\'" if char == "'" else char)
    out.append("\\" * pending * 2)
    return "'" + "".join(out) + "'"


def _dimension(key: str, sweep: Any) -> Dimension:
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    tags = set(getattr(sweep, "tags", set()) or set())
    if isinstance(sweep, IntervalSweep):
        assert sweep.start is not None and sweep.end is not None  # the grammar's interval(a,b) has both
        low, high = float(sweep.start), float(sweep.end)
        if not low < high:
            raise ConfigError(
                f"{key}=interval({sweep.start}, {sweep.end}) is empty: the first bound must be below the second"
            )
        if "log" in tags and low <= 0:
            raise ConfigError(f"{key}: a log-scale interval needs a positive lower bound, got {sweep.start}")
        kind = "int" if "int" in tags else "float"
        return Dimension(key, kind, low=low, high=high, log="log" in tags)
    if isinstance(sweep, RangeSweep):
        step = sweep.step if sweep.step is not None else 1
        values = list(_frange(sweep.start, sweep.stop, step))
        if not values:
            raise ConfigError(f"{key}=range({sweep.start}, {sweep.stop}, {step}) has no values")
        if all(isinstance(v, int) for v in values):
            return Dimension(key, "int", low=values[0], high=values[-1], step=step)
        return Dimension(key, "choice", choices=tuple(values))
    if isinstance(sweep, ChoiceSweep):
        if not sweep.list:
            raise ConfigError(f"{key}=choice() has no values")
        return Dimension(key, "choice", choices=tuple(sweep.list))
    raise ConfigError(
        f"{key}: the tfrun sweeper searches interval(...), choice(...), range(...) and a,b,... "
        f"(optionally tag(log, ...) or tag(int, ...)), not {sweep!r}"
    )


def _frange(start: Any, stop: Any, step: Any) -> Any:
    if all(isinstance(v, int) for v in (start, stop, step)):
        return range(start, stop, step)
    values, value = [], start
    while (step > 0 and value < stop - 1e-12) or (step < 0 and value > stop + 1e-12):
        values.append(round(value, 12))
        value += step
    return values


def parse(arguments: Sequence[str], params: dict[str, str] | None = None) -> Space:
    """The space of a study from its overrides (and ``hydra.sweeper.params``, as Hydra's
    sweepers take them); a study with nothing to search is an error."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = [f"{k}={v}" for k, v in (params or {}).items()] + list(arguments)
    dimensions, fixed = [], []
    for line, override in zip(lines, OverridesParser.create().parse_overrides(lines)):  # one per line, in order
        if override.is_sweep_override():
            dimensions.append(_dimension(override.get_key_element(), override.value()))
        else:
            fixed.append(line)
    if not dimensions:
        raise ConfigError(
            "hydra/sweeper=tfrun has an empty search space: give at least one key to search, e.g. "
            "'trainer.lr=tag(log,interval(1e-4,1e-1))', 'trainer.batch_size=choice(32,64)' or "
            "'trainer.epochs=range(5,20,5)'"
        )
    names = [d.name for d in dimensions]
    if len(set(names)) != len(names):
        raise ConfigError(
            f"the search space names a key twice: {', '.join(sorted(n for n in names if names.count(n) > 1))}"
        )
    return Space(tuple(dimensions), tuple(fixed))
