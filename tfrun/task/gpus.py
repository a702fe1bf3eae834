"""Which GPUs a task sees. Pure, so that every case is a unit test."""

from __future__ import annotations


def pin(existing: str | None, local_rank: int, gpus_per_task: int) -> tuple[str | None, str]:
    """(CUDA_VISIBLE_DEVICES for this task or None to leave it alone, why).

    What the scheduler (or the user) already bound is the pool: if it is exactly one
    task's share it is kept; if it is the whole node's devices (``--gpus-per-node``
    gives every task all of them), the task takes its slice by local rank.
    """
    if gpus_per_task <= 0:
        return None, "no GPUs asked"
    if not existing:
        first = local_rank * gpus_per_task
        value = ",".join(str(first + i) for i in range(gpus_per_task))
        return value, f"local rank {local_rank} x {gpus_per_task} GPU(s) per task"
    devices = [d for d in existing.split(",") if d]
    if len(devices) == gpus_per_task:
        return existing, "bound by the scheduler"
    share = devices[local_rank * gpus_per_task : (local_rank + 1) * gpus_per_task]
    if len(share) < gpus_per_task:
        return existing, f"only {len(devices)} device(s) visible for local rank {local_rank}; left as is"
    return ",".join(share), f"slice of {existing} for local rank {local_rank}"
