"""Overrides as people type them and as Python writes them, made into what Hydra's override
grammar reads.

The command line (:func:`normalize`): a ``trainer`` value is the script's own business, so
any text becomes one argv entry of the script, byte for byte (only NUL cannot be in an argv
entry). Hydra's grammar reads some text as syntax (``$(...)``, ``;``, unpaired quotes,
non-ASCII letters, a newline) and rejects a value that is not valid syntax; where it cannot
parse a trainer value at all, tfrun takes the value as literal text. Values it parses keep
their meaning (numbers, lists, ``a,b`` sweeps, quoted strings, ``${...}`` interpolations).

Python values (:func:`override`, for ``tfrun.estimator``): a value pasted into
``key=value`` unquoted is read by Hydra's grammar first (``a,b`` a sweep, ``k=v`` a parse
error, ``true`` a bool, ``1e3`` a float), and OmegaConf then resolves any ``${...}`` in a
string. :func:`override` writes strings quoted, with the characters either layer would read
escaped, and numbers, bools, None, lists and dicts as Hydra's literals, so that a str stays
that str and an int that int. :func:`mapping_overrides` adds a mapping's entries to a
mapping the config has.
"""

from __future__ import annotations

import numbers
import os
import re
from functools import lru_cache
from typing import Any, Mapping

from tfrun.errors import ConfigError

VALUE_TYPES = "a str, int, float, bool, None, or a list or dict of them"
DICT_KEY_HELP = (
    "a str that Hydra's override grammar can write as a dict key: letters, digits, blanks and "
    "_ - . / \\ + $ % * @ ? | ( ) [ ] { } : = , (no quotes), not read as a number, bool or null"
)

# OmegaConf reads "${" in a string as an interpolation, and a run of backslashes right
# before it as escapes of each other: "\${" is a literal "${", "\\${" a backslash and one.
_INTERPOLATION = re.compile(r"(\\*)\$\{")
# Inside a quoted Hydra value only backslashes before its quote (the closing one included)
# are escapes; any other backslash is itself.
_BEFORE_QUOTE = re.compile(r'(\\*)"')
_AT_END = re.compile(r"(\\+)\Z")  # \Z: "$" would also match before a final newline
# Characters a dict key (which Hydra does not let one quote) may hold only escaped.
_KEY_ESCAPES = re.compile(r"([\\()\[\]{}:=, \t])")


def literal_text(text: str) -> str:
    """``text`` as OmegaConf reads it back unchanged: every ``${`` is escaped."""
    return _INTERPOLATION.sub(lambda m: m.group(1) * 2 + "\\${", text)


def quote(text: str) -> str:
    """``text`` as a double-quoted Hydra value that composes to ``text`` itself.

    Double quotes, so that a shell's single quotes hold the whole override unchanged.
    """
    body = _BEFORE_QUOTE.sub(lambda m: m.group(1) * 2 + '\\"', literal_text(text))
    return '"' + _AT_END.sub(lambda m: m.group(1) * 2, body) + '"'


@lru_cache(maxsize=1)
def _parser() -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def dict_key(key: Any, where: str) -> str:
    """A mapping's key as Hydra writes it in ``{key: value}``; ``where`` names the mapping in errors.

    Hydra's grammar has no quoted keys, so a key is escaped and then parsed back: a key
    that comes back as anything else (a quote in it, or ``10`` read as an int) is refused.
    """
    from hydra.errors import HydraException

    text = _KEY_ESCAPES.sub(r"\\\1", key) if isinstance(key, str) else ""
    try:
        parsed = list(_parser().parse_override(f"k={{{text}:0}}").value()) if text else []
    except HydraException:
        parsed = []
    if not isinstance(key, str) or parsed != [key]:
        raise ConfigError.invalid(where, key, DICT_KEY_HELP)
    return text


def value_text(value: Any, key: str) -> str:
    """``value`` as the right-hand side of an override of ``key`` (named in errors)."""
    if value is None:
        return "null"
    if isinstance(value, bool):  # before Integral: a bool is an int in Python
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):  # numpy's ints too
        return str(int(value))
    if isinstance(value, numbers.Real):
        return repr(float(value))  # inf, nan and 1e-05 are Hydra floats as repr writes them
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, os.PathLike):  # a path is its text
        return quote(str(value))
    if isinstance(value, Mapping):
        items = (f"{dict_key(k, key)}:{value_text(v, f'{key}.{k}')}" for k, v in value.items())
        return "{" + ",".join(items) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(value_text(v, key) for v in value) + "]"
    raise ConfigError.invalid(key, value, VALUE_TYPES)


def override(key: str, value: Any, prefix: str = "") -> str:
    """``key=value`` (``prefix``: ``+`` or ``++``) that composes ``key`` to ``value`` exactly."""
    return f"{prefix}{key}={value_text(value, key)}"


