"""``tfrun --shell-completion``: Hydra's completion of overrides, with tfrun's verbs.

``eval "$(tfrun -sc install=bash)"`` installs Hydra's bash completion for ``tfrun``; its
queries (``tfrun -sc query=bash`` with ``COMP_LINE`` set) come here: the first word
completes to a verb as well as an override, a verb's argument to a run id, anything else
to what Hydra offers.
"""

from __future__ import annotations

import os
import sys

from tfrun.cli import output, verbs

USAGE = (
    "tfrun --shell-completion (-sc) takes one of install=SHELL, uninstall=SHELL, query=SHELL (SHELL: bash, "
    'zsh, fish); to complete tfrun\'s verbs and overrides in bash: eval "$(tfrun -sc install=bash)"'
)


def _run_ids(prefix: str) -> list[str]:
    from tfrun import rundir

    root = rundir.runs_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix))


def own_words(line: str) -> tuple[list[str], bool]:
    """tfrun's own completions of ``line`` (verbs for the first word, run ids for a verb's
    argument) and whether they are all there is (else Hydra's completions follow)."""
    words = line.split()[1:]  # after `tfrun`
    current = "" if line.endswith(" ") else (words.pop() if words else "")
    if not words:
        return [v for v in [*verbs.BY_NAME, "help"] if v.startswith(current)], False
    if words[0] in verbs.BY_NAME:
        return ([] if current.startswith("-") else _run_ids(current)), True
    return [], False


def main(argv: list[str]) -> int:
    """Answer ``-sc``/``--shell-completion``; anything but one action is a usage error."""
    actions = [a for a in argv if "=" in a and a.split("=", 1)[0] in ("install", "uninstall", "query")]
    if len(actions) != 1:
        output.error(USAGE)
        return output.EXIT_CONFIG
    line = os.environ.get("COMP_LINE")
    if actions[0].startswith("query=") and line is not None:
        words, only = own_words(line)
        if words:
            print(" ".join(words), flush=True)
        if only:
            return 0
    from tfrun.cli import app

    sys.argv[0] = "tfrun"  # the name Hydra's script calls back
    return app.main(argv)
