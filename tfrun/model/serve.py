"""``tfrun serve RUN``: a run's ONNX model over HTTP, answered by onnxruntime.

``POST /predict`` takes ``{"inputs": [[...], ...]}`` (a batch for the model's one input,
or ``{"inputs": {"name": [...], ...}}`` for several) and answers ``{"outputs": [[...]]}``
(``{"outputs": {"name": [...]}}`` for several outputs). ``GET /health`` tells the model
file, its inputs (name, shape, dtype), outputs and opset. An input whose shape does not
fit the model's gets a 400 with the expected and the given shape.

Why the standard library's ``ThreadingHTTPServer`` and no web framework: two JSON
endpoints on loopback need no routing, validation or async layer; nothing more has to
be installed on a cluster node; and an onnxruntime ``InferenceSession`` may be run
from several threads at once, so one thread per request is all the concurrency this
needs. It is meant for trying and checking a trained model, not as a production
model server (that is Triton's or a cloud endpoint's job): there is no
authentication, which is why it listens on loopback unless told otherwise.

No TensorFlow here: only onnxruntime and numpy (and onnx, if installed, for the opset).
"""
from __future__ import annotations

import json
import signal
import socket
import sys
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tfrun import rundir
from tfrun.errors import TfrunError

MAX_BODY_BYTES = 32 * 1024 * 1024
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# onnxruntime's type names -> numpy dtype names
_DTYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
           "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int16)": "int16", "tensor(int8)": "int8",
           "tensor(uint8)": "uint8", "tensor(bool)": "bool"}


class BadRequest(Exception):
    """A request the model cannot answer; the message goes back with a 400."""


@dataclass
class Served:
    """The model being served and what its inputs and outputs look like."""

    path: Path
    session: Any  # onnxruntime.InferenceSession
    inputs: list[dict[str, Any]]  # name, shape (None for a free dimension), dtype
    outputs: list[str]
    opset: int | None

    def health(self) -> dict[str, Any]:
        """What GET /health answers."""
        return {"status": "ok", "model": str(self.path), "opset": self.opset, "inputs": self.inputs,
                "outputs": self.outputs}


