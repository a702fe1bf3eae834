"""A Griffe extension for the API pages: tfrun's docstrings use reST inline markup
(``:class:`tfrun.Run```, ``literal``, ``text::`` before an example); the pages are
Markdown. Roles become code spans and ``::`` a colon, so nothing shows literally."""
from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|obj|data|exc):`~?([^`]+)`")
_LITERAL_BLOCK = re.compile(r"(\S)::$", re.M)


def markdown(text: str) -> str:
    """reST inline roles -> ``code``; a paragraph ending in ``::`` -> ``:``."""
    return _LITERAL_BLOCK.sub(r"\1:", _ROLE.sub(r"``\1``", text))


class RestToMarkdown(griffe.Extension):
    """Rewrites every docstring once it is loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
