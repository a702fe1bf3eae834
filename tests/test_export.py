"""ONNX export (``export=onnx``, ``tfrun export``) and ``tfrun serve``: real runs, real HTTP.

The trained runs are real ``tfrun`` invocations; the parity checks compare onnxruntime
with the Keras model itself on the digits data.
"""
from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.helpers import REPO, read_json, run_dir_from, run_tfrun, scratch_env, tfrun_command
from tfrun.model import export, serve
from tfrun.errors import ExportError

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
    result = run_tfrun(tmp, "export=onnx", "trainer.epochs=2", timeout=TRAIN_TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    return result, run_dir_from(result.stderr)


# --- fast: checks that need no training ------------------------------------------------

def test_cli_modules_do_not_import_tensorflow_or_onnxruntime() -> None:
    code = ("import sys, tfrun.cli.main, tfrun.plan.build, tfrun.model.export, tfrun.model.serve, tfrun.cli.verbs; "
            "bad = [m for m in ('tensorflow', 'keras', 'tf2onnx', 'onnxruntime') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
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
    assert "tfrun: export onnx: " in result.stderr and "max abs diff" in result.stderr
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
    assert "export onnx FAILED: tf2onnx cannot convert the TensorFlow op Erfinv" in result.stderr
    assert (run_dir / "outputs" / "model.keras").is_file()  # the run's files are kept
    assert not (run_dir / "outputs" / "model.onnx").exists()


@pytest.mark.slow
def test_export_verb_on_a_finished_run(tmp_path: Path) -> None:
    result = run_tfrun(tmp_path, "trainer.epochs=1", timeout=TRAIN_TIMEOUT)
    assert result.returncode == 0, result.stderr
    run_dir = run_dir_from(result.stderr)
    assert not (run_dir / "export.json").exists() and "export" not in read_json(run_dir / "status.json")

    bad = run_tfrun(tmp_path, "export", str(run_dir), "--tolerance", "-1")
    assert bad.returncode == 1 and "export.tolerance=-1.0 is not valid" in bad.stderr

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
    result = run_tfrun(tmp_path, f"entry.script={REPO / 'examples/ps_keras/train.py'}", "backend=ps",
                       "compute.tasks_per_node=4", "export=onnx", "trainer.epochs=2", timeout=TRAIN_TIMEOUT)
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
    proc = subprocess.Popen([*tfrun_command(), "serve", str(run_dir), "--port", "0"], cwd=tmp_path,
                            env=scratch_env(tmp_path), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
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
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET",
                                     headers={"Content-Type": "application/json"})
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
    assert proc.wait(timeout=30) == 0
    rest = proc.stderr.read()
    assert "tfrun: serve stopped" in rest and "Traceback" not in rest


def test_serve_without_an_onnx_model_says_what_to_do(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "r1"
    (run_dir / "outputs").mkdir(parents=True)
    (run_dir / "plan.json").write_text("{}")
    (run_dir / "export.json").write_text(json.dumps({"error": "tf2onnx cannot convert the TensorFlow op Erfinv"}))
    result = run_tfrun(tmp_path, "serve", str(run_dir), timeout=60)
    assert result.returncode == 1
    assert "its last export failed: tf2onnx cannot convert the TensorFlow op Erfinv" in result.stderr
    assert f"tfrun export {run_dir}" in result.stderr


# --- on Slurm: the export runs inside the job --------------------------------------------------

@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_run_exports_inside_the_job(tmp_path: Path) -> None:
    import uuid

    name = f"tfrun-test-{uuid.uuid4().hex[:8]}"
    try:
        result = run_tfrun(tmp_path, "compute=slurm", f"compute.job_name={name}", "export=onnx",
                           "trainer.epochs=1", timeout=TRAIN_TIMEOUT)
    finally:
        subprocess.run(["scancel", f"--name={name}"], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    run_dir = run_dir_from(result.stderr)
    status = read_json(run_dir / "status.json")
    assert status["state"] == "COMPLETED" and status["export"]["passed"] is True
    assert (run_dir / "outputs" / "model.onnx").is_file()
    assert "export onnx: converting" in (run_dir / "logs/rank0.log").read_text()
    assert "tfrun: export onnx: " in result.stderr
