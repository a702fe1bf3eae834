"""``tfrun tune resume SWEEP``: follow a tuning study of ``hydra/sweeper=tfrun`` again after its
tfrun was stopped or killed (:func:`tfrun.cli.app.resume_study`)."""

from __future__ import annotations

import argparse

from tfrun.cli import verbs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``tune``'s actions and their arguments."""
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    resume = verbs.add_subparser(
        actions,
        "resume",
        "follow a study again after its tfrun was stopped or killed: "
        "trials still running are followed, ended ones told, missing "
        "ones started (refused while another tfrun follows it)",
    )
    resume.add_argument("sweep", help="the study's sweep dir, its id, or a unique part of it")


def run(args: argparse.Namespace) -> int:
    """Reattach to the study; the study's exit code."""
    from tfrun.cli import app

    return app.resume_study(args.sweep)