def _opset(path: Path) -> int | None:
    try:
        import onnx
    except ImportError:
        return None
    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def load(path: Path) -> Served:
    """An onnxruntime session of the model, with its inputs described."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise TfrunError(f"onnxruntime cannot load {path}: {exc}") from exc
    inputs = [{"name": i.name, "shape": [d if isinstance(d, int) else None for d in i.shape],
               "dtype": _DTYPES.get(i.type, i.type)} for i in session.get_inputs()]
    return Served(path, session, inputs, [o.name for o in session.get_outputs()], _opset(path))


def shape_text(shape: list[int | None]) -> str:
    """``[N, 64]``: free dimensions shown as N."""
    return "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"


def check_shape(name: str, expected: list[int | None], given: tuple[int, ...]) -> None:
    """BadRequest unless ``given`` fits ``expected`` (None matches any size)."""
    fits = len(expected) == len(given) and all(e is None or e == g for e, g in zip(expected, given))
    if not fits:
        raise BadRequest(f"input {name!r} has shape {list(given)}; the model expects {shape_text(expected)} "
                         f"(N: any size), e.g. a batch of rows")


def _array(name: str, value: Any, spec: dict[str, Any]) -> Any:
    import numpy as np

    try:
        array = np.asarray(value, dtype=spec["dtype"])
    except (ValueError, TypeError) as exc:
        raise BadRequest(f"input {name!r} is not a rectangular array of {spec['dtype']} numbers: {exc}") from exc
    check_shape(name, spec["shape"], array.shape)
    return array


def predict(served: Served, payload: Any) -> dict[str, Any]:
    """The answer to a /predict body; BadRequest for anything the model cannot take."""
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise BadRequest('the body must be a JSON object {"inputs": [[...], ...]}')
    given = payload["inputs"]
    names = [i["name"] for i in served.inputs]
    if not isinstance(given, dict):
        if len(names) != 1:
            raise BadRequest(f"the model has {len(names)} inputs: send {{\"inputs\": {{name: [...]}}}} "
                             f"with names {names}")
        given = {names[0]: given}
    if sorted(given) != sorted(names):
        raise BadRequest(f"inputs {sorted(given)} given; the model's inputs are {names}")
    feed = {spec["name"]: _array(spec["name"], given[spec["name"]], spec) for spec in served.inputs}
    try:
        results = served.session.run(None, feed)
    except Exception as exc:  # onnxruntime's own checks (values out of range, ...)
        raise BadRequest(f"onnxruntime could not run the model on these inputs: {exc}") from exc
    if len(results) == 1:
        return {"outputs": results[0].tolist()}
    return {"outputs": {name: r.tolist() for name, r in zip(served.outputs, results)}}


class Handler(BaseHTTPRequestHandler):
    """GET /health, POST /predict; every answer is JSON."""

    served: Served  # set on the subclass make_server builds
    server_version = "tfrun-serve"

    def _reply(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.split("?")[0] == "/health":
            self._reply(200, self.served.health())
        else:
            self._reply(404, {"error": f"no {self.path}: GET /health, POST /predict"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path.split("?")[0] != "/predict":
            self._reply(404, {"error": f"no {self.path}: GET /health, POST /predict"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self._reply(413, {"error": f"body of {length} bytes; at most {MAX_BODY_BYTES}"})
            return
        try:
            payload = json.loads(self.rfile.read(length) or b"null")
        except json.JSONDecodeError as exc:
            self._reply(400, {"error": f"the body is not JSON: {exc}"})
            return
        try:
            self._reply(200, predict(self.served, payload))
        except BadRequest as exc:
            self._reply(400, {"error": str(exc)})

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        print(f"tfrun serve: {self.address_string()} {format % args}", file=sys.stderr, flush=True)


def make_server(served: Served, host: str, port: int) -> ThreadingHTTPServer:
    """A threading HTTP server for the model (IPv6 if host is an IPv6 address)."""
    handler = type("ModelHandler", (Handler,), {"served": served})
    server_class = type("Server", (ThreadingHTTPServer,), {
        "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET, "daemon_threads": True})
    try:
        return server_class((host, port), handler)
    except OSError as exc:
        raise TfrunError(f"cannot listen on {host}:{port}: {exc.strerror or exc} "
                         f"(choose another --port, or --port 0 for any free one)") from exc


def model_path(run: str | None, model: str | None) -> Path:
    """The .onnx file of a run: --model, else the one its last export wrote."""
    run_dir = rundir.find_run(run)
    outputs = run_dir / "outputs"
    record = rundir.read_json(run_dir / "export.json") or {}
    path = outputs / model if model else Path(record.get("onnx") or outputs / "model.onnx")
    if path.is_file():
        return path
    hint = f" (its last export failed: {record['error']})" if record.get("error") else ""
    raise TfrunError(f"no {path}{hint}; export the run first: tfrun export {run_dir}")


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def cmd_serve(run: str | None, host: str = "127.0.0.1", port: int = 8080, model: str | None = None) -> int:
    """``tfrun serve RUN``: serve until Ctrl-C (or SIGTERM); 0 once stopped."""
    served = load(model_path(run, model))
    server = make_server(served, host, port)
    url = _url(host, server.server_address[1])
    if host not in LOOPBACK:
        print(f"tfrun: warning: listening on {host}: anyone who can reach it can use the model "
              f"(no authentication)", file=sys.stderr)
    shapes = ", ".join(f"{i['name']} {shape_text(i['shape'])}" for i in served.inputs)
    print(f"tfrun: serving {served.path} ({shapes}) at {url}", file=sys.stderr)
    print(f"tfrun: POST {url}/predict, GET {url}/health; Ctrl-C stops", file=sys.stderr, flush=True)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops it like Ctrl-C
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.server_close()
    print("tfrun: serve stopped", file=sys.stderr, flush=True)
    return 0

