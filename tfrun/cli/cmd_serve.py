"""``tfrun serve [RUN | models:/NAME/VERSION]``: a run's ONNX model over HTTP (tfrun/model/serve.py)."""

from __future__ import annotations

import argparse

from tfrun.cli.common import RUN_HELP
from tfrun.errors import ONNX, TRACKING, require


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``serve``'s arguments."""
    parser.add_argument("run", nargs="?", help=RUN_HELP + "; or models:/NAME/VERSION from MLflow's registry")
    parser.add_argument(
        "--tracking-uri", help="MLflow of models:/ (default: $MLFLOW_TRACKING_URI, else the runs dir's mlflow.db)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback only by default)")
    parser.add_argument("--port", type=int, default=8080, help="port (0: any free one)")
    parser.add_argument("--model", help="an .onnx file to serve instead (relative to the run's outputs/)")


def run(args: argparse.Namespace) -> int:
    """Serve until stopped."""
    require("tfrun serve", ["onnxruntime"], ONNX)
    if args.run and args.run.startswith("models:/"):
        require(f"tfrun serve {args.run}", ["mlflow"], TRACKING)
    from tfrun.model import serve

    return serve.cmd_serve(args.run, host=args.host, port=args.port, model=args.model, tracking_uri=args.tracking_uri)
