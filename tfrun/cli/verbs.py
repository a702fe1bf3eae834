"""The verbs of ``tfrun`` (``tfrun status``, ``tfrun logs``, ...): the one list of them.

Each verb is a module of its own, ``tfrun.cli.cmd_<verb>``, with ``add_arguments(parser)``
and ``run(args) -> exit code``. ``tfrun --help``, the docs (``docs/gen_reference.py``) and
shell completion read :data:`VERBS`; a verb's module is imported only when that verb runs
(or its parser is built), so ``tfrun --help`` imports none of them.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from types import ModuleType

from tfrun.cli import output
from tfrun.errors import TfrunError


@dataclass(frozen=True)
class Verb:
    """One verb: its name and the line ``tfrun --help`` shows for it."""

    name: str
    summary: str

    @property
    def module(self) -> str:
        """The module that implements it."""
        return f"tfrun.cli.cmd_{self.name}"

    def load(self) -> ModuleType:
        """Its module (imported now)."""
        return importlib.import_module(self.module)


VERBS: tuple[Verb, ...] = (
    Verb("status", "state of a run or sweep, per rank; why it failed"),
    Verb("watch", "a live table of a run or sweep: state, epoch, metrics, time left"),
    Verb("logs", "a rank's log"),
    Verb("cancel", "cancel a run or every unfinished point of a sweep"),
    Verb("resume", "continue a stopped (or failed, cancelled, timed-out) run from its backup"),
    Verb("runs", "recent runs"),
    Verb("plot", "PNG of a metric's learning curves, one line per run"),
    Verb("tensorboard", "TensorBoard over a sweep's runs, named by the parameters that differ"),
    Verb("export", "convert a finished run's model to ONNX and check it against the model"),
    Verb("serve", "serve a run's outputs/model.onnx (or a registered models:/NAME/VERSION) over HTTP with onnxruntime"),
    Verb("sync", "send MLflow what a run (tracking=mlflow) recorded and it lacks"),
    Verb("env", "the cached environments of deps=pip|conda: list, prune"),
    Verb("tune", "tuning studies of hydra/sweeper=tfrun: resume one"),
)
BY_NAME = {verb.name: verb for verb in VERBS}


class Formatter(argparse.HelpFormatter):
    """Help that names each option's default, where it has one worth naming."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            default is None
            or default is False
            or default == argparse.SUPPRESS
            or "%(default)" in text
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def describe(summary: str) -> str:
    """A summary as a sentence (for a verb's own ``--help``)."""
    return summary[:1].upper() + summary[1:] + "."


def add_subparser(sub: argparse._SubParsersAction, name: str, summary: str) -> argparse.ArgumentParser:
    """A (sub-)verb's parser, with the project's help formatter."""
    return sub.add_parser(name, help=summary, description=describe(summary), formatter_class=Formatter)


def parser(only: str | None = None) -> argparse.ArgumentParser:
    """The verbs' command line: every verb (the docs), or ``only`` one (what a verb's run needs)."""
    top = argparse.ArgumentParser(
        prog="tfrun", description="Inspect and control tfrun runs.", formatter_class=Formatter
    )
    sub = top.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb in VERBS:
        if only is None or verb.name == only:
            verb.load().add_arguments(add_subparser(sub, verb.name, verb.summary))
    return top


def main(argv: list[str]) -> int:
    """Run the verb ``argv[0]`` with its arguments: bad input exits 2, a failure 1."""
    args = parser(argv[0]).parse_args(argv)
    try:
        return int(BY_NAME[args.verb].load().run(args))
    except TfrunError as exc:  # bad input (a run that is not there, a wrong value): 2; a failure: 1
        output.error(str(exc))
        return exc.exit_code
