"""ONNX export of a run's trained model, checked against the model itself (``export=onnx``).

The model the script saved in ``outputs/`` (a Keras 3 ``.keras`` file, a SavedModel
directory such as tf_keras writes, or an ``.h5`` file) is wrapped in a
``tf.function`` with a fixed input signature and converted with
``tf2onnx.convert.from_function``: that path works for Keras 3 and tf_keras alike,
where ``from_keras`` fails on Keras 3 models (see FINDINGS.md). A SavedModel is
converted through its ``serving_default`` signature, so tf_keras is not needed to read
it. The same random inputs then go through onnxruntime and through TensorFlow; the
export fails when the outputs differ by more than ``tolerance`` (max absolute
difference). ``outputs/model.onnx`` exists only when the latest export passed.

The outcome is recorded in ``export.json`` in the run dir (and in ``status.json``).

When it runs: with ``export=onnx``, rank 0's bootstrap runs ``python -m tfrun.model.export
RUN_DIR`` in a child process after the script returned 0 (so on Slurm the export
happens inside the job, on the node that has the model), with the GPUs hidden: the
script's TensorFlow may still hold them, and a crash of the converter cannot take the
rank's own record down with it. A failed export does not fail the run: it stays
COMPLETED with its files, the failure is recorded and printed, and ``tfrun`` exits 3.
``tfrun export RUN`` does the same for a finished run, in the CLI process.

TensorFlow, tf2onnx and onnxruntime are imported only inside functions.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from tfrun import rundir
from tfrun.config import validate
from tfrun.config.schema import OnnxExportConfig
from tfrun.errors import ConfigError, ExportError
from tfrun.paths import RunPaths
from tfrun.states import FINAL, RunState

MIN_OPSET = validate.MIN_OPSET
UNKNOWN_DIM = 8  # size given to unknown non-batch dimensions of the sample inputs
EXIT_EXPORT_FAILED = 3  # tfrun's exit code when the run completed but its export failed


def settings_for(run_dir: str | os.PathLike[str], **overrides: Any) -> OnnxExportConfig:
    """The run's ``export`` section if it asked for ONNX, else the defaults; then overrides."""
    plan = rundir.read_json(RunPaths.of(run_dir).plan, {})
    section = (plan.get("config") or {}).get("export") or {}
    fields = {f.name for f in dataclasses.fields(OnnxExportConfig)}
    base = {k: v for k, v in section.items() if k in fields} if section.get("format") == "onnx" else {}
    settings = OnnxExportConfig(**{**base, **{k: v for k, v in overrides.items() if v is not None}})
    validate.check_export(dataclasses.asdict(settings))
    return settings


# --- finding and loading the model -----------------------------------------------------


