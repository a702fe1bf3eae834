"""``tfrun serve RUN``: a run's ONNX model over HTTP, answered by onnxruntime.

``POST /predict`` takes ``{"inputs": [[...], ...]}`` (a batch for the model's one input,
or ``{"inputs": {"name": [...], ...}}`` for several) and answers ``{"outputs": [[...]]}``
(``{"outputs": {"name": [...]}}`` for several outputs). ``GET /health`` tells the model
file, its inputs (name, shape, dtype), outputs and opset. A request the model cannot take
gets a 400 with ``{"error": ...}`` saying why (a Content-Length that is not a number of
bytes, a body that is not UTF-8 JSON, not ``{"inputs": ...}``, values of the wrong type
or range for the input's dtype, an input of the wrong shape); a body over
``MAX_BODY_BYTES`` gets a 413. Never a traceback, never a dropped or hung connection.

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
import os
import re
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tfrun import rundir
from tfrun.errors import TfrunError, UsageError
from tfrun.paths import RunPaths

MAX_BODY_BYTES = 32 * 1024 * 1024
READ_TIMEOUT_S = 60  # a client silent this long mid-request gets its 400 and the thread is freed
DRAIN_S = 5  # at most this long reading (and dropping) a refused body, so its sender sees the answer
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# onnxruntime's type names -> numpy dtype names
_DTYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int16)": "int16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


# The JSON values (as json.loads gives them) each kind of input dtype takes, and how to say
# so. Exact types: True is an int to Python and numpy reads "1.5" as a float, but a
# true/false or a string sent for a float input is a mistake to report, not a 1.0 to use.
_TAKES: dict[str, tuple[frozenset[type], str]] = {
    "f": (frozenset({int, float}), "numbers"),
    "i": (frozenset({int}), "whole numbers (no decimal point)"),
    "u": (frozenset({int}), "whole numbers (no decimal point)"),
    "b": (frozenset({bool}), "true or false"),
}
# C0 and C1 control characters (and the backslash, so an escape cannot be forged) as \xNN:
# what http.server's own log_message does to what it logs.
_CONTROL_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))} | {ord("\\"): "\\\\"}
_JSON_NAMES = {
    str: "strings",
    type(None): "null",
    bool: "true/false",
    int: "whole numbers",
    float: "numbers with a decimal point",
    dict: "objects",
}


class BadRequest(Exception):
    """A request the model cannot answer; the message goes back with ``status`` (400)."""

    status = 400


class BodyTooLarge(BadRequest):
    """A body over MAX_BODY_BYTES: 413, and the body is never read."""

    status = 413


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
        return {
            "status": "ok",
            "model": str(self.path),
            "opset": self.opset,
            "inputs": self.inputs,
            "outputs": self.outputs,
        }


def _opset(path: Path) -> int | None:
    try:
        import onnx
    except ImportError:  # onnx is optional: /health then says the opset is unknown
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
    inputs = [
        {
            "name": i.name,
            "shape": [d if isinstance(d, int) else None for d in i.shape],
            "dtype": _DTYPES.get(i.type, i.type),
        }
        for i in session.get_inputs()
    ]
    return Served(path, session, inputs, [o.name for o in session.get_outputs()], _opset(path))


def shape_text(shape: list[int | None]) -> str:
    """``[N, 64]``: free dimensions shown as N."""
    return "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"


def check_shape(name: str, expected: list[int | None], given: tuple[int, ...]) -> None:
    """BadRequest unless ``given`` fits ``expected`` (None matches any size)."""
    fits = len(expected) == len(given) and all(e is None or e == g for e, g in zip(expected, given))
    if not fits:
        raise BadRequest(
            f"input {name!r} has shape {list(given)}; the model expects {shape_text(expected)} "
            f"(N: any size), e.g. a batch of rows"
        )


def _array(name: str, value: Any, spec: dict[str, Any]) -> Any:
    """``value`` (parsed JSON) as an array of the input's dtype; BadRequest unless it is a
    rectangular array whose every value is of a JSON type that dtype takes, in its range,
    of the input's shape."""
    import numpy as np

    try:
        dtype = np.dtype(spec["dtype"])
    except TypeError:  # an onnxruntime type numpy has no name for, e.g. tensor(string)
        dtype = np.dtype(object)  # kind "O": not one that JSON values are fed as
    if dtype.kind not in _TAKES:
        raise BadRequest(
            f"input {name!r} is of type {spec['dtype']}, which tfrun serve cannot feed "
            f"(it feeds number and bool inputs)"
        )
    ragged = BadRequest(f"input {name!r} is not a rectangular array: its rows differ in length or depth")
    try:
        # dtype=object keeps every value as JSON gave it, for the type check; rows of
        # different lengths leave lists inside the array (numpy < 1.24 raised instead)
        array = np.asarray(value, dtype=object)
    except ValueError as exc:
        raise ragged from exc
    found = {type(v) for v in array.flat}
    if list in found:
        raise ragged
    takes, what = _TAKES[dtype.kind]
    if found - takes:
        given = ", ".join(sorted(_JSON_NAMES.get(t, t.__name__) for t in found - takes))
        raise BadRequest(f"input {name!r} holds {given}: the model takes {dtype.name}, so only {what}")
    check_shape(name, spec["shape"], array.shape)
    try:
        with np.errstate(over="raise"):  # 1e300 for a float32 input: an error, not inf
            return array.astype(dtype)
    except (OverflowError, FloatingPointError) as exc:
        raise BadRequest(f"input {name!r} has a value out of the range of {dtype.name}: {exc}") from exc


