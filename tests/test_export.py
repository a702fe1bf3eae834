"""ONNX export (``export=onnx``, ``tfrun export``) and ``tfrun serve``: real runs, real HTTP.

The trained runs are real ``tfrun`` invocations; the parity checks compare onnxruntime
with the Keras model itself on the digits data.
"""

from __future__ import annotations

import json
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.helpers import (
    REPO,
    read_json,
    run_dir_from,
    run_tfrun,
    scratch_env,
    tfrun_command,
)
from tfrun.errors import ExportError
from tfrun.model import export, serve

TRAIN_TIMEOUT = 900  # two cores shared with other suites: training plus an export can be slow


def digits_data() -> tuple[Any, Any]:
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.data / 16.0).astype(np.float32), digits.target


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """The digits example trained with export=onnx (shared by the export and serve tests)."""
    tmp = tmp_path_factory.mktemp("digits-onnx")
    # Also registered in MLflow's model registry (a local store beside the runs).
    result = run_tfrun(
        tmp,
        "export=onnx",
        "trainer.epochs=2",
        "tracking=mlflow",
        "tracking.register_model=digits",
        timeout=TRAIN_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    return result, run_dir_from(result.stderr)


# --- fast: checks that need no training ------------------------------------------------


def test_cli_modules_do_not_import_tensorflow_or_onnxruntime() -> None:
    code = (
        "import sys, tfrun.cli.main, tfrun.plan.build, tfrun.model.export, tfrun.model.serve, tfrun.cli.verbs; "
        "bad = [m for m in ('tensorflow', 'keras', 'tf2onnx', 'onnxruntime') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_bad_export_settings_are_config_errors(tmp_path: Path) -> None:
    result = run_tfrun(tmp_path, "--dry-run", "export=onnx", "export.opset=3")
    assert result.returncode == 2
    assert "export.opset=3 is not valid: an integer >= 7" in result.stderr
    result = run_tfrun(tmp_path, "--dry-run", "export=onnx", "export.output=model.bin")
    assert result.returncode == 2 and "export.output='model.bin'" in result.stderr
    shown = run_tfrun(tmp_path, "--dry-run", "export=onnx", "export.opset=13")
    assert shown.returncode == 0 and "export:     rank 0 converts the saved model to onnx" in shown.stdout
    assert "opset=13" in shown.stdout


def test_find_model(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="does not exist"):
        export.find_model(tmp_path / "outputs")
    out = tmp_path / "outputs"
    out.mkdir()
    (out / "final_metrics.json").write_text("{}")
    with pytest.raises(ExportError, match=r"no model in .*final_metrics\.json"):
        export.find_model(out)
    (out / "saved").mkdir()
    (out / "saved" / "saved_model.pb").write_bytes(b"")
    assert export.find_model(out) == out / "saved"
    (out / "a.keras").write_bytes(b"")
    (out / "b.keras").write_bytes(b"")
    with pytest.raises(ExportError, match=r"several models .*a\.keras, b\.keras.*export\.model"):
        export.find_model(out)
    (out / "model.keras").write_bytes(b"")
    assert export.find_model(out) == out / "model.keras"
    assert export.find_model(out, "saved") == out / "saved"
    with pytest.raises(ExportError, match="export.model='nope.h5'"):
        export.find_model(out, "nope.h5")


def test_max_abs_diff() -> None:
    import numpy as np

    assert export.max_abs_diff([np.array([1.0, np.nan])], [np.array([1.5, np.nan])]) == 0.5
    assert export.max_abs_diff([np.array([1.0])], [np.array([np.nan])]) == float("inf")
    with pytest.raises(ExportError, match="1 output"):
        export.max_abs_diff([np.zeros(2), np.zeros(2)], [np.zeros(2)])


def test_check_shape_message() -> None:
    serve.check_shape("x", [None, 64], (5, 64))
    with pytest.raises(serve.BadRequest, match=r"input 'x' has shape \[1, 63\]; the model expects \[N, 64\]"):
        serve.check_shape("x", [None, 64], (1, 63))
    with pytest.raises(serve.BadRequest, match=r"has shape \[64\]"):
        serve.check_shape("x", [None, 64], (64,))


# --- export=onnx at the end of a real run ------------------------------------------------


@pytest.mark.slow
def test_digits_run_exports_a_checked_onnx_model(digits_run: tuple[Any, Path]) -> None:
    result, run_dir = digits_run
    onnx_path = run_dir / "outputs" / "model.onnx"
    assert onnx_path.is_file() and (run_dir / "outputs" / "model.keras").is_file()
    record = read_json(run_dir / "export.json")
    assert record["passed"] is True and record["error"] is None, record
    assert record["max_abs_diff"] <= record["tolerance"] == 1e-4
    assert record["opset"] == 17 and record["kind"] == "keras" and record["onnx"] == str(onnx_path)
    assert record["inputs"][0]["shape"] == [None, 64] and record["seconds"] > 0
    status = read_json(run_dir / "status.json")
    assert status["state"] == "COMPLETED" and status["export"]["passed"] is True
    shown = result.stdout + result.stderr  # what the terminal shows: rank 0's line, once
    assert (
        len([line for line in shown.splitlines() if line.startswith("tfrun: export onnx: ") and "max abs diff" in line])
        == 1
    ), shown
    assert "export onnx: converting" in (run_dir / "logs/rank0.log").read_text()  # it ran in the task

    import keras
    import numpy as np
    import onnxruntime as ort

    x, _ = digits_data()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    want = keras.saving.load_model(str(run_dir / "outputs" / "model.keras")).predict(x, verbose=0)
    assert float(np.abs(got - want).max()) <= 1e-4
    assert (got.argmax(1) == want.argmax(1)).mean() == 1.0


ERFINV_SCRIPT = """\
import os
import keras
from sklearn.datasets import load_digits

digits = load_digits()
x, y = (digits.data / 16.0).astype("float32"), digits.target
inputs = keras.Input(shape=(64,))
h = keras.layers.Dense(16, activation="tanh")(inputs)
h = keras.ops.erfinv(h * 0.9)  # TensorFlow's Erfinv: tf2onnx has no conversion for it
model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(h))
model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
model.fit(x, y, epochs=1, verbose=2)
os.makedirs(os.environ["TFRUN_OUTPUT_DIR"], exist_ok=True)
model.save(os.path.join(os.environ["TFRUN_OUTPUT_DIR"], "model.keras"))
"""


@pytest.mark.slow
def test_unconvertible_op_fails_the_export_not_the_run(tmp_path: Path) -> None:
    script = tmp_path / "erfinv_train.py"
    script.write_text(ERFINV_SCRIPT)
    result = run_tfrun(tmp_path, f"entry.script={script}", "export=onnx", timeout=TRAIN_TIMEOUT)
    assert result.returncode == export.EXIT_EXPORT_FAILED, result.stdout[-3000:] + result.stderr
    run_dir = run_dir_from(result.stderr)
    status = read_json(run_dir / "status.json")
    assert status["state"] == "COMPLETED" and status["exit_codes"] == {"0": 0}
    record = read_json(run_dir / "export.json")
    assert record["passed"] is False and record["onnx"] is None
    assert "tf2onnx cannot convert the TensorFlow op Erfinv" in record["error"], record["error"]
    assert status["export"]["error"] == record["error"]
    shown = result.stdout + result.stderr  # what the terminal shows: rank 0's line, once
    assert shown.count("export onnx FAILED: tf2onnx cannot convert the TensorFlow op Erfinv") == 1, shown
    assert (run_dir / "outputs" / "model.keras").is_file()  # the run's files are kept
    assert not (run_dir / "outputs" / "model.onnx").exists()


@pytest.mark.slow
def test_export_verb_on_a_finished_run(tmp_path: Path) -> None:
    result = run_tfrun(tmp_path, "trainer.epochs=1", timeout=TRAIN_TIMEOUT)
    assert result.returncode == 0, result.stderr
    run_dir = run_dir_from(result.stderr)
    assert not (run_dir / "export.json").exists() and "export" not in read_json(run_dir / "status.json")

    bad = run_tfrun(tmp_path, "export", str(run_dir), "--tolerance", "-1")
    assert bad.returncode == 2 and "export.tolerance=-1.0 is not valid" in bad.stderr

    done = run_tfrun(tmp_path, "export", run_dir.name, "--opset", "13", "--samples", "64", timeout=600)
    assert done.returncode == 0, done.stderr
    record = read_json(run_dir / "export.json")
    assert record["passed"] is True and record["opset"] == 13 and record["samples"] == 64
    assert record["max_abs_diff"] <= 1e-4
    assert read_json(run_dir / "status.json")["export"] == record
    assert (run_dir / "outputs" / "model.onnx").is_file()
    assert f"export onnx: {run_dir / 'outputs' / 'model.onnx'} (opset 13" in done.stderr
    shown = run_tfrun(tmp_path, "status", str(run_dir), timeout=60)
    assert "export onnx: " in shown.stdout


@pytest.mark.slow
def test_ps_tf_keras_saved_model_exports(tmp_path: Path) -> None:
    result = run_tfrun(
        tmp_path,
        f"entry.script={REPO / 'examples/ps_keras/train.py'}",
        "backend=ps",
        "compute.tasks_per_node=4",
        "export=onnx",
        "trainer.epochs=2",
        timeout=TRAIN_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    run_dir = run_dir_from(result.stderr)
    record = read_json(run_dir / "export.json")
    assert record["passed"] is True, record
    assert record["kind"] == "saved_model" and record["model"] == str(run_dir / "outputs" / "model")
    assert record["max_abs_diff"] <= 1e-4

    import numpy as np
    import onnxruntime as ort
    import tensorflow as tf

    x, _ = digits_data()
    session = ort.InferenceSession(record["onnx"], providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    signature = tf.saved_model.load(record["model"]).signatures["serving_default"]
    want = list(signature(tf.constant(x)).values())[0].numpy()
    assert float(np.abs(got - want).max()) <= 1e-4 and (got.argmax(1) == want.argmax(1)).all()


# --- tfrun serve ----------------------------------------------------------------------------


def _read_until(proc: subprocess.Popen[str], pattern: str, timeout: float) -> str:
    """stderr of proc up to the first line containing pattern."""
    assert proc.stderr is not None
    seen = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 0.5)
        if ready:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
            seen += line
            if pattern in line:
                return seen
    pytest.fail(f"no {pattern!r} from tfrun serve within {timeout} s:\n{seen}")


@pytest.fixture
def server(digits_run: tuple[Any, Path], tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str, Path]]:
    """``tfrun serve RUN --port 0`` as a subprocess, and its URL."""
    run_dir = digits_run[1]
    proc = subprocess.Popen(
        [*tfrun_command(), "serve", str(run_dir), "--port", "0"],
        cwd=tmp_path,
        env=scratch_env(tmp_path),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        seen = _read_until(proc, "tfrun: serving", timeout=120)
        url = seen.rsplit(" at ", 1)[1].strip()
        assert url.startswith("http://127.0.0.1:")
        yield proc, url, run_dir
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _request(url: str, body: Any = None, raw: bytes | None = None) -> tuple[int, dict[str, Any]]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(
        url, data=data, method="POST" if data is not None else "GET", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.slow
def test_serve_answers_like_onnxruntime_and_stops_on_sigint(server: tuple[Any, str, Path]) -> None:
    import numpy as np
    import onnxruntime as ort

    proc, url, run_dir = server
    onnx_path = run_dir / "outputs" / "model.onnx"
    code, health = _request(f"{url}/health")
    assert code == 200 and health["status"] == "ok" and health["model"] == str(onnx_path)
    assert health["opset"] == 17 and len(health["inputs"]) == 1
    assert health["inputs"][0]["shape"] == [None, 64] and health["inputs"][0]["dtype"] == "float32"

    x, y = digits_data()
    code, answer = _request(f"{url}/predict", {"inputs": x[:200].tolist()})
    assert code == 200
    served = np.array(answer["outputs"])
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    direct = session.run(None, {session.get_inputs()[0].name: x[:200]})[0]
    assert served.shape == (200, 10)
    assert (served.argmax(1) == direct.argmax(1)).all()
    assert float(np.abs(served - direct).max()) < 1e-6
    assert (served.argmax(1) == y[:200]).mean() > 0.5  # it learned something

    code, error = _request(f"{url}/predict", {"inputs": [[0.0] * 63]})
    assert code == 400
    assert "has shape [1, 63]; the model expects [N, 64]" in error["error"]
    code, error = _request(f"{url}/predict", raw=b"{not json")
    assert code == 400 and "not JSON" in error["error"]
    code, error = _request(f"{url}/predict", {"inputs": [[1.0, 2.0], [3.0]]})
    assert code == 400 and "rectangular" in error["error"]
    code, error = _request(f"{url}/nothing")
    assert code == 404

    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=60)  # reading its pipes while it stops: a full pipe would block it
    assert proc.returncode == 0, rest
    assert "tfrun: serve stopped" in rest and "Traceback" not in rest


@pytest.mark.slow
def test_the_registered_model_version_serves(digits_run: tuple[Any, Path], tmp_path: Path) -> None:
    """``tracking.register_model=digits``: a new version of ``digits`` in MLflow's registry,
    tagged with the run; ``tfrun serve models:/digits/1`` downloads its ONNX file and answers
    as the run's own model does."""
    import numpy as np

    run_dir = digits_run[1]
    store = f"sqlite:///{run_dir.parent / 'mlflow.db'}"
    code = (
        "import json, mlflow; c = mlflow.MlflowClient(%r); v = c.get_model_version('digits', '1');"
        "print(json.dumps({'run_id': v.run_id, 'tags': v.tags, 'source': v.source}))" % store
    )
    version = json.loads(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )
    assert version["tags"]["tfrun.run_dir"] == str(run_dir) and version["tags"]["tfrun.onnx"] == "true"
    assert (
        version["run_id"]
        == read_json(run_dir / "mlflow.json")["run_id"]
        == read_json(run_dir / "status.json")["mlflow_run_id"]
    )
    assert read_json(run_dir / "mlflow.json")["registered"] == {"name": "digits", "version": "1"}
    proc = subprocess.Popen(
        [*tfrun_command(), "serve", "models:/digits/1", "--tracking-uri", store, "--port", "0"],
        cwd=tmp_path,
        env=scratch_env(tmp_path),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = _read_until(proc, "tfrun: serving", timeout=120).rsplit(" at ", 1)[1].strip()
        code, health = _request(f"{url}/health")
        assert code == 200 and health["model"].endswith("model.onnx") and str(run_dir) not in health["model"]
        x, _ = digits_data()
        code, answer = _request(f"{url}/predict", {"inputs": x[:50].tolist()})
        assert code == 200
        import onnxruntime as ort

        session = ort.InferenceSession(str(run_dir / "outputs" / "model.onnx"), providers=["CPUExecutionProvider"])
        direct = session.run(None, {session.get_inputs()[0].name: x[:50]})[0]
        assert float(np.abs(np.array(answer["outputs"]) - direct).max()) < 1e-6
    finally:
        proc.kill()
        proc.wait()
    missing = run_tfrun(tmp_path, "serve", "models:/digits/7", "--tracking-uri", store, timeout=120)
    assert missing.returncode != 0 and "cannot serve models:/digits/7" in missing.stderr


def test_serve_without_an_onnx_model_says_what_to_do(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "r1"
    (run_dir / "outputs").mkdir(parents=True)
    (run_dir / "plan.json").write_text("{}")
    (run_dir / "export.json").write_text(json.dumps({"error": "tf2onnx cannot convert the TensorFlow op Erfinv"}))
    result = run_tfrun(tmp_path, "serve", str(run_dir), timeout=60)
    assert result.returncode == 1
    assert "its last export failed: tf2onnx cannot convert the TensorFlow op Erfinv" in result.stderr
    assert f"tfrun export {run_dir}" in result.stderr


# --- tfrun serve: what it answers to bad requests (a tiny model, no training) -----------------


def tiny_model(path: Path, elem_type: int) -> Path:
    """An ONNX model ``y = x`` for an [N, 3] input of ``elem_type`` (onnx.TensorProto)."""
    import onnx
    from onnx import helper

    x = helper.make_tensor_value_info("x", elem_type, ["N", 3])
    y = helper.make_tensor_value_info("y", elem_type, ["N", 3])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "tiny", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what the installed onnxruntime reads, whatever onnx writes by default
    onnx.save(model, str(path))
    return path


@pytest.fixture
def tiny_servers(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> Iterator[dict[str, int]]:
    """Ports of ``tfrun serve``'s server (``make_server``, as ``cmd_serve`` builds it) for a
    float32 and an int8 model, in threads; afterwards, the servers must have printed no traceback."""
    from onnx import TensorProto

    models = {"float32": TensorProto.FLOAT, "int8": TensorProto.INT8}
    servers = {
        name: serve.make_server(serve.load(tiny_model(tmp_path / f"{name}.onnx", kind)), "127.0.0.1", 0)
        for name, kind in models.items()
    }
    for server in servers.values():
        # a short poll: shutdown() waits for one, and every test starts and stops two servers
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield {name: server.server_address[1] for name, server in servers.items()}
    finally:
        for server in servers.values():
            server.shutdown()
            server.server_close()
    log = capfd.readouterr().err
    assert "Traceback" not in log, log


def _exchange(port: int, request: bytes, half_close: bool = False, timeout: float = 15) -> tuple[int, Any]:
    """Send raw bytes, read until the server closes: (status, JSON body). A server that
    neither answers nor closes within ``timeout`` fails the test (a hung connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(request)
        if half_close:
            conn.shutdown(socket.SHUT_WR)
        answer = b""
        try:
            while chunk := conn.recv(65536):
                answer += chunk
        except TimeoutError:
            pytest.fail(f"no answer within {timeout} s and the connection still open; got {answer!r}")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/"), f"not an HTTP answer: {answer!r}"
    assert b"Content-Type: application/json" in head, head
    return int(head.split()[1]), json.loads(body)


def _post(port: int, body: bytes, length: str | None = None, **kwargs: Any) -> tuple[int, Any]:
    """POST /predict with ``body`` and a Content-Length of ``length`` (its real length if None)."""
    head = f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body) if length is None else length}\r\n\r\n"
    return _exchange(port, head.encode() + body, **kwargs)


def test_serve_answers_good_requests_of_each_dtype(tiny_servers: dict[str, int]) -> None:
    assert _post(tiny_servers["float32"], b'{"inputs": [[1, 2.5, -3e3]]}') == (200, {"outputs": [[1.0, 2.5, -3000.0]]})
    assert _post(tiny_servers["int8"], b'{"inputs": [[1, -128, 127]]}') == (200, {"outputs": [[1, -128, 127]]})


@pytest.mark.parametrize(
    "request_line, code, error",
    [
        (b"PUT /predict HTTP/1.1", 501, "Unsupported method ('PUT')"),
        (b"GET /health HTTP/1.1\r\nX-Long: " + b"x" * 70_000, 431, "Line too long"),
    ],
)
def test_serve_answers_what_http_server_refuses_in_json(
    tiny_servers: dict[str, int], request_line: bytes, code: int, error: str
) -> None:
    assert _exchange(tiny_servers["float32"], request_line + b"\r\n\r\n") == (code, {"error": error})


def test_serve_logs_control_characters_escaped(tiny_servers: dict[str, int], capfd: pytest.CaptureFixture[str]) -> None:
    """A request line is the client's text: escape sequences in it must not reach the terminal
    that shows the log (http.server's own log escapes them as \\xNN; so must tfrun serve's)."""
    code, _ = _exchange(tiny_servers["float32"], b"GET /\x1b[2J\x1b]0;owned\x07\\x1b HTTP/1.1\r\n\r\n")
    assert code == 404
    log = capfd.readouterr().err
    line = next(ln for ln in log.splitlines() if "owned" in ln)
    assert line.startswith("tfrun serve: 127.0.0.1 ") and "\x1b" not in line and "\x07" not in line, repr(line)
    assert '"GET /\\x1b[2J\\x1b]0;owned\\x07\\\\x1b HTTP/1.1" 404' in line, line


@pytest.mark.parametrize("length", ["-1", "abc", "1_0", "+2", "2, 3"])
def test_serve_refuses_a_content_length_that_is_not_a_number_of_bytes(
    tiny_servers: dict[str, int], length: str
) -> None:
    """-1 used to read until the client closed (a hung request), "abc" to drop the connection."""
    code, answer = _post(tiny_servers["float32"], b"{}", length)
    assert code == 400
    assert answer["error"] == f"Content-Length {length!r} is not a number of bytes (a whole number, 0 or more)"


def test_serve_refuses_two_different_content_lengths(tiny_servers: dict[str, int]) -> None:
    code, answer = _exchange(
        tiny_servers["float32"], b"POST /predict HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 40\r\n\r\n{}"
    )
    assert code == 400 and "Content-Length given several times with different values: ['2', '40']" in answer["error"]


def test_serve_refuses_a_body_over_the_limit_and_the_client_reads_why(tiny_servers: dict[str, int]) -> None:
    """The whole body is sent, as an ordinary client does: the answer must reach it, not a reset."""
    body = b" " * (serve.MAX_BODY_BYTES + 1)
    request = urllib.request.Request(f"http://127.0.0.1:{tiny_servers['float32']}/predict", data=body, method="POST")
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=60)
    assert raised.value.code == 413
    assert json.loads(raised.value.read()) == {
        "error": f"body of {serve.MAX_BODY_BYTES + 1} bytes; at most {serve.MAX_BODY_BYTES}"
    }


def test_serve_answers_a_body_shorter_than_its_content_length(
    tiny_servers: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(serve.Handler, "timeout", 1)
    code, answer = _post(tiny_servers["float32"], b'{"inputs"', "100", half_close=True)
    assert code == 400 and answer["error"] == "the body ended after 9 bytes; its Content-Length announced 100"
    code, answer = _post(tiny_servers["float32"], b'{"inputs"', "100", timeout=10)  # the client stalls
    assert code == 400 and answer["error"] == "the body did not arrive within 1 s (Content-Length announced 100 bytes)"


@pytest.mark.parametrize(
    "body, error",
    [
        (b"{not json", "the body is not JSON: Expecting property name enclosed in double quotes: line 1 column 2"),
        (b'{"inputs": [[1, 2, 3]]', "the body is not JSON: Expecting ',' delimiter"),
        (b'{"inputs": "\xff"}', "the body is not UTF-8 text (JSON must be)"),
        (b"[" * 100_000, "the body is not JSON this server reads: it nests too deeply"),
    ],
)
def test_serve_refuses_what_is_not_json(tiny_servers: dict[str, int], body: bytes, error: str) -> None:
    code, answer = _post(tiny_servers["float32"], body)
    assert code == 400 and answer["error"].startswith(error), answer


@pytest.mark.parametrize(
    "payload, error",
    [
        (None, 'the body must be a JSON object {"inputs": [[...], ...]}'),
        ([[1, 2, 3]], 'the body must be a JSON object {"inputs": [[...], ...]}'),
        ({"input": [[1, 2, 3]]}, 'the body must be a JSON object {"inputs": [[...], ...]}'),
        ({"inputs": {"y": [[1, 2, 3]]}}, "inputs ['y'] given; the model's inputs are ['x']"),
        ({"inputs": [[1, 2], [3]]}, "input 'x' is not a rectangular array: its rows differ in length or depth"),
        ({"inputs": [[1, 2, [3]]]}, "input 'x' is not a rectangular array: its rows differ in length or depth"),
        ({"inputs": [1, 2, 3]}, "input 'x' has shape [3]; the model expects [N, 3]"),
        ({"inputs": []}, "input 'x' has shape [0]; the model expects [N, 3]"),
        ({"inputs": 7}, "input 'x' has shape []; the model expects [N, 3]"),
    ],
)
def test_serve_refuses_a_payload_of_the_wrong_structure(tiny_servers: dict[str, int], payload: Any, error: str) -> None:
    code, answer = _post(tiny_servers["float32"], json.dumps(payload).encode())
    assert code == 400 and answer["error"].startswith(error), answer


@pytest.mark.parametrize(
    "model, rows, error",
    [
        ("float32", [["1.5", "2", "3"]], "input 'x' holds strings: the model takes float32, so only numbers"),
        ("float32", [[None, 2, 3]], "input 'x' holds null: the model takes float32, so only numbers"),
        ("float32", [[True, 2, 3]], "input 'x' holds true/false: the model takes float32, so only numbers"),
        ("float32", [[{"v": 1}, "a", 3]], "input 'x' holds objects, strings: the model takes float32, so only numbers"),
        ("float32", [[1e300, 2, 3]], "input 'x' has a value out of the range of float32"),
        ("float32", [[10**400, 2, 3]], "input 'x' has a value out of the range of float32"),
        (
            "int8",
            [[1.5, 2, 3]],
            (
                "input 'x' holds numbers with a decimal point: the model takes int8, "
                "so only whole numbers (no decimal point)"
            ),
        ),
        ("int8", [[300, 2, 3]], "input 'x' has a value out of the range of int8"),
    ],
)
def test_serve_refuses_values_of_the_wrong_dtype(
    tiny_servers: dict[str, int], model: str, rows: Any, error: str
) -> None:
    """Numeric strings, null and true used to be read as numbers; 300 for int8 and 10**400
    for float32 used to drop the connection."""
    code, answer = _post(tiny_servers[model], json.dumps({"inputs": rows}).encode())
    assert code == 400 and answer["error"].startswith(error), answer


# --- on Slurm: the export runs inside the job --------------------------------------------------


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_run_exports_inside_the_job(tmp_path: Path, job_name: str) -> None:
    result = run_tfrun(
        tmp_path,
        "compute=slurm",
        f"compute.job_name={job_name}",
        "export=onnx",
        "trainer.epochs=1",
        timeout=TRAIN_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    run_dir = run_dir_from(result.stderr)
    status = read_json(run_dir / "status.json")
    assert status["state"] == "COMPLETED" and status["export"]["passed"] is True
    assert (run_dir / "outputs" / "model.onnx").is_file()
    assert "export onnx: converting" in (run_dir / "logs/rank0.log").read_text()
    assert "tfrun: export onnx: " in result.stderr