def _is_saved_model(path: Path) -> bool:
    return (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file()


def find_model(outputs: Path, model: str | None = None) -> Path:
    """The model to convert: ``model`` (relative to outputs/) or the one the script saved."""
    if model:
        path = outputs / model
        if not path.exists():
            raise ExportError(f"export.model={model!r}: {path} does not exist")
        return path
    if not outputs.is_dir():
        raise ExportError(f"{outputs} does not exist: the script saved nothing")
    if (outputs / "model.keras").is_file():
        return outputs / "model.keras"
    for found in (
        sorted(outputs.glob("*.keras")),
        [outputs] if _is_saved_model(outputs) else [],
        sorted(p for p in outputs.iterdir() if p.is_dir() and _is_saved_model(p)),
        sorted(outputs.glob("*.h5")),
    ):
        if len(found) == 1:
            return found[0]
        if found:
            names = ", ".join(p.name for p in found)
            raise ExportError(
                f"several models in {outputs} ({names}): choose one with export.model=NAME "
                f"(or tfrun export --model NAME)"
            )
    listing = ", ".join(sorted(p.name for p in outputs.iterdir())) or "nothing"
    raise ExportError(
        f"no model in {outputs} (it holds: {listing}); save model.keras, a SavedModel "
        f"directory or an .h5 file there, or name it with export.model=PATH"
    )


@dataclasses.dataclass
class Loaded:
    """A model as one traced TensorFlow function with a fixed input signature."""

    kind: str  # "keras" (Keras 3), "tf_keras", "saved_model"
    function: Any  # tf.function: the reference outputs and what tf2onnx converts
    specs: list[Any]  # tf.TensorSpec per input, in order


def _input_name(raw: str, index: int) -> str:
    name = re.sub(r"[^A-Za-z0-9_]", "_", raw.split(":")[0]) or f"input_{index}"
    return name if name[0].isalpha() else f"input_{name}"


def _keras_function(model: Any, kind: str, path: Path) -> Loaded:
    import tensorflow as tf

    inputs = list(getattr(model, "inputs", None) or [])
    if not inputs:
        raise ExportError(
            f"{path.name}: the model has no known inputs (a subclassed model never called?); "
            f"save a Sequential or functional model, or a SavedModel with a serving signature"
        )
    specs = [
        tf.TensorSpec([d for d in tuple(t.shape)], tf.as_dtype(t.dtype), name=_input_name(t.name, i))
        for i, t in enumerate(inputs)
    ]

    def call(*args: Any) -> Any:
        return model(list(args) if len(args) > 1 else args[0], training=False)

    return Loaded(kind, tf.function(call, input_signature=specs, autograph=False), specs)


def _load_saved_model(path: Path) -> Loaded:
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))
    signature = loaded.signatures.get("serving_default")
    if signature is None:
        raise ExportError(
            f"SavedModel {path} has no serving_default signature (it has: {', '.join(loaded.signatures) or 'none'})"
        )
    _, by_name = signature.structured_input_signature
    names = sorted(by_name)
    specs = [tf.TensorSpec(by_name[n].shape, by_name[n].dtype, name=_input_name(n, i)) for i, n in enumerate(names)]

    def call(*args: Any) -> Any:
        return signature(**dict(zip(names, args)))

    function = tf.function(call, input_signature=specs, autograph=False)
    function._tfrun_keep = loaded  # the signature's variables live as long as the object
    return Loaded("saved_model", function, specs)


def load(path: Path) -> Loaded:
    """Load a .keras/.h5 file (Keras 3, else tf_keras) or a SavedModel directory."""
    if path.is_dir():
        if not _is_saved_model(path):
            raise ExportError(f"{path} is a directory without saved_model.pb: not a SavedModel")
        return _load_saved_model(path)
    if path.suffix not in (".keras", ".h5", ".hdf5"):
        raise ExportError(f"{path.name}: a model file must end in .keras or .h5 (or be a SavedModel directory)")
    try:
        import keras

        return _keras_function(keras.saving.load_model(str(path), compile=False), "keras", path)
    except ExportError:
        raise
    except Exception as keras3_error:  # a tf_keras file Keras 3 cannot read: try tf_keras
        try:
            import tf_keras
        except ImportError:
            raise ExportError(f"Keras could not load {path.name}: {keras3_error}") from keras3_error
        try:
            return _keras_function(tf_keras.models.load_model(str(path), compile=False), "tf_keras", path)
        except Exception as exc:
            raise ExportError(f"neither Keras 3 nor tf_keras could load {path.name}: {keras3_error} / {exc}") from exc


# --- conversion and the parity check ---------------------------------------------------


def _nodes(graph: Any) -> list[Any]:
    """Every node of an ONNX graph, those inside If/Loop/Scan bodies included."""
    found = []
    for node in graph.node:
        found.append(node)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                found += _nodes(sub)
    return found


def unconverted_ops(model_proto: Any) -> list[tuple[str, str]]:
    """(op type, node name) of the nodes tf2onnx left as TensorFlow ops: ONNX has no such op."""
    import onnx.defs

    return [
        (n.op_type, n.name)
        for n in _nodes(model_proto.graph)
        if n.domain in ("", "ai.onnx") and not onnx.defs.has(n.op_type)
    ]


