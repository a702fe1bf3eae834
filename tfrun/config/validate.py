"""Checks Hydra cannot express in a schema. Each error names key, value and what is allowed."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any, Mapping, TypeGuard

from tfrun.errors import TRACKING, ConfigError, require

TARGETS = ("local", "slurm")  # where a run can go (tfrun.targets has the code that starts it there)
ONNX_PACKAGES = ("tf2onnx", "onnxruntime", "onnx")  # what export=onnx needs where the tasks run
MIN_OPSET = 7  # tf2onnx's lowest
FLAG_STYLES = ("keep", "dashes")
PACK_MODES = ("off", "auto")
# How a pool's slot (tfrun.plan.pools) starts each item (compute.warm): fork: a fresh process
# forked from the slot's warm interpreter (the imports were paid once per slot); spawn: a fresh
# interpreter started while the previous item runs, with the same imports done before its item
# comes (for libraries that must not be forked); cold: a new interpreter when the item comes,
# importing everything itself.
WARM_MODES = ("fork", "spawn", "cold")
BOOL_STYLES = ("flag", "value")


def check_run(cfg: Mapping[str, Any]) -> None:
    """Every check of a composed, resolved run config that needs no file of the project: one
    pass, as the run config a plan is built from is made (:func:`tfrun.config.run_config.from_data`)."""
    check_entry(cfg["entry"])
    check_compute(cfg["compute"])
    check_trainer(cfg["trainer"])
    check_export(cfg["export"])
    tracking = cfg.get("tracking")  # a config without the tracking group has none (a plain value)
    if isinstance(tracking, Mapping) and tracking.get("kind") == "mlflow":  # the chief logs to MLflow from its start
        require("tracking=mlflow", ["mlflow"], f"{TRACKING} in the environment the tasks run in")
    if cfg["compute"]["target"] not in TARGETS:
        raise ConfigError.invalid("compute.target", cfg["compute"]["target"], TARGETS)


def check_export(export: Mapping[str, Any]) -> None:
    """An ``export=onnx`` section: its packages installed, its values in range (no heavy imports)."""
    if export.get("format") != "onnx":
        return
    missing = [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise ConfigError(
            f"export=onnx needs {', '.join(missing)}: pip install 'tfrun[onnx]' "
            f"(tf2onnx, onnxruntime) in the environment the tasks run in."
        )
    if not isinstance(export["opset"], int) or export["opset"] < MIN_OPSET:
        raise ConfigError.invalid("export.opset", export["opset"], f"an integer >= {MIN_OPSET}")
    if not isinstance(export["samples"], int) or export["samples"] < 1:
        raise ConfigError.invalid("export.samples", export["samples"], "an integer >= 1")
    if export["tolerance"] < 0:
        raise ConfigError.invalid("export.tolerance", export["tolerance"], "a number >= 0")
    output = str(export["output"])
    if not output.endswith(".onnx") or "/" in output or output.startswith("."):
        raise ConfigError.invalid("export.output", output, "a file name ending in .onnx (written in outputs/)")


def is_number(value: Any) -> TypeGuard[int | float]:
    """An int or a float, and not a bool (YAML's ``true`` is an int to Python)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_whole(value: Any, minimum: int) -> bool:
    """An int >= minimum, and not a bool."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def positive_int(key: str, value: Any, minimum: int = 1) -> None:
    """``value`` must be an int >= minimum."""
    if not is_whole(value, minimum):
        raise ConfigError.invalid(key, value, f"an integer >= {minimum}")


def check_compute(compute: Mapping[str, Any]) -> None:
    """Task counts and time limits that Slurm or the local launcher could not honour."""
    positive_int("compute.nodes", compute["nodes"])
    positive_int("compute.tasks_per_node", compute["tasks_per_node"])
    positive_int("compute.gpus_per_node", compute["gpus_per_node"], minimum=0)
    positive_int("compute.timeout_min", compute["timeout_min"])
    hang = compute.get("hang_timeout_s")
    if hang is not None and not (is_number(hang) and hang > 0):
        raise ConfigError.invalid("compute.hang_timeout_s", hang, "a number of seconds > 0, or null (no watchdog)")
    if compute.get("warm", "fork") not in WARM_MODES:
        raise ConfigError.invalid("compute.warm", compute.get("warm"), WARM_MODES)
    preload = compute.get("preload", "auto")
    if preload != "auto" and not (isinstance(preload, (list, tuple)) and all(isinstance(m, str) for m in preload)):
        raise ConfigError.invalid("compute.preload", preload, "auto, or a list of module names")
    if "pack" in compute:  # Slurm: sweeps and packing
        check_slurm_sweeps(compute)
    gpus, tasks = compute["gpus_per_node"], compute["tasks_per_node"]
    if gpus and gpus % tasks and not compute.get("gpus_per_task"):
        raise ConfigError.invalid(
            "compute.gpus_per_node",
            gpus,
            f"a multiple of compute.tasks_per_node={tasks}, so that every task gets the same GPUs",
        )


def check_slurm_sweeps(compute: Mapping[str, Any]) -> None:
    """How a sweep is submitted: array throttling, packing, requeues."""
    if compute["pack"] not in PACK_MODES:
        raise ConfigError.invalid(
            "compute.pack", compute["pack"], "off (one job per point, or compute.pack_size points a job) or auto"
        )
    positive_int("compute.pack_size", compute["pack_size"])
    positive_int("compute.pack_slots", compute["pack_slots"])
    positive_int("compute.array_parallelism", compute["array_parallelism"])
    positive_int("compute.max_requeues", compute["max_requeues"], minimum=0)


def check_trainer_value(key: str, value: Any) -> None:
    """A trainer value must be a scalar (or a list of scalars). Text becomes one argv entry
    as it is, never through a shell: only NUL, which no argv entry can hold, is refused."""
    if isinstance(value, Mapping):
        raise ConfigError.invalid(f"trainer.{key}", value, "a scalar or a list of scalars, not a mapping")
    items = value if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if isinstance(item, (list, tuple, Mapping)):
            raise ConfigError.invalid(f"trainer.{key}", item, "a scalar or a list of scalars")
        if isinstance(item, str) and "\0" in item:
            raise ConfigError.invalid(f"trainer.{key}", item, "text without NUL characters (an argv entry ends at NUL)")


def check_trainer(trainer: Mapping[str, Any]) -> None:
    """Every trainer key must be a plain flag name and every value safe."""
    for key, value in trainer.items():
        if not re.fullmatch(r"[A-Za-z_][\w\-]*", str(key)):
            raise ConfigError.invalid("trainer", key, "flag names made of letters, digits, _ and -")
        check_trainer_value(str(key), value)


def resolve_script(entry: Mapping[str, Any], cwd: Path) -> tuple[Path, Path]:
    """(absolute script, absolute source dir); the script must exist."""
    source_dir = Path(entry["source_dir"]).expanduser() if entry.get("source_dir") else cwd
    source_dir = (cwd / source_dir).resolve()
    if not source_dir.is_dir():
        raise ConfigError.invalid("entry.source_dir", entry["source_dir"], "an existing directory")
    if entry.get("script") in (None, "", "???"):  # "???": a config that never set it
        raise ConfigError.invalid(
            "entry.script", entry.get("script"), "the path of your training script, e.g. entry.script=train.py"
        )
    script = Path(str(entry["script"])).expanduser()
    candidates = [script] if script.is_absolute() else list(dict.fromkeys([source_dir / script, cwd / script]))
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve(), source_dir
    looked = ", ".join(str(c) for c in candidates)
    raise ConfigError.invalid("entry.script", entry["script"], f"an existing file (looked for {looked})")


def check_entry(entry: Mapping[str, Any]) -> None:
    """Flag spelling options."""
    if entry["flag_style"] not in FLAG_STYLES:
        raise ConfigError.invalid("entry.flag_style", entry["flag_style"], FLAG_STYLES)
    if entry.get("bool_style", "flag") not in BOOL_STYLES:
        raise ConfigError.invalid("entry.bool_style", entry["bool_style"], BOOL_STYLES)


_KERAS3_IMPORT = re.compile(r"^\s*(import keras\b|from keras\b)", re.M)


def keras3_warning(script: Path, backend: Mapping[str, Any]) -> str | None:
    """A warning when a script imports Keras 3 under a backend whose strategies need tf_keras."""
    if not backend.get("legacy_keras") or backend["name"] == "none":
        return None
    try:
        source = script.read_text(errors="replace")
    except OSError:
        return None
    if not _KERAS3_IMPORT.search(source):
        return None
    return (
        f"{script.name} imports keras (Keras 3), but backend={backend['name']} needs legacy Keras for "
        f"model.fit on TF >= 2.16. tfrun sets TF_USE_LEGACY_KERAS=1, which makes tf.keras the legacy "
        f"Keras: use `import tensorflow as tf` and tf.keras (or `import tf_keras as keras`)."
    )
