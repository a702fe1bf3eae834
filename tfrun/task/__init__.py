"""What runs inside every training task, on the hot path of every job, besides the entry.

A task starts in the bootstrap (:mod:`tfrun.bootstrap`), which runs the backend's in-task
half (:mod:`tfrun.backends`); both build on the pieces here: the Keras hooks that patch
``Model.fit`` (:mod:`~tfrun.task.keras_hooks`), backups and restores
(:mod:`~tfrun.task.checkpoint`), the helpers a script calls (:mod:`~tfrun.task.distributed`,
:mod:`~tfrun.task.context`), stop requests (:mod:`~tfrun.task.preempt`), GPU pinning
(:mod:`~tfrun.task.gpus`), who this task is (:mod:`~tfrun.task.identity`) and how it finds
the others (:mod:`~tfrun.task.rendezvous`). On Slurm a task's interpreter starts in
:mod:`~tfrun.task.held`, which holds the stop signals until the bootstrap takes them. The
import contracts in ``pyproject.toml`` hold that order; none of it imports Hydra, OmegaConf,
submitit or the CLI, and TensorFlow only inside functions.
"""
