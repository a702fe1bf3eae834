"""``tfrun export [RUN]``: convert a finished run's model to ONNX and check it (tfrun/model/export.py)."""

from __future__ import annotations

import argparse

from tfrun.cli.common import add_run
from tfrun.errors import ONNX, require


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``export``'s arguments."""
    add_run(parser)
    parser.add_argument("--opset", type=int, help="ONNX opset (default: the run's export.opset, else 17)")
    parser.add_argument("--tolerance", type=float, help="largest max abs difference allowed (default 1e-4)")
    parser.add_argument("--samples", type=int, help="random inputs compared (default 16)")
    parser.add_argument("--model", help="the model, relative to outputs/ (default: found there)")
    parser.add_argument("--output", help="file name written in outputs/ (default model.onnx)")


def run(args: argparse.Namespace) -> int:
    """Export and check; 0 if the ONNX model matches the model."""
    from tfrun.config.validate import ONNX_PACKAGES

    require("tfrun export", ONNX_PACKAGES, ONNX)
    from tfrun.cli.live import step
    from tfrun.model import export

    with step("exporting the model to ONNX and checking it against the model"):
        return export.cmd_export(
            args.run,
            opset=args.opset,
            tolerance=args.tolerance,
            samples=args.samples,
            model=args.model,
            output=args.output,
        )
