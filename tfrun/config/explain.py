"""Composition errors in one paragraph: the key, the value given, and what is allowed.

Hydra and OmegaConf say what went wrong in their own terms (a grammar error, a merge
failure, a search path dump); these turn such an error into what a user can act on.
"""

from __future__ import annotations

import re
from typing import Any

from omegaconf import OmegaConf

# Text without blanks, quotes or shell syntax: a value that only needs quoting for Hydra.
_PLAIN = re.compile(r"[\w.,:/=+\-@%~]*")


def _type_name(tp: Any) -> str:
    name = getattr(tp, "__name__", None)
    return name if name and not getattr(tp, "__args__", None) else str(tp).replace("typing.", "")


def _explain_parse(exc: Any) -> str:
    """An override Hydra's grammar rejects: name its key and value, say what to do."""
    override = re.sub(r"^\+\+(?=trainer\.)", "", exc.override)  # our own add-or-set prefix
    key, sep, value = override.partition("=")
    cause = exc.__context__ if str(exc.__context__ or "").strip() else None
    reason = (str(cause) if cause else exc.message).strip().splitlines()[0].rstrip(".")
    shown = f"{key}={value!r}" if sep else repr(override)
    if value.startswith("[") and value.endswith("]"):  # a list: each item is quoted on its own
        hint = (
            "quote each item with blanks or special characters in double quotes, the whole override in "
            f"the shell's single quotes: '{key}=[a,\"b>=4\"]'"
        )
    elif _PLAIN.fullmatch(value):  # e.g. ~/data: fine as a value, but Hydra wants it quoted
        hint = f"quote it for Hydra, inside the shell's quotes: \"{key}='{value}'\""
    else:
        hint = "quote a value with blanks or special characters for Hydra, inside the shell's quotes: \"key='a b'\""
    return f"{shown} could not be parsed ({reason}): {hint}."


def _explain_validation(cause: Any) -> str | None:
    """A value of the wrong type for a schema field: key, value and the field's type."""
    import dataclasses
    import typing

    key, value = getattr(cause, "full_key", None), getattr(cause, "value", None)
    owner = getattr(cause, "object_type", None)
    if not key:
        return None
    reason = str(getattr(cause, "msg", cause)).strip().splitlines()[0].rstrip(".")
    wanted = ""
    if owner is not None and dataclasses.is_dataclass(owner):
        field_type = typing.get_type_hints(owner).get(str(getattr(cause, "key", "")))
        wanted = f"expected {_type_name(field_type)} " if field_type is not None else ""
    return f"{key}={value!r} is not valid: {wanted}({reason})."


def _of_key(line: str, full_key: str) -> bool:
    """Does an override set ``full_key`` or an entry of it (``compute.additional_parameters.foo=1``)?"""
    key = line.lstrip("+~").partition("=")[0]
    return key == full_key or key.startswith(full_key + ".")


def options_with(group: str, key: str) -> list[str]:
    """tfrun's options of ``group`` whose schema has ``key`` (``compute``, ``partition``: slurm)."""
    import dataclasses

    from tfrun.config.store import GROUP_SCHEMAS

    return [
        option
        for option, node in GROUP_SCHEMAS.get(group, {}).items()
        if key in {f.name for f in dataclasses.fields(node)}
    ]


