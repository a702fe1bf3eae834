"""A drop-in for the retired cloud SDK v1 ``TensorFlow`` estimator, on tfrun.

Code written against it moves with an import change::

    from tfrun.estimator import TensorFlow, Experiment   # was: from azureml.train.dnn / azureml.core
    est = TensorFlow(source_directory=".", entry_script="train.py", script_params={"--lr": 0.01},
                     compute_target="slurm", node_count=2, process_count_per_node=1,
                     distributed_backend="mpi")
    run = Experiment(ws, "digits").submit(est)
    run.wait_for_completion(show_output=True)

Every accepted argument maps to tfrun config (``to_overrides()`` shows the equivalent
``tfrun`` command line), each value quoted so that it reaches the run as given;
arguments that mean nothing on a cluster raise an error that names the tfrun equivalent
instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shlex
import sys
from typing import Any, Mapping, Sequence

from tfrun.api import Run, launch
from tfrun.config.overrides import mapping_overrides, override
from tfrun.errors import ConfigError
from tfrun.rundir import Plan
from tfrun.states import FINAL, RunState
from tfrun.tracking import metrics

BACKENDS = {"mpi": "horovod", "horovod": "horovod", "ps": "ps", "parameter_server": "ps", "mwms": "mwms", None: "none"}

# Arguments of the cloud estimator that have no meaning on a cluster you own -> what to use.
UNSUPPORTED = {
    "vm_size": "a Slurm partition or constraint: compute.partition=... / compute.constraint=...",
    "vm_priority": "a Slurm QOS: compute.qos=...",
    "custom_docker_image": "deps=container deps.image=IMAGE (Apptainer/Singularity)",
    "custom_docker_base_image": "deps=container deps.image=IMAGE (Apptainer/Singularity)",
    "image_registry_details": "deps=container deps.image=IMAGE",
    "use_docker": "deps=container deps.image=IMAGE",
    "user_managed": "deps=none (the current Python environment)",
    "conda_dependencies_file": "deps=conda deps.environment_file=FILE",
    "pip_requirements_file": "deps=pip deps.requirements=FILE",
    "conda_dependencies_file_path": "deps=conda deps.environment_file=FILE",
    "pip_requirements_file_path": "deps=pip deps.requirements=FILE",
    "distributed_training": "distributed_backend='mpi' / 'ps' with node_count, process_count_per_node, "
    "worker_count, parameter_server_count (backend=horovod / backend=ps)",
    "environment_definition": "the deps group (deps=pip / deps=conda / deps=container)",
    "inputs": "paths on the cluster's shared filesystem, passed through script_params",
    "source_directory_data_store": "a source_directory on the cluster's shared filesystem",
    "shm_size": "compute.additional_parameters (e.g. a --tmp request) or your site's settings",
    "resume_from": "tfrun resume RUN (a run continues from its own backup)",
    "checkpoint_file_path": "tfrun resume RUN (a run continues from its own backup)",
    "max_run_duration_seconds_exceeded": "compute.timeout_min",
}


# What a shell (and so a task's environment) accepts as a variable's name.
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# framework_version: a release number, as many parts of it as the user cares about.
_RELEASE_NUMBER = re.compile(r"\d+(\.\d+){0,2}")


def _flag_overrides(script_params: Mapping[str, Any]) -> list[str]:
    """``{"--batch-size": 50}`` -> ``trainer.batch-size=50``; other keys go verbatim to entry.args."""
    overrides, extra = [], []
    for key, value in script_params.items():
        key = str(key)
        if key.startswith("--"):
            overrides.append(override(f"trainer.{key[2:]}", value))
        else:
            extra += [key] if value is None else [key, str(value)]
    if extra:
        overrides.append(override("entry.args", extra))
    return overrides


def _compute_overrides(target: Any) -> list[str]:
    """A compute option name, or a compute config object (dataclass or mapping) -> overrides."""
    if isinstance(target, str):
        return [f"compute={target}"]
    fields = (
        dataclasses.asdict(target)
        if dataclasses.is_dataclass(target) and not isinstance(target, type)
        else dict(target)
    )
    option = fields.pop("option", None) or fields.get("target", "local")
    overrides = [f"compute={option}"]
    for key, value in fields.items():
        if key == "target" or value is None or value == [] or value == {}:
            continue  # unset: the option's own value stays
        overrides += (
            mapping_overrides(f"compute.{key}", value)
            if isinstance(value, Mapping)
            else [override(f"compute.{key}", value)]
        )
    return overrides


def _env_overrides(variables: Mapping[str, Any]) -> list[str]:
    """``{"K": "v"}`` -> ``++deps.env.K='v'``; a name is part of the key, so it must be a plain one."""
    for name in variables:
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            raise ConfigError.invalid(
                "environment_variables", name, "variable names made of letters, digits and _, not starting with a digit"
            )
    # deps.env is free-form (any name may be added), hence ++; its values are strings.
    return [override(f"deps.env.{name}", str(value), prefix="++") for name, value in variables.items()]


def framework_matches(wanted: str, installed: str) -> bool:
    """Whether ``installed`` is the release ``wanted`` names, part by part: ``2.21`` is any
    2.21.x (2.21.0rc1 too), never 2.2 or 2.210; ``2.21.0`` is 2.21.0 only."""
    want = tuple(int(part) for part in wanted.split("."))
    found = re.match(r"\d+(\.\d+)*", installed)
    have = tuple(int(part) for part in found.group().split(".")) if found else ()
    return have[: len(want)] == want


def _installed_tensorflow(wanted: Any) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tensorflow")
    except PackageNotFoundError:
        raise ConfigError.invalid(
            "framework_version",
            wanted,
            "none here: TensorFlow is not installed in this environment (install it, or drop framework_version)",
        ) from None


class TensorFlow:
    """The cloud ``TensorFlow`` estimator's arguments, mapped onto a tfrun run."""

    def __init__(
        self,
        source_directory: str,
        entry_script: str,
        script_params: Mapping[str, Any] | None = None,
        compute_target: Any = "local",
        node_count: int = 1,
        process_count_per_node: int = 1,
        worker_count: int | None = None,
        parameter_server_count: int | None = None,
        distributed_backend: str | None = None,
        use_gpu: bool = False,
        pip_packages: Sequence[str] | None = None,
        conda_packages: Sequence[str] | None = None,
        environment_variables: Mapping[str, str] | None = None,
        max_run_duration_seconds: int | None = None,
        framework_version: str | None = None,
        **unsupported: Any,
    ):
        for name in unsupported:
            if name in UNSUPPORTED:
                raise ConfigError(
                    f"TensorFlow({name}=...) has no meaning on a cluster you own; use {UNSUPPORTED[name]}."
                )
            raise ConfigError(f"TensorFlow() got an unknown argument {name!r}.")
        if distributed_backend not in BACKENDS:
            raise ConfigError.invalid("distributed_backend", distributed_backend, [str(k) for k in BACKENDS])
        if pip_packages and conda_packages:
            raise ConfigError(
                "give pip_packages or conda_packages, not both (tfrun builds one environment: "
                "deps=pip or deps=conda; conda's environment can list pip packages)."
            )
        self.source_directory, self.entry_script = source_directory, entry_script
        self.script_params = dict(script_params or {})
        self.compute_target, self.node_count, self.process_count_per_node = (
            compute_target,
            node_count,
            process_count_per_node,
        )
        self.worker_count, self.parameter_server_count = worker_count, parameter_server_count
        self.distributed_backend, self.use_gpu = distributed_backend, use_gpu
        self.pip_packages, self.conda_packages = list(pip_packages or []), list(conda_packages or [])
        self.environment_variables = dict(environment_variables or {})
        self.max_run_duration_seconds, self.framework_version = max_run_duration_seconds, framework_version
        self._check_framework()

    def _check_framework(self) -> None:
        """tfrun runs the environment's TensorFlow: a framework_version must name that release."""
        if not self.framework_version:
            return
        wanted = str(self.framework_version).strip()
        installed = _installed_tensorflow(self.framework_version)
        major_minor = ".".join(installed.split(".")[:2])
        if not _RELEASE_NUMBER.fullmatch(wanted):
            raise ConfigError.invalid(
                "framework_version",
                self.framework_version,
                f"a TensorFlow release number such as {major_minor!r} or {installed!r} "
                f"(the installed TensorFlow is {installed})",
            )
        if not framework_matches(wanted, installed):
            raise ConfigError.invalid(
                "framework_version",
                self.framework_version,
                f"the installed TensorFlow {installed}, so {major_minor!r} or {installed!r} "
                f"(tfrun runs the environment's TensorFlow; install tensorflow=={wanted}.* "
                f"there, or drop framework_version)",
            )

    def _task_layout(self, backend: str) -> list[str]:
        nodes, per_node = self.node_count, self.process_count_per_node
        if backend != "ps":
            return [f"compute.nodes={nodes}", f"compute.tasks_per_node={per_node}"]
        workers, servers = self.worker_count or 1, self.parameter_server_count or 1
        tasks = 1 + workers + servers  # tfrun runs the coordinator (chief) as its own task
        if tasks % nodes:
            raise ConfigError(
                f"distributed_backend='ps' with worker_count={workers} and parameter_server_count="
                f"{servers} needs {tasks} tasks (1 chief + workers + parameter servers), which "
                f"node_count={nodes} does not divide evenly; choose node_count among the divisors of {tasks}."
            )
        return [
            f"compute.nodes={nodes}",
            f"compute.tasks_per_node={tasks // nodes}",
            f"backend.worker_count={workers}",
            f"backend.parameter_server_count={servers}",
        ]

    def to_overrides(self) -> list[str]:
        """The tfrun overrides this estimator stands for."""
        backend = BACKENDS[self.distributed_backend]
        layout = self._task_layout(backend)
        compute = _compute_overrides(self.compute_target)
        if self.use_gpu:
            # One GPU per task: under ps there are more tasks per node than process_count_per_node.
            per_node = next(o.split("=", 1)[1] for o in layout if o.startswith("compute.tasks_per_node="))
            if compute[0] in ("compute=slurm", "compute=slurm_gpu"):
                compute[0] = "compute=slurm_gpu"  # the option itself, not a second one after it
            else:
                compute.append(f"compute.gpus_per_node={per_node}")
        overrides = [
            override("entry.source_dir", self.source_directory),
            override("entry.script", self.entry_script),
            *compute,
            f"backend={backend}",
            *layout,
        ]
        if self.pip_packages:  # a specifier may hold a comma: numpy>=1.26,<2
            overrides += ["deps=pip", override("deps.pip_packages", self.pip_packages)]
        if self.conda_packages:
            overrides += ["deps=conda", override("deps.conda_packages", self.conda_packages)]
        overrides += _env_overrides(self.environment_variables)
        if self.max_run_duration_seconds:
            overrides.append(f"compute.timeout_min={math.ceil(self.max_run_duration_seconds / 60)}")
        return [*overrides, *_flag_overrides(self.script_params)]

    def command_line(self) -> str:
        """The equivalent ``tfrun`` command."""
        return shlex.join(["tfrun", *self.to_overrides()])


