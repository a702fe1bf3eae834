"""Secrets kept out of what others read: MLflow's params, tags and artifacts, and the line a
task's log gets about the environment tfrun set.

A value is secret when its key looks like a secret's (its name holds one of
:data:`SECRET_WORDS`, in any case: ``deps.env.API_TOKEN``, ``db_password``), and so is the
``user:password`` part of a URI anywhere (``postgresql://bob:pw@db/x``). Both are replaced
by :data:`MASK`. The plan and the task's environment keep the real values: only the copies
made for others to read are masked, all through :class:`Redactor` (and :func:`shown` for a
single variable).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping

MASK = "***"
SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD")
# In free text, a secret value is found by itself only from this length on: a shorter one
# ("1", "yes") would mask ordinary words and numbers all over a log. Shorter values are
# still masked after their key (``API_TOKEN=abc``) and wherever data has keys.
MIN_FREE_TEXT = 4

_SECRET_NAME = re.compile("|".join(SECRET_WORDS), re.IGNORECASE)
_URI_CREDENTIALS = re.compile(r"(?<=://)[^/@\s:'\"]*:[^/@\s'\"]*@")
# NAME=value, NAME: value, "NAME": "value" (overrides, YAML, JSON, log lines)
_ASSIGNMENT = re.compile(r"(?P<key>[A-Za-z_][\w.\-]*)(?P<sep>[\"']?\s*[=:]\s*[\"']?)(?P<value>[^\s\"',]+)")


def is_secret(key: str) -> bool:
    """Does this key (a dotted path, or a variable's name) look like it names a secret?"""
    return bool(_SECRET_NAME.search(key))


def uri_credentials(text: str) -> str:
    """``text`` with the ``user:password@`` of every URI in it masked."""
    return _URI_CREDENTIALS.sub(MASK + "@", text)


def shown(key: str, value: str) -> str:
    """How a variable's value is shown in a log: masked if the key looks secret, else with
    any URI's credentials masked."""
    return MASK if is_secret(key) else uri_credentials(value)


def _leaves(data: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(data, Mapping):
        for key, value in data.items():
            yield from _leaves(value, f"{path}.{key}" if path else str(key))
    elif isinstance(data, (list, tuple)):
        for value in data:
            yield from _leaves(value, path)
    else:
        yield path, data


class Redactor:
    """Masks what a run's config holds as secret, in data and in text made from it."""

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        names: set[str] = set()
        values: set[str] = set()
        for path, value in _leaves(config or {}):
            if isinstance(value, str):  # a URI's password, wherever the URI is
                values.update(m.group(0)[:-1].partition(":")[2] for m in _URI_CREDENTIALS.finditer(value))
            if is_secret(path) and value not in (None, "", True, False):
                names.add(path.rsplit(".", 1)[-1])
                values.add(str(value))
        self.names = frozenset(names)  # the config's secret keys, by their last part
        found = sorted((v for v in values if len(v) >= MIN_FREE_TEXT), key=len, reverse=True)
        self._values = re.compile("|".join(map(re.escape, found))) if found else None

    def text(self, text: str) -> str:
        """``text`` with every secret value of the config, every ``KEY=value`` of a secret key
        and every URI's credentials masked."""
        if self._values is not None:
            text = self._values.sub(MASK, text)
        if self.names:
            text = _ASSIGNMENT.sub(self._assignment, text)
        return uri_credentials(text)

    def _assignment(self, match: re.Match[str]) -> str:
        # Only the config's own secret keys: a general pattern would mask the values of
        # metrics such as "token_accuracy: 0.91" all over a training log.
        key = match.group("key")
        if key.rsplit(".", 1)[-1] not in self.names:
            return match.group(0)
        return f"{key}{match.group('sep')}{MASK}"

    def data(self, data: Any, secret: bool = False) -> Any:
        """A copy of plain data (a config) with the values of secret-looking keys masked
        (``None``, booleans and empty strings, which hide nothing, stay) and free text
        masked as :meth:`text` does."""
        if isinstance(data, Mapping):
            return {key: self.data(value, secret or is_secret(str(key))) for key, value in data.items()}
        if isinstance(data, (list, tuple)):
            return [self.data(value, secret) for value in data]
        if secret and data not in (None, "", True, False):
            return MASK
        return self.text(data) if isinstance(data, str) else data

    def copy_file(self, source: Path, target: Path) -> None:
        """``source`` copied to ``target``, masked if it is text (line by line: logs can be
        large); a binary file is copied as it is."""
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with (
                open(source, encoding="utf-8", newline="") as src,
                open(target, "w", encoding="utf-8", newline="") as dst,
            ):
                for line in src:
                    dst.write(self.text(line))
        except UnicodeDecodeError:
            shutil.copyfile(source, target)

    def copy_tree(self, source: Path, target: Path) -> None:
        """Every file under ``source`` copied to the same place under ``target`` (:meth:`copy_file`)."""
        for path in sorted(source.rglob("*")):
            if path.is_file():
                self.copy_file(path, target / path.relative_to(source))