def mapping_overrides(key: str, value: Mapping[str, Any]) -> list[str]:
    """Overrides that add ``value``'s entries to the mapping at ``key``, which must exist.

    Hydra's struct mode refuses new keys in a plain ``key={...}``, so the entries are
    force-added (``++``); a ``++`` alone would also create a misspelled ``key``, so an
    empty change (``key={}``, which merges nothing) comes first and fails for one.
    """
    return [f"{key}={{}}", override(key, value, prefix="++")]


_TRAINER = re.compile(r"^(?:\+\+)?trainer\.")


def _parses(line: str) -> bool:
    from hydra.errors import HydraException

    try:
        _parser().parse_override(line)
    except HydraException:  # the grammar's errors (parse_overrides wraps them in OverrideParseException)
        return False
    return True


def trainer_literal(line: str) -> str:
    """A ``trainer.KEY=VALUE`` line whose value Hydra's grammar cannot parse, with the value
    quoted as literal text; any other line as it is."""
    key, sep, value = line.partition("=")
    if not sep or not _TRAINER.match(key) or _parses(line):
        return line
    return f"{key}={quote(value)}"


# The schema's other free-form mappings (``Dict`` fields): any key may be set in them.
FREE_MAPPINGS = ("compute.additional_parameters", "deps.env", "tfrun.tags", "hydra.sweeper.policy_args")
_FREE = re.compile(r"^(" + "|".join(re.escape(k) for k in FREE_MAPPINGS) + r")(\.[^=]+)?=")


def free_mapping(line: str) -> list[str]:
    """``compute.additional_parameters={nodelist:node1}`` or ``deps.env.X=1`` as typed: the
    entries are added (Hydra's struct mode refuses new keys in a plain override), after a
    guard that fails where the mapping does not exist (``compute=local`` has no
    ``additional_parameters``), as :func:`mapping_overrides` does."""
    match = _FREE.match(line)
    if not match:
        return [line]
    return [f"{match.group(1)}={{}}", "++" + line]


@lru_cache(maxsize=1)
def text_list_keys() -> frozenset[str]:
    """Every key the schema types as a list of text (``deps.pip_packages``, ``compute.setup``, ...)."""
    import dataclasses

    from tfrun.config import schema, store

    sections = [("entry", schema.EntryConfig)] + [
        (group, node) for group, options in store.GROUP_SCHEMAS.items() for node in options.values()
    ]
    return frozenset(
        f"{section}.{f.name}"
        for section, node in sections
        for f in dataclasses.fields(node)
        if str(f.type).replace("typing.", "") == "List[str]"
    )


def _top_level_items(body: str) -> list[str]:
    """The comma-separated items of a list's body, commas inside quotes or brackets kept."""
    items, depth, quoted, start = [], 0, "", 0
    for i, char in enumerate(body):
        if quoted:
            quoted = "" if char == quoted and body[i - 1] != "\\" else quoted
        elif char in "'\"":
            quoted = char
        elif char in "[({":
            depth += 1
        elif char in "])}":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(body[start:i])
            start = i + 1
    return [*items, body[start:]]


def text_list_literal(line: str) -> str:
    """A list of text (:func:`text_list_keys`) whose items Hydra's grammar cannot all read
    (``deps.pip_packages=[tabulate,humanize>=4]``: ``>`` is no character of its grammar),
    with each such item quoted as literal text; any other line as it is."""
    key, sep, value = line.partition("=")
    bare = key.lstrip("+")
    if not sep or bare not in text_list_keys() or not (value.startswith("[") and value.endswith("]")) or _parses(line):
        return line
    items = [item.strip() for item in _top_level_items(value[1:-1])]
    fixed = f"{key}=[{','.join(item if _parses(f'k={item}') else quote(item) for item in items)}]"
    return fixed if _parses(fixed) else line


def normalize(argv: list[str]) -> list[str]:
    """``trainer.x=v`` -> ``++trainer.x=v``: trainer keys are free-form, so add-or-set, and a
    value the grammar cannot read is literal text; the same add-or-set for the schema's
    other free-form mappings (:data:`FREE_MAPPINGS`); a list of text whose items the grammar
    cannot all read gets those items quoted (:func:`text_list_literal`).

    With the Optuna sweeper, failed trials are told to the study as failed and the study
    goes on, unless the user set ``hydra.sweeper.max_failure_rate`` themselves.
    """
    argv = [trainer_literal(re.sub(r"^trainer\.", "++trainer.", a)) if not a.startswith("-") else a for a in argv]
    argv = [line for a in argv for line in free_mapping(text_list_literal(a))]
    if "hydra/sweeper=optuna" in argv and not any(a.startswith("hydra.sweeper.max_failure_rate=") for a in argv):
        argv.append("hydra.sweeper.max_failure_rate=1.0")
    return argv
