"""The plan floor: a composed config becomes a :class:`Plan`, plain data that says everything
a run will do, before anything runs.

- :mod:`tfrun.plan.build`: config -> Plan (tasks, argv, env, TF_CONFIG templates, deps).
- :mod:`tfrun.plan.sbatch`: what Slurm is sent: submitit's parameters, the exact sbatch script.
- :mod:`tfrun.plan.pools`: a pool of warm slots for a sweep or a study: its allocations, slots, sbatch.
- :mod:`tfrun.plan.planner`: overrides -> plans, the one path every entry takes.
- :mod:`tfrun.plan.submitit_compat`: every private part of submitit that tfrun uses.

``Plan`` and ``Task`` are defined by the run dir's format (:mod:`tfrun.rundir`), which every
task reads; they are re-exported here, where plans are made.
"""

from __future__ import annotations

from tfrun.rundir import Plan, Task

__all__ = ["Plan", "Task"]