def convert(loaded: Loaded, opset: int) -> Any:
    """tf2onnx's ModelProto of the function; ExportError naming any op it could not convert."""
    import tf2onnx
    from tf2onnx import constants

    top = max(constants.OPSET_TO_IR_VERSION)
    if not MIN_OPSET <= opset <= top:
        raise ExportError(f"export.opset={opset} is not supported by tf2onnx {tf2onnx.__version__}: {MIN_OPSET}..{top}")
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    try:
        model_proto, _ = tf2onnx.convert.from_function(loaded.function, input_signature=loaded.specs, opset=opset)
    except Exception as exc:
        raise ExportError(f"tf2onnx could not convert the model: {type(exc).__name__}: {exc}") from exc
    bad = unconverted_ops(model_proto)
    if bad:
        ops = sorted({op for op, _ in bad})
        nodes = ", ".join(f"{name} ({op})" for op, name in bad[:5])
        raise ExportError(
            f"tf2onnx cannot convert the TensorFlow op{'s' if len(ops) > 1 else ''} "
            f"{', '.join(ops)} to ONNX (opset {opset}); node(s): {nodes}"
        )
    return model_proto


def sample_inputs(specs: list[Any], samples: int, seed: int = 0) -> list[Any]:
    """Random inputs shaped like the model's: ``samples`` rows, unknown dims of UNKNOWN_DIM."""
    import numpy as np

    rng = np.random.default_rng(seed)
    arrays = []
    for spec in specs:
        dims = list(spec.shape.as_list()) if spec.shape.rank is not None else [None, UNKNOWN_DIM]
        shape = [samples if i == 0 else (d or UNKNOWN_DIM) for i, d in enumerate(dims)]
        dtype = spec.dtype
        if dtype.is_floating:
            arrays.append(rng.random(shape).astype(dtype.as_numpy_dtype))
        elif dtype.is_integer:
            arrays.append(rng.integers(0, 2, shape).astype(dtype.as_numpy_dtype))
        elif dtype.is_bool:
            arrays.append(rng.random(shape) < 0.5)
        else:
            raise ExportError(
                f"input {spec.name!r} has dtype {dtype.name}: tfrun makes sample inputs only for numbers and booleans"
            )
    return arrays


def max_abs_diff(expected: list[Any], got: list[Any]) -> float:
    """Largest absolute difference over every output (NaN where only one side is NaN: inf)."""
    import numpy as np

    if len(expected) != len(got):
        raise ExportError(f"the ONNX model has {len(got)} output(s), the model {len(expected)}")
    worst = 0.0
    for want, have in zip(expected, got):
        want, have = np.asarray(want, dtype=np.float64), np.asarray(have, dtype=np.float64)
        if want.shape != have.shape:
            raise ExportError(f"an ONNX output has shape {have.shape}, the model's {want.shape}")
        diff = np.abs(want - have)
        diff[np.isnan(want) & np.isnan(have)] = 0.0
        diff[np.isnan(diff)] = np.inf
        worst = max(worst, float(diff.max(initial=0.0)))
    return worst


def compare(model_proto: Any, loaded: Loaded, samples: int) -> float:
    """Max abs difference between onnxruntime's and TensorFlow's outputs on the same inputs."""
    import onnxruntime as ort
    import tensorflow as tf

    inputs = sample_inputs(loaded.specs, samples)
    try:
        session = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # an op the converter emitted but this onnxruntime lacks
        raise ExportError(f"onnxruntime cannot load the converted model: {exc}") from exc
    got = session.run(None, {i.name: x for i, x in zip(session.get_inputs(), inputs)})
    expected = [t.numpy() for t in tf.nest.flatten(loaded.function(*inputs))]
    return max_abs_diff(expected, got)


# --- one export, recorded ----------------------------------------------------------------


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("tensorflow", "tf2onnx", "onnxruntime")}


