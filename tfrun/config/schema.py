"""Structured-config schema of a tfrun run.

Each config group option under ``conf/`` picks one of these dataclasses (through the
``schema/<group>/<name>`` entries registered in :mod:`tfrun.config.store`) and fills
values, so Hydra checks keys and types at composition time. Field names reuse
submitit's words and carry units (``timeout_min``, ``mem_gb``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from tfrun import variables


@dataclass
class EntryConfig:
    """What runs in each task: the user's script and how its parameters reach it."""

    script: str = MISSING  # path of the training script, absolute or relative to source_dir
    source_dir: Optional[str] = None  # working directory of the script (default: the cwd at launch)
    flag_prefix: str = "--"  # trainer.lr=0.1 becomes <flag_prefix>lr 0.1
    flag_style: str = "keep"  # keep: --batch_size; dashes: --batch-size
    bool_style: str = "flag"  # flag: true gives a bare --flag, false none; value: --flag True / --flag False
    args: List[str] = field(default_factory=list)  # extra arguments appended verbatim
    python: Optional[str] = None  # interpreter for the tasks (default: the one running tfrun)


@dataclass
class ComputeConfig:
    """Where the tasks run. ``target`` picks the launcher (local or slurm)."""

    target: str = "local"
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    timeout_min: int = 60
    # no rank making progress (steps, or CPU) for this long is a hang: stacks to the logs, the run ended (null: off)
    hang_timeout_s: Optional[float] = None
    # how a pool's slot starts each item (a sweep's point, a study's trial): fork (from the slot's warm interpreter), spawn (a fresh interpreter started ahead), cold (a new one when it comes)
    warm: str = "fork"
    # what a warm interpreter imports ahead: auto (the heavy modules the script imports), or a list
    preload: Any = "auto"


@dataclass
class LocalComputeConfig(ComputeConfig):
    """Processes on this machine; ``nodes`` are simulated (all tasks are local)."""

    target: str = "local"
    stop_grace_s: float = 5.0  # after a rank fails, how long others get to exit before SIGKILL


@dataclass
class SlurmComputeConfig(ComputeConfig):
    """One Slurm job per run, placed by submitit; parameter names follow submitit's."""

    target: str = "slurm"
    partition: Optional[str] = None
    cpus_per_task: Optional[int] = None
    gpus_per_task: Optional[int] = None
    mem_gb: Optional[float] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    exclude: Optional[str] = None
    nodelist: Optional[str] = None
    job_name: str = "tfrun"
    setup: List[str] = field(default_factory=list)  # shell lines run before srun (module load ...)
    srun_args: List[str] = field(default_factory=list)
    additional_parameters: Dict[str, Any] = field(default_factory=dict)  # any other #SBATCH key
    signal_delay_s: int = 120  # SIGUSR2 to every task this long before the time limit
    max_requeues: int = 3  # requeues tfrun makes, all causes counted (not preemptions Slurm requeues itself)
    requeue_on_preempt: bool = True  # a preempted job that Slurm cancels (PreemptMode=CANCEL) is requeued by tfrun
    array_parallelism: int = 256  # most array tasks running at once in a sweep
    pack_size: int = 1  # sweep points per Slurm job (1: one job per point)
    pack: str = "off"  # auto: pick pack_size from the sweep size and array_parallelism
    pack_slots: int = 1  # points of a pack that run side by side (the allocation is this many points wide)
    hang_timeout_s: Optional[float] = 1800.0  # no rank progressing (steps, or CPU) this long: the job ends (null: off)
    requeue_on_hang: bool = False  # requeue a hung job instead (bounded by max_requeues), resuming from its backup
    wait: bool = True  # follow the job until it ends; false: print ids and return
    poll_s: float = 2.0  # seconds between batched state queries while following


@dataclass
class BackendConfig:
    """How the tasks cooperate. ``name`` picks the backend module."""

    name: str = "none"
    legacy_keras: bool = False  # set TF_USE_LEGACY_KERAS=1 in every task


@dataclass
class DistributedBackendConfig(BackendConfig):
    """Fields every multi-task backend shares."""

    legacy_keras: bool = True  # Keras model.fit under these strategies needs tf_keras on TF >= 2.16
    rendezvous_timeout_s: float = 300.0  # how long a task waits for the others to publish their addresses
    # the network interface whose address a node gives the other nodes (default: its name's address)
    iface: Optional[str] = None


@dataclass
class HorovodBackendConfig(DistributedBackendConfig):
    """Horovod over Gloo (or MPI): one rank per task; the script calls hvd.init() itself."""

    name: str = "horovod"
    controller: str = "gloo"  # gloo | mpi
    check_size: bool = True  # initialise Horovod in the bootstrap and fail unless size == tasks


@dataclass
class PsBackendConfig(DistributedBackendConfig):
    """TF parameter-server training: chief + workers + parameter servers (+ evaluator)."""

    name: str = "ps"
    worker_count: int = 2
    parameter_server_count: int = 1
    evaluator: bool = False
    chief_timeout_s: float = 120.0  # servers stop when the chief's heartbeat is this old


@dataclass
class MwmsBackendConfig(DistributedBackendConfig):
    """tf.distribute.MultiWorkerMirroredStrategy: every task is a worker and runs the script."""

    name: str = "mwms"


@dataclass
class DepsConfig:
    """What the tasks' Python environment holds. ``kind=none``: the current environment."""

    kind: str = "none"
    env: Dict[str, str] = field(default_factory=dict)  # extra environment variables for every task


