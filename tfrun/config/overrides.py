"""Override lines as people type them, made into what Hydra's override grammar reads.

A ``trainer`` value is the script's own business: any text becomes one argv entry of the
script, byte for byte (only NUL cannot be in an argv entry). Hydra's grammar reads some
text as syntax (``$(...)``, ``;``, unpaired quotes, non-ASCII letters, a newline) and
rejects a value that is not valid syntax. Where it cannot parse a trainer value at all,
tfrun takes the value as literal text, quoted for the grammar; values it parses keep their
meaning (numbers, lists, ``a,b`` sweeps, ``'quoted'`` strings, ``${...}`` interpolations).
:func:`quote` also serves callers that build overrides from Python values.
"""
from __future__ import annotations

import re

_TRAINER = re.compile(r"^(?:\+\+)?trainer\.")
# Inside a quoted value, a backslash escapes a quote, an interpolation, or the backslashes
# before those and before the closing quote: only such backslashes need doubling.
_BACKSLASHES = re.compile(r"\\+(?=\$\{|'|$)")


def quote(text: str) -> str:
    """``text`` as a quoted value of Hydra's grammar that reads back as exactly ``text`` (an
    interpolation in it stays text)."""
    body = _BACKSLASHES.sub(lambda m: m.group(0) * 2, text)
    return "'" + body.replace("'", "\\'").replace("${", "\\${") + "'"


def _parses(line: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        OverridesParser.create().parse_override(line)
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


def normalize(argv: list[str]) -> list[str]:
    """``trainer.x=v`` -> ``++trainer.x=v``: trainer keys are free-form, so add-or-set, and a
    value the grammar cannot read is literal text.

    With the Optuna sweeper, failed trials are told to the study as failed and the study
    goes on, unless the user set ``hydra.sweeper.max_failure_rate`` themselves.
    """
    argv = [trainer_literal(re.sub(r"^trainer\.", "++trainer.", a)) if not a.startswith("-") else a for a in argv]
    if "hydra/sweeper=optuna" in argv and not any(a.startswith("hydra.sweeper.max_failure_rate=") for a in argv):
        argv.append("hydra.sweeper.max_failure_rate=1.0")
    return argv
