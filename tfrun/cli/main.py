"""The ``tfrun`` command.

``tfrun [OVERRIDES]`` composes a run with Hydra, plans it and launches it;
``tfrun --dry-run[=json] ...`` prints the plan and runs nothing; ``tfrun status|logs|
cancel|runs|tensorboard|...`` act on run directories. Nothing here imports TensorFlow, and
``tfrun --help``, ``--version`` and a verb import only what they need.

Exit codes: 0 the run completed; 1 it failed, timed out or was cancelled; 2 the
configuration or command line was wrong and nothing was started; 3 the run completed
(state COMPLETED, files kept) but the export it asked for (``export=onnx``) failed.
"""

from __future__ import annotations

import difflib
import os
import sys
from typing import Any

from tfrun.cli import output, verbs

# Hydra's options that take the next word as their value (``--config-dir DIR``).
_VALUED = (
    "--config-dir",
    "-cd",
    "--config-name",
    "-cn",
    "--config-path",
    "-cp",
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--experimental-rerun",
)
# Hydra's --info takes one of these as an optional value (``tfrun --info searchpath``).
_INFO = ("--info", "-i")
_INFO_VALUES = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")
_HELP = ("-h", "--help")
_COMPLETION = ("-sc", "--shell-completion")


def not_an_override(argv: list[str]) -> str | None:
    """The first word that is neither an option, an option's value nor an override (``key=value``,
    ``~key``), e.g. a mistyped verb; None if there is none."""
    for i, arg in enumerate(argv):
        previous = argv[i - 1] if i else ""
        if previous in _VALUED or (previous in _INFO and arg in _INFO_VALUES):
            continue
        if not arg.startswith(("-", "~")) and "=" not in arg:
            return arg
    return None


def unknown_word(word: str) -> str:
    """The error for a word that is no verb and no override, with the closest verb."""
    close = difflib.get_close_matches(word, [*verbs.BY_NAME, "help"], n=1)
    hint = f"did you mean `tfrun {close[0]}`? " if close else ""
    return (
        f"{word!r} is not a verb or an override (key=value, group=option); {hint}"
        f"verbs: {', '.join(verbs.BY_NAME)}; `tfrun --help` says more"
    )


def dispatch(argv: list[str]) -> int:
    """Run what ``argv`` asks for; its exit code."""
    first = argv[0] if argv else ""
    if first == "--version":
        from tfrun import __version__

        print(f"tfrun {__version__}")
        return 0
    if first == "help":
        if argv[1:2] and argv[1] in verbs.BY_NAME:
            return verbs.main([argv[1], "--help"])
        from tfrun.cli import help as usage

        print(usage.text(argv[2:]))
        return 0
    if first in verbs.BY_NAME:
        return verbs.main(argv)
    if any(arg in _COMPLETION or arg.split("=", 1)[0] in _COMPLETION for arg in argv):
        from tfrun.cli import completion

        return completion.main(argv)
    if any(arg in _HELP for arg in argv):
        from tfrun.cli import help as usage

        print(usage.text(argv))
        return 0
    word = not_an_override(argv)
    if word is not None:
        output.error(unknown_word(word))
        return output.EXIT_CONFIG
    from tfrun.cli import app

    return app.main(argv)


def main(argv: list[str] | None = None) -> None:
    """Console entry point (raises SystemExit with the exit code)."""
    sys.exit(dispatch(list(sys.argv[1:] if argv is None else argv)))


def console() -> None:
    """The ``tfrun`` console script: :func:`main`, then a quick exit.

    Once main() is done everything is written; what is left is the interpreter tearing down
    Hydra's and OmegaConf's modules, ~50 ms on every command. So the first exit handler
    registered, which Python runs last, ends the process: by then Python has waited for
    the threads and run every handler registered after it (logging, anything a tracking
    library registered while the command ran); only the teardown is skipped.
    """
    import atexit

    exit_code = [1]  # an exception main() does not turn into an exit: Python's traceback, then 1
    atexit.register(_exit_now, exit_code)
    try:
        main()
        code: Any = 0
    except SystemExit as exc:
        code = exc.code
    except KeyboardInterrupt:
        code = output.EXIT_INTERRUPTED
    except BrokenPipeError:  # `tfrun status | head -3`: the reader has what it wanted
        output.reader_gone()
        code = 0
    if not isinstance(code, int):
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    exit_code[0] = code
    sys.exit(code)


def _exit_now(exit_code: list[int]) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:  # a closed pipe (`tfrun runs | head`)
            output.reader_gone()
        except (OSError, ValueError):  # a stream already closed
            pass
    os._exit(exit_code[0])


if __name__ == "__main__":
    console()