@dataclass
class BuiltDepsConfig(DepsConfig):
    """An environment tfrun builds once and keeps in a cache, named by a hash of its definition."""

    # On Slurm this must be on a filesystem every node sees.
    cache_dir: str = f"${{oc.env:{variables.ENV_CACHE},'~/.cache/tfrun/envs'}}"
    build_on: str = "login"  # login: before submitting (a broken spec queues nothing) | job: in the job's setup


@dataclass
class PipDepsConfig(BuiltDepsConfig):
    """A virtual environment built with uv on top of a base interpreter (entry.python or tfrun's own)."""

    kind: str = "pip"
    pip_packages: List[str] = field(default_factory=list)  # requirement specifiers: tabulate, numpy<2, ...
    requirements: Optional[str] = None  # a requirements file, relative to the cwd
    # inherit: --system-site-packages over the base, so TensorFlow and tfrun are visible without reinstalling;
    # isolated: nothing of the base is visible, tfrun (hence TensorFlow) is installed into the env
    base: str = "inherit"
    pin_base: bool = True  # keep packages the base has at its versions (an upgraded numpy would break TF)
    install_args: List[str] = field(default_factory=list)  # more uv pip install arguments (--index-url URL)


@dataclass
class CondaDepsConfig(BuiltDepsConfig):
    """A conda environment built with micromamba, mamba or conda (the first found)."""

    kind: str = "conda"
    conda_packages: List[str] = field(default_factory=list)  # python=3.11 is added unless a python is named
    channels: List[str] = field(default_factory=list)
    environment_file: Optional[str] = None  # an environment.yml, relative to the cwd
    pip_packages: List[str] = field(default_factory=list)  # installed with uv after the conda packages
    conda_exe: Optional[str] = None  # micromamba | mamba | conda or a path (default: the first found)


@dataclass
class ModulesDepsConfig(DepsConfig):
    """Environment modules (Lmod, Environment Modules) loaded before the tasks start."""

    kind: str = "modules"
    modules: List[str] = field(default_factory=list)  # each becomes a `module load NAME` line
    purge: bool = False  # `module purge` first


@dataclass
class ContainerDepsConfig(DepsConfig):
    """Every task runs inside an Apptainer/Singularity image (which must hold Python and TensorFlow)."""

    kind: str = "container"
    image: str = MISSING  # a .sif file, or a URI the runtime pulls (docker://..., oras://...)
    runtime: str = "apptainer"  # apptainer | singularity
    binds: List[str] = field(default_factory=list)  # SRC[:DEST[:ro]]; the run and source dirs are bound anyway
    python: str = "python3"  # the interpreter inside the image
    nv: Optional[bool] = None  # --nv (GPUs inside the container); default: when the run asks for GPUs
    exec_args: List[str] = field(default_factory=list)  # more `exec` arguments (--cleanenv, --contain, ...)


@dataclass
class ExportConfig:
    """What happens to the trained model after the run. ``format=none``: nothing."""

    format: str = "none"


@dataclass
class OnnxExportConfig(ExportConfig):
    """Convert the saved model to ONNX on rank 0 after training, and check it (tfrun/model/export.py)."""

    format: str = "onnx"
    model: Optional[str] = None  # relative to outputs/ (default: model.keras, *.keras, a SavedModel dir, *.h5)
    output: str = "model.onnx"  # written in outputs/, only if the check passed
    opset: int = 17
    tolerance: float = 1e-4  # largest absolute difference allowed between onnxruntime and TensorFlow
    samples: int = 16  # random inputs run through both


@dataclass
class TrackingConfig:
    """Where a run's params, metrics and files go besides its run dir. ``kind=none``: nowhere."""

    kind: str = "none"


@dataclass
class MlflowTrackingConfig(TrackingConfig):
    """Each run one MLflow run; a sweep one parent run with the points nested under it."""

    kind: str = "mlflow"
    tracking_uri: Optional[str] = None  # default: sqlite:///<runs_dir>/mlflow.db; or http://host:5000
    experiment: Optional[str] = None  # default: "tfrun" for single runs, the sweep's name for sweeps
    register_model: Optional[str] = None  # a name: each completed run's model becomes a new version of it
    system_metrics: bool = False  # MLflow's CPU, memory, disk, network (and GPU, with NVIDIA's library) metrics


@dataclass
class TfrunSettings:
    """Settings of tfrun itself rather than of the run."""

    # where run directories are created (relative to the cwd); `tfrun runs` looks there too
    runs_dir: str = f"${{oc.env:{variables.RUNS_DIR},tfrun-runs}}"
    name: Optional[str] = None  # a label shown by `tfrun runs`
    objective: Optional[str] = None  # metric whose final value a tuning sweeper (`hydra/sweeper=tfrun`) optimises
    # labels kept with the run; with tracking=mlflow, its MLflow tags
    tags: Dict[str, str] = field(default_factory=dict)


@dataclass
class RootConfig:
    """The root of a composed run."""

    entry: EntryConfig = field(default_factory=EntryConfig)
    trainer: Dict[str, Any] = field(default_factory=dict)
    compute: Any = MISSING
    backend: Any = MISSING
    deps: Any = MISSING
    export: Any = MISSING
    tracking: Any = MISSING
    tfrun: TfrunSettings = field(default_factory=TfrunSettings)