class EstimatorRun:
    """The cloud SDK's run object, over a :class:`tfrun.Run`."""

    # By a state's word: Run.status() reads it from status.json, a plain str equal to its member.
    _STATUS: dict[str, str] = {
        RunState.PENDING: "Queued",
        RunState.RUNNING: "Running",
        RunState.COMPLETED: "Completed",
        RunState.FAILED: "Failed",
        RunState.CANCELLED: "Canceled",
        RunState.TIMEOUT: "Failed",
        RunState.STOPPED: "Canceled",
        RunState.PRUNED: "Canceled",
    }

    def __init__(self, run: Run, streamed: bool = False):
        # streamed: its ranks' output goes to this process's stdout as it runs (a local run
        # this process launched), so wait_for_completion need not show it again.
        self.run, self.id, self._streamed = run, run.id, streamed

    def get_status(self) -> str:
        """Queued, Running, Completed, Failed or Canceled."""
        return self._STATUS.get(self.run.status(), self.run.status())

    def wait_for_completion(self, show_output: bool = False, wait_post_processing: bool = False) -> dict[str, Any]:
        """Block until the run ends; with show_output, print rank 0's log as it grows."""
        offset = 0
        while True:
            state = self.run.status()
            if show_output and not self._streamed:
                text = self.run.logs(0)
                sys.stdout.write(text[offset:])
                sys.stdout.flush()
                offset = len(text)
            if state in FINAL:
                break
            import time

            time.sleep(2.0)
        return self.get_details()

    def get_details(self) -> dict[str, Any]:
        """Status, run dir, tags and tfrun's status record."""
        return {
            "runId": self.id,
            "status": self.get_status(),
            "runDir": str(self.run.dir),
            "tags": self.get_tags(),
            "tfrun": self.run.info(),
        }

    def get_tags(self) -> dict[str, str]:
        """The tags the run was submitted with (its config's ``tfrun.tags``)."""
        return dict(Plan.load(self.run.dir).config["tfrun"].get("tags") or {})

    def get_metrics(self) -> dict[str, Any]:
        """metric -> value (the last) or list of values, the way the cloud SDK returned them."""
        series: dict[str, list[float]] = {}
        for record in self.run.metrics():
            if record.get("name") is not None:
                series.setdefault(record["name"], []).append(record["value"])
            elif record.get("epoch") is not None:
                for key, value in metrics.epoch_values(record).items():
                    series.setdefault(key, []).append(value)
        return {k: v[0] if len(v) == 1 else v for k, v in series.items()}

    def cancel(self) -> None:
        """Cancel the run."""
        self.run.cancel()


class Experiment:
    """The cloud SDK's Experiment: a name under which runs are submitted."""

    def __init__(self, workspace: Any = None, name: str = "tfrun"):
        self.workspace, self.name = workspace, name

    def to_overrides(self, config: TensorFlow, tags: Mapping[str, str] | None = None) -> list[str]:
        """The tfrun overrides of ``submit(config, tags)``: the estimator's, the name, the tags."""
        overrides = [*config.to_overrides(), override("tfrun.name", self.name)]
        if tags:  # kept as the run's tfrun.tags: in its config and plan, and on its MLflow run
            overrides += mapping_overrides("tfrun.tags", {str(k): str(v) for k, v in tags.items()})
        return overrides

    def submit(self, config: TensorFlow, tags: Mapping[str, str] | None = None) -> EstimatorRun:
        """Start the estimator's run (returns at once; wait with ``wait_for_completion``)."""
        run = launch(self.to_overrides(config, tags), wait=False)
        from tfrun import targets

        # A run this process follows streams its tasks' output here; a submitted one is read from its logs.
        return EstimatorRun(run, streamed=targets.followed_here(Plan.load(run.dir).target))
