"""The environment contract: every ``TFRUN_*`` variable, who sets it and what it means.

Each name is a constant here; code that sets or reads one uses the constant, so this module
is the one list of them (``docs/reference`` and a test check that no other module spells
one). The values are strings, as environment variables are.
"""

from __future__ import annotations

# -- set by the plan in every task's environment (tfrun.plan.build), read in the task ------
RUN_ID = "TFRUN_RUN_ID"  # the run's id: its path under the runs dir
RUN_DIR = "TFRUN_RUN_DIR"  # the run dir: plan, status, logs, metrics, backups
OUTPUT_DIR = "TFRUN_OUTPUT_DIR"  # where the script writes what it produces (the run dir's outputs/)
RANK = "TFRUN_RANK"  # the task's global rank (locally the launcher sets it per task; on Slurm from SLURM_PROCID)
LOCAL_RANK = "TFRUN_LOCAL_RANK"  # its rank on its node
NODE_INDEX = "TFRUN_NODE_INDEX"  # its node's index among the run's nodes
WORLD_SIZE = "TFRUN_WORLD_SIZE"  # how many tasks the run has
ROLE = "TFRUN_ROLE"  # worker, chief, ps or evaluator
BACKEND = "TFRUN_BACKEND"  # none, horovod, ps or mwms

# -- set by a launcher for the bootstrap (tfrun.targets), read by tfrun.bootstrap ----------
LAUNCHER = "TFRUN_LAUNCHER"  # local or slurm: how the task learns who it is
ATTEMPT = "TFRUN_ATTEMPT"  # the attempt's key (a local launch, a pool item's attempt); on Slurm from the job
POOL = "TFRUN_POOL"  # a pool item's pool dir: what follows a stop request is its pool's to decide
# -- set by a job's batch shell (tfrun.plan.sbatch), read by tfrun.task.held -----------------
STOP_PENDING = "TFRUN_STOP_PENDING"  # USR1 or USR2: a stop that killed the tasks as they started, sent again

# -- set by the user, read by tfrun ---------------------------------------------------------
RUNS_DIR = "TFRUN_RUNS_DIR"  # where run dirs go and are looked up (default ./tfrun-runs)
ENV_CACHE = "TFRUN_ENV_CACHE"  # where deps=pip|conda environments are kept (default ~/.cache/tfrun/envs)

PREFIX = "TFRUN_"  # every variable of tfrun's own begins so (the bootstrap owns them outright)

# What each variable means, for the docs and `tfrun --help`'s readers.
MEANING: dict[str, str] = {
    RUN_ID: "the run's id, its path under the runs dir (set by tfrun in every task)",
    RUN_DIR: "the run dir (set by tfrun in every task)",
    OUTPUT_DIR: "where the script writes what it produces (set by tfrun in every task)",
    RANK: "the task's global rank (set by tfrun in every task)",
    LOCAL_RANK: "the task's rank on its node (set by tfrun in every task)",
    NODE_INDEX: "the task's node among the run's nodes (set by tfrun in every task)",
    WORLD_SIZE: "how many tasks the run has (set by tfrun in every task)",
    ROLE: "worker, chief, ps or evaluator (set by tfrun in every task)",
    BACKEND: "none, horovod, ps or mwms (set by tfrun in every task)",
    LAUNCHER: "local or slurm (set by tfrun's launchers for the bootstrap)",
    ATTEMPT: "the attempt's key (set by tfrun's local launcher and pools)",
    POOL: "the pool dir of a pool's item (set by the pool's coordinator)",
    STOP_PENDING: (
        "USR1 or USR2: a stop signal that came while the tasks' interpreters started; they hold it"
        " from their first line (set by the job's batch shell when it runs them again)"
    ),
    RUNS_DIR: "where run dirs go and are looked up; default ./tfrun-runs (set by you)",
    ENV_CACHE: "where deps=pip|conda environments are kept; default ~/.cache/tfrun/envs (set by you)",
}