def export_model(outputs: Path, settings: OnnxExportConfig, record: dict[str, Any]) -> None:
    """Convert, check and write outputs/<output>; fills ``record`` as it goes, raises ExportError."""
    target = outputs / settings.output
    target.unlink(missing_ok=True)  # only a model that passed its check is left there
    model_path = find_model(outputs, settings.model)
    record["model"] = str(model_path)
    loaded = load(model_path)
    record.update(
        kind=loaded.kind,
        inputs=[{"name": s.name, "shape": s.shape.as_list(), "dtype": s.dtype.name} for s in loaded.specs],
    )
    model_proto = convert(loaded, settings.opset)
    diff = compare(model_proto, loaded, settings.samples)
    record["max_abs_diff"] = diff
    if not diff <= settings.tolerance:
        raise ExportError(
            f"onnxruntime and TensorFlow disagree: max abs diff {diff:.3g} > "
            f"export.tolerance={settings.tolerance:g} on {settings.samples} random inputs"
        )
    rundir.write_atomic(target, model_proto.SerializeToString())
    record.update(onnx=str(target), passed=True)


def export_run(run_dir: str | os.PathLike[str], settings: OnnxExportConfig) -> dict[str, Any]:
    """Export a run's model, write export.json; the record (``passed`` false with ``error`` on failure)."""
    started = time.time()
    record: dict[str, Any] = {
        "format": "onnx",
        "model": None,
        "onnx": None,
        "opset": settings.opset,
        "tolerance": settings.tolerance,
        "samples": settings.samples,
        "max_abs_diff": None,
        "passed": False,
        "error": None,
    }
    try:
        record["versions"] = _versions()
        export_model(RunPaths.of(run_dir).outputs, settings, record)
    except ExportError as exc:
        record["error"] = str(exc)
    except Exception as exc:  # the converter's or the runtime's own failures are the export's, not tfrun's
        record["error"] = f"{type(exc).__name__}: {exc}"
    record.update(seconds=round(time.time() - started, 2), finished=time.time())
    rundir.write_json(RunPaths.of(run_dir).export, record)
    return record


def summary(record: Mapping[str, Any]) -> str:
    """One line about an export's outcome."""
    if record.get("passed"):
        return (
            f"export onnx: {record['onnx']} (opset {record['opset']}, max abs diff "
            f"{record['max_abs_diff']:.3g} <= {record['tolerance']:g}, {record['seconds']:.1f} s)"
        )
    return f"export onnx FAILED: {record.get('error')}"


def status_fields(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"export": record}`` for status.json if the run exported, else nothing."""
    record = rundir.read_json(RunPaths.of(run_dir).export)
    return {"export": record} if record else {}


def failed(run_dir: str | os.PathLike[str]) -> bool:
    """True when the run asked for an export and it did not pass."""
    plan = rundir.read_json(RunPaths.of(run_dir).plan, {})
    if ((plan.get("config") or {}).get("export") or {}).get("format", "none") == "none":
        return False
    record = rundir.read_json(RunPaths.of(run_dir).export)
    return not (record and record.get("passed"))


def cmd_export(run: str | None, **overrides: Any) -> int:
    """``tfrun export RUN``: export a finished run; 0 if the export passed, else 1."""
    run_dir = rundir.find_one_run(run)
    state = rundir.read_status(run_dir).get("state", RunState.UNKNOWN)
    if state not in FINAL:
        raise ExportError(f"run {run_dir} is {state}: export it once it has finished")
    record = export_run(run_dir, settings_for(run_dir, **overrides))
    rundir.update_status(run_dir, export=record)
    print(f"tfrun: {summary(record)}", file=sys.stderr)
    print(f"tfrun: record {RunPaths.of(run_dir).export}", file=sys.stderr)
    return 0 if record["passed"] else 1


def main(argv: list[str] | None = None) -> None:
    """``python -m tfrun.model.export RUN_DIR``: the in-task export with the run's own settings."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m tfrun.model.export RUN_DIR", file=sys.stderr)
        sys.exit(2)
    try:
        record = export_run(argv[0], settings_for(argv[0]))
    except ConfigError as exc:  # the run config was checked before its plan: only an edited plan.json gets here
        record = {"format": "onnx", "passed": False, "onnx": None, "error": str(exc)}
        rundir.write_json(RunPaths.of(argv[0]).export, record)
    print(f"tfrun: {summary(record)}", file=sys.stderr, flush=True)
    sys.exit(0 if record["passed"] else 1)


if __name__ == "__main__":
    main()