def _explain_unknown_key(full_key: str, overrides: list[str], config_dir: str | None) -> str | None:
    """An override of a key the schema does not have: list the keys it does have, and name the
    options of its group that have it."""
    parent, _, key = full_key.rpartition(".")
    rest = [o for o in overrides if not _of_key(o, full_key)]
    from tfrun.config.compose import compose_config

    try:
        cfg = compose_config(rest, config_dir)
        # Any: a config's keys are strs, which OmegaConf's types (any key) cannot say.
        node: Any = OmegaConf.select(cfg, parent) if parent else cfg
        keys = sorted(k for k in node.keys() if k != "hydra")
        chosen = OmegaConf.select(cfg, f"hydra.runtime.choices.{parent}") if parent else None
    except Exception:  # the explanation must not hide the original error
        return None
    if OmegaConf.get_type(node) is dict:  # a free-form mapping (deps.env): any key may be added
        given = [o.lstrip("+~") for o in overrides if o.lstrip("+~").startswith(full_key + "=")]
        return f"{full_key} is not in {parent} yet; add it with +{given[0] if given else full_key + '=VALUE'}"
    where = f"{parent}={chosen}" if chosen else parent or "the config"
    message = f"{full_key} is not a key of {where}; allowed keys: {', '.join(keys)}"
    owners = [o for o in options_with(parent, key) if o != chosen]
    if owners:
        message += (
            f". {key} is a key of {' and '.join(f'{parent}={o}' for o in owners)}: pick it with {parent}={owners[0]}"
        )
    return message


TUNING = "-m hydra/sweeper=tfrun tfrun.objective=METRIC"  # what a search space needs (docs/guides/sweeps.md)


def _sweep_overrides(overrides: list[str]) -> list[tuple[str, bool]]:
    """(override as typed, is it a search interval) of every override that is a sweep."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType
    from hydra.errors import HydraException

    found = []
    for line in overrides:
        try:
            parsed = OverridesParser.create().parse_override(line)
        except HydraException:
            continue
        if parsed.is_sweep_override():
            shown = re.sub(r"^\+\+(?=trainer\.)", "", line)  # our own add-or-set prefix
            found.append((shown, parsed.value_type == ValueType.INTERVAL_SWEEP))
    return found


def _explain_sweep(message: str, overrides: list[str]) -> str | None:
    """A sweep without ``-m``, or a search space (``interval(...)``) without the tuning sweeper:
    say what to add."""
    ambiguous = re.match(r"Ambiguous value for argument '(?:\+\+(?=trainer\.))?(([^=']+)=([^']*))'", message)
    if ambiguous:
        line, key, value = ambiguous.groups()
        return (
            f"{line} is a sweep (one run per value): add -m to run it; for a list write {key}=[{value}], "
            f"for text \"{key}='{value}'\""
        )
    if not (message.startswith("Sweep parameters") or "does not support sweep type" in message):
        return None
    sweeps = _sweep_overrides(overrides)
    intervals = [line for line, interval in sweeps if interval]
    if intervals:
        return (
            f"{intervals[0]} is a search space (interval) for tuning: add {TUNING}, e.g. "
            f"tfrun {TUNING.replace('METRIC', 'val_accuracy')} '{intervals[0]}'"
        )
    if sweeps and "requires --multirun" in message:
        return f"{sweeps[0][0]} is a sweep (one run per value): add -m to run it, e.g. tfrun -m '{sweeps[0][0]}'"
    return None


def explain(exc: Exception, overrides: list[str], config_dir: str | None = None) -> str:
    """One message for a composition Hydra rejected: the key, the value, what is allowed."""
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(exc, OverrideParseException):
        return _explain_parse(exc)
    if isinstance(exc, MissingConfigException) and exc.options is not None and exc.missing_cfg_file:
        group, _, name = exc.missing_cfg_file.rpartition("/")
        if group:
            return (
                f"{group}={name} is not an option of {group}; available options: {', '.join(exc.options) or '(none)'}"
            )
    message = str(exc).strip()
    explained = _explain_sweep(message, overrides)
    if explained:
        return explained
    cause = exc.__cause__ or exc.__context__
    if type(cause).__name__ == "ValidationError" and message.startswith("Error merging override"):
        explained = _explain_validation(cause)
        if explained:
            return explained
    match = re.search(r"Could not override '([\w.]+)'", message)
    if match:
        explained = _explain_unknown_key(match.group(1), overrides, config_dir)
        if explained:
            return explained
    if cause is not None and str(cause).strip() and str(cause).strip() not in message:
        message += "\n" + str(cause).strip()
    # Hydra's search-path dump helps nobody here.
    return message.split("\nConfig search path:")[0]