def predict(served: Served, payload: Any) -> dict[str, Any]:
    """The answer to a /predict body; BadRequest for anything the model cannot take."""
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise BadRequest('the body must be a JSON object {"inputs": [[...], ...]}')
    given = payload["inputs"]
    names = [i["name"] for i in served.inputs]
    if not isinstance(given, dict):
        if len(names) != 1:
            raise BadRequest(
                f'the model has {len(names)} inputs: send {{"inputs": {{name: [...]}}}} with names {names}'
            )
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


def body_length(headers: Message) -> int:
    """The byte count Content-Length announces (0 without one); BadRequest unless it is one
    whole number of bytes (``int()`` alone would take -1, which reads until the client
    closes, and raise on "abc"), BodyTooLarge over MAX_BODY_BYTES."""
    if "chunked" in (headers.get("Transfer-Encoding") or "").lower():
        raise BadRequest("a chunked body is not read: send the body with a Content-Length")
    values = {v.strip() for v in headers.get_all("Content-Length") or []}
    if len(values) > 1:
        raise BadRequest(f"Content-Length given several times with different values: {sorted(values)}")
    text = values.pop() if values else "0"
    if not re.fullmatch(r"[0-9]+", text):
        raise BadRequest(f"Content-Length {text!r} is not a number of bytes (a whole number, 0 or more)")
    length = int(text)
    if length > MAX_BODY_BYTES:
        raise BodyTooLarge(f"body of {length} bytes; at most {MAX_BODY_BYTES}")
    return length


def parse_json(body: bytes) -> Any:
    """The body as JSON (an empty body is null); BadRequest unless it is UTF-8 JSON."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"the body is not UTF-8 text (JSON must be): {exc}") from exc
    try:
        return json.loads(text or "null")
    except json.JSONDecodeError as exc:
        raise BadRequest(f"the body is not JSON: {exc}") from exc
    except RecursionError as exc:  # a body of "[[[[..." nests deeper than the parser goes
        raise BadRequest("the body is not JSON this server reads: it nests too deeply") from exc


class Handler(BaseHTTPRequestHandler):
    """GET /health, POST /predict; every answer is JSON."""

    served: Served  # set on the subclass make_server builds
    server_version = "tfrun-serve"
    timeout = READ_TIMEOUT_S  # on the connection's socket: a stalled client cannot hold a thread forever

    def _reply(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except ConnectionError:  # the client left before its answer: one log line, not a traceback
            self.close_connection = True
            self.log_error("the client closed the connection before the %d answer", code)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.split("?")[0] == "/health":
            self._reply(200, self.served.health())
        else:
            self._reply(404, {"error": f"no {self.path}: GET /health, POST /predict"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path.split("?")[0] != "/predict":
            self._refuse(404, f"no {self.path}: GET /health, POST /predict")
            return
        try:
            body = self._read_body()
        except BadRequest as exc:
            self._refuse(exc.status, str(exc))
            return
        try:
            code, answer = 200, predict(self.served, parse_json(body))
        except BadRequest as exc:
            code, answer = exc.status, {"error": str(exc)}
        except Exception as exc:  # a bug here or in onnxruntime: still an answer, not a dropped connection
            self.log_error("failed on a request: %s: %s", type(exc).__name__, exc)
            code, answer = 500, {"error": f"tfrun serve failed on this request: {type(exc).__name__}: {exc}"}
        self._reply(code, answer)

    def _read_body(self) -> bytes:
        """The body, exactly as long as its Content-Length; BadRequest if it is not."""
        length = body_length(self.headers)
        try:
            body = self.rfile.read(length)
        except TimeoutError as exc:
            raise BadRequest(
                f"the body did not arrive within {self.timeout} s (Content-Length announced {length} bytes)"
            ) from exc
        if len(body) < length:
            raise BadRequest(f"the body ended after {len(body)} bytes; its Content-Length announced {length}")
        return body

    def _refuse(self, code: int, error: str) -> None:
        """Answer ``error`` to a request not read to its end, then read and drop what the
        client still sends, for up to DRAIN_S seconds.

        Closing a socket with unread data makes the kernel answer with a reset, so a client
        still sending (a body over MAX_BODY_BYTES, say) would get "connection reset" instead
        of this answer. Our side is shut first, so the answer is complete before the drain.
        """
        self.close_connection = True
        self._reply(code, {"error": error})
        deadline = time.monotonic() + DRAIN_S
        try:
            self.connection.shutdown(socket.SHUT_WR)
            while (left := deadline - time.monotonic()) > 0:
                self.connection.settimeout(left)
                if not self.rfile.read1(64 * 1024):
                    return  # the client closed its side: nothing more is coming
        except OSError:  # timed out, or the client reset: either way, done with it
            return

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a request line it cannot parse, a method other than
        GET and POST, headers too long) in JSON like every other answer, not its HTML page."""
        self._refuse(code, message or self.responses.get(code, (f"HTTP {code}",))[0])

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        """One line per request or error on stderr, control characters escaped as the
        standard library's handler escapes them: a request line is the client's text, and
        raw escape sequences from it would reach the terminal that shows the log."""
        message = (format % args).translate(_CONTROL_ESCAPES)
        print(f"tfrun serve: {self.address_string()} {message}", file=sys.stderr, flush=True)


