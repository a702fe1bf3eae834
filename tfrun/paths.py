"""Where everything of a run is: the one place that names a run dir's files, and a sweep dir's.

A run dir (``RunPaths``) is the job's shared memory: the plan, the status, the per-rank
records and logs, metrics, backups, rendezvous files. A sweep dir (``SweepPaths``) holds
its points' run dirs, its index, a tuning study's journal and a pool's dir. Every other
module asks these values for a path; none spells a file name of its own (a test holds that).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunPaths:
    """The files of one run dir."""

    root: Path

    @classmethod
    def of(cls, run_dir: str | os.PathLike[str]) -> "RunPaths":
        """The paths of the run dir ``run_dir``."""
        return cls(Path(run_dir))

    # -- what the launcher and the verbs write -------------------------------------------
    @property
    def plan(self) -> Path:
        """The plan every task reads (``tfrun.rundir.Plan``)."""
        return self.root / "plan.json"

    @property
    def status(self) -> Path:
        """The run's state, job ids, exit codes, which rank failed and why."""
        return self.root / "status.json"

    @property
    def attempts(self) -> Path:
        """Every attempt (start, end, why it stopped, requeued or not)."""
        return self.root / "attempts.json"

    @property
    def hydra(self) -> Path:
        """The composed config, as Hydra's app writes it."""
        return self.root / ".hydra"

    @property
    def submitit(self) -> Path:
        """submitit's pickles and the job's own log (a single run on Slurm)."""
        return self.root / ".submitit"

    @property
    def cancel_request(self) -> Path:
        """A marker: ``tfrun cancel`` asks the run's launcher (or its pool) to cancel it."""
        return self.root / "cancel-requested"

    @property
    def signal_request(self) -> Path:
        """A signal for a pool item's processes (a policy's stop), delivered by its coordinator."""
        return self.root / "signal.json"

    @property
    def prune(self) -> Path:
        """A tuning policy asked this trial to stop for good."""
        return self.root / "prune.json"

    @property
    def mlflow(self) -> Path:
        """The run's MLflow run (id, what was sent)."""
        return self.root / "mlflow.json"

    # -- what the tasks write ------------------------------------------------------------
    @property
    def logs(self) -> Path:
        """Every rank's log, the watchdog's, the environment build's."""
        return self.root / "logs"

    def rank_log(self, rank: int) -> Path:
        """A rank's log (stdout and stderr of its task)."""
        return self.logs / f"rank{rank}.log"

    @property
    def watchdog_log(self) -> Path:
        """The hang watchdog's log."""
        return self.logs / "watchdog.log"

    @property
    def deps_log(self) -> Path:
        """The environment build's log (deps=pip|conda built by the job)."""
        return self.logs / "deps.log"

    @property
    def srun_log(self) -> Path:
        """A point's own job step's output (srun's report of a failing task)."""
        return self.root / "srun.log"

    @property
    def ranks(self) -> Path:
        """The tasks' records of themselves."""
        return self.root / "ranks"

    def rank_record(self, rank: int) -> Path:
        """A task's record (host, pid, start, end, exit)."""
        return self.ranks / f"{rank}.json"

    @property
    def heartbeats(self) -> Path:
        """The tasks' progress, per attempt (the watchdog reads them)."""
        return self.root / "heartbeats"

    def heartbeat(self, attempt: str, rank: int) -> Path:
        """A rank's heartbeat in an attempt."""
        return self.heartbeats / attempt / f"{rank}.json"

    def rendezvous(self, attempt: str) -> Path:
        """Where the tasks of an attempt publish their addresses and ports to each other."""
        return self.root / "rendezvous" / attempt

    @property
    def metrics(self) -> Path:
        """The chief's metrics (Keras epochs, tfrun.log_metric values)."""
        return self.root / "metrics.jsonl"

    def metrics_of(self, rank: int) -> Path:
        """A rank's metrics file (rank 0's is :attr:`metrics`)."""
        return self.metrics if rank == 0 else self.root / f"metrics-rank{rank}.jsonl"

    @property
    def outputs(self) -> Path:
        """What the script writes (:data:`tfrun.variables.OUTPUT_DIR`)."""
        return self.root / "outputs"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard events of the metrics."""
        return self.root / "tensorboard"

    @property
    def backups(self) -> Path:
        """The backups of finished epochs a resumed attempt restores (the chief's)."""
        return self.root / "checkpoints" / "backup"

    def backup(self, rank: int = 0) -> "BackupPaths":
        """The backups a rank writes: the chief's, or (a rank that keeps its own, under
        backend=none with several tasks) that rank's; ``.rank<k>`` is a worker's scratch copy."""
        return BackupPaths(self.backups if rank == 0 else self.backups / f"rank{rank}")

    @property
    def export(self) -> Path:
        """The record of export=onnx."""
        return self.root / "export.json"

    @property
    def provenance(self) -> Path:
        """Where each attempt came from (git, hosts, packages)."""
        return self.root / "provenance"

    def provenance_of(self, attempt: str, what: str) -> Path:
        """An attempt's provenance: its ``record``, git ``diff`` or ``packages`` list."""
        suffix = {"record": ".json", "diff": ".diff", "packages": ".packages.txt"}[what]
        return self.provenance / f"{attempt}{suffix}"

    def plot(self, metric: str) -> Path:
        """``tfrun plot``'s PNG of a metric (in a run or sweep dir)."""
        return self.root / f"plot-{metric}.png"


@dataclass(frozen=True)
class BackupPaths:
    """The files of one folder of backups: committed weights, the state that commits them."""

    folder: Path

    @property
    def state(self) -> Path:
        """Names the committed backup (and the one before it)."""
        return self.folder / "state.json"

    @staticmethod
    def weights_name(epochs: int) -> str:
        """The file name of the weights after ``epochs`` epochs of the run."""
        return f"epoch-{epochs}.weights.h5"

    def weights(self) -> list[Path]:
        """Every committed weights file in the folder."""
        return sorted(self.folder.glob("epoch-*.weights.h5"))

    def temporary(self, name: str) -> Path:
        """Where a file is written before it is renamed to ``name`` (a kill leaves no half file)."""
        return self.folder / f"tmp-{name}"

    def scratch(self, rank: int) -> Path:
        """A non-chief worker's throw-away folder (MultiWorkerMirroredStrategy: every worker saves)."""
        return self.folder / f".rank{rank}"


@dataclass(frozen=True)
class SweepPaths:
    """The files of a sweep dir (its points are run dirs inside it)."""

    root: Path

    @classmethod
    def of(cls, sweep_dir: str | os.PathLike[str]) -> "SweepPaths":
        """The paths of the sweep dir ``sweep_dir``."""
        return cls(Path(sweep_dir))

    @property
    def index(self) -> Path:
        """Its points, their overrides and objective values; a study's objective and direction."""
        return self.root / "sweep.json"

    @property
    def submitit(self) -> Path:
        """submitit's pickles and the jobs' logs of the sweep."""
        return self.root / ".submitit"

    @property
    def pool(self) -> Path:
        """The dir of the pool its points or trials run in."""
        return self.root / "pool"

    @property
    def journal(self) -> Path:
        """A tuning study's Optuna journal."""
        return self.root / "study.journal"

    @property
    def tune(self) -> Path:
        """How a tuning study was asked for (what ``tfrun tune resume`` runs again)."""
        return self.root / "tune.json"

    @property
    def follower(self) -> Path:
        """Locked by a study's follower for its life; says who it is."""
        return self.root / "follower.lock"

    @property
    def cancel_request(self) -> Path:
        """A marker: ``tfrun cancel SWEEP`` asks its follower to start nothing more."""
        return self.root / "cancel-requested"

    @property
    def mlflow(self) -> Path:
        """The sweep's MLflow parent run."""
        return self.root / "mlflow.json"


def is_run_dir(path: str | os.PathLike[str]) -> bool:
    """A run dir is a dir with a plan (a sweep dir holds run dirs)."""
    return RunPaths.of(path).plan.is_file()