def make_server(served: Served, host: str, port: int) -> ThreadingHTTPServer:
    """A threading HTTP server for the model (IPv6 if host is an IPv6 address)."""
    handler = type("ModelHandler", (Handler,), {"served": served})
    server_class = type(
        "Server",
        (ThreadingHTTPServer,),
        {"address_family": socket.AF_INET6 if ":" in host else socket.AF_INET, "daemon_threads": True},
    )
    try:
        return server_class((host, port), handler)
    except OSError as exc:
        raise TfrunError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc} "
            f"(choose another --port, or --port 0 for any free one)"
        ) from exc


def model_path(run: str | None, model: str | None) -> Path:
    """The .onnx file of a run: --model, else the one its last export wrote."""
    run_dir = rundir.find_one_run(run)
    outputs = RunPaths.of(run_dir).outputs
    if model:
        path = outputs / model
        if path.is_file():
            return path
        found = sorted(str(p.relative_to(outputs)) for p in outputs.rglob("*.onnx")) if outputs.is_dir() else []
        there = f"its .onnx files: {', '.join(found)}" if found else f"it has none (export it: tfrun export {run_dir})"
        raise UsageError(f"--model {model!r}: no {path}; {there}")
    record = rundir.read_json(RunPaths.of(run_dir).export) or {}
    path = Path(record.get("onnx") or outputs / "model.onnx")
    if path.is_file():
        return path
    hint = f" (its last export failed: {record['error']})" if record.get("error") else ""
    raise TfrunError(f"no {path}{hint}; export the run first: tfrun export {run_dir}")


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def registered_path(uri: str, tracking_uri: str | None, dst: Path) -> Path:
    """The .onnx file of a registered model version (``models:/NAME/VERSION``), downloaded into ``dst``."""
    from tfrun.tracking import mlflow_sync

    tracking = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow_sync.tracking_uri({}, rundir.runs_root())
    try:
        return mlflow_sync.registered_onnx(uri, tracking, dst)
    except Exception as exc:
        raise TfrunError(f"cannot serve {uri} from MLflow at {tracking}: {type(exc).__name__}: {exc}") from exc


def cmd_serve(
    run: str | None,
    host: str = "127.0.0.1",
    port: int = 8080,
    model: str | None = None,
    tracking_uri: str | None = None,
) -> int:
    """``tfrun serve RUN``: serve until Ctrl-C (or SIGTERM); 0 once stopped."""
    if run and run.startswith("models:/"):
        with tempfile.TemporaryDirectory(prefix="tfrun-model-") as download:  # removed once serving ends
            return _serve(load(registered_path(run, tracking_uri, Path(download))), host, port)
    return _serve(load(model_path(run, model)), host, port)


def _serve(served: Served, host: str, port: int) -> int:
    server = make_server(served, host, port)
    url = _url(host, server.server_address[1])
    if host not in LOOPBACK:
        print(
            f"tfrun: warning: listening on {host}: anyone who can reach it can use the model (no authentication)",
            file=sys.stderr,
        )
    shapes = ", ".join(f"{i['name']} {shape_text(i['shape'])}" for i in served.inputs)
    print(f"tfrun: serving {served.path} ({shapes}) at {url}", file=sys.stderr)
    print(f"tfrun: POST {url}/predict, GET {url}/health; Ctrl-C stops", file=sys.stderr, flush=True)
    # SIGTERM stops it like Ctrl-C. SIGINT is set too: a server started in the background of a
    # script inherits SIGINT ignored (the shell's rule for background jobs), and Python then
    # leaves it ignored, so `kill -INT` would not stop it.
    previous = {sig: signal.signal(sig, signal.default_int_handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: how serving is meant to stop
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.server_close()
    print("tfrun: serve stopped", file=sys.stderr, flush=True)
    return 0
