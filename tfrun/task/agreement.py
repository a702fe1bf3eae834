"""Ranks of a synchronous job stop at the same batch.

Under Horovod and MultiWorkerMirroredStrategy every training step is a collective of all
ranks. A stop request reaches the ranks milliseconds apart (Slurm signals node by node; a
site's hook or ``kill`` may reach one rank only): a rank that acted on it alone would leave
``fit`` while the others go on into the next step's collective, where they wait for it
for good (the chief then never writes the backup, never requeues).

So in a synchronous job no rank acts on its own request inside ``fit``. At agreed batch
ends, the same on every rank, the ranks *vote*: a tiny collective of their own (through
the backend: Horovod's allreduce, the strategy's all-reduce) adds up each rank's stop
flags, one per kind of request, and every rank stops at that batch if any rank was asked,
taking on what asked it. The same vote carries each rank's mean batch time since the last
one, so every rank computes the same next vote: about every :data:`VOTE_EVERY_S` of
training, at most :data:`MAX_BATCHES` batches apart. A vote costs a collective of a few
numbers (a few ms between CPU processes); spaced this way, 1-1.5 % of training time on
batches of a few ms, less on longer ones; a stop waits about :data:`VOTE_EVERY_S` for its vote.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

from tfrun.task import preempt

Vote = Callable[[Sequence[int]], list[int]]  # each rank's numbers, added up over all ranks
VOTE_EVERY_S = 0.5
MAX_BATCHES = 128  # a step that slows down suddenly delays a stop by at most this many batches
_MAX_BATCH_MS = 60_000  # a mean batch time beyond this is voted as this (sums stay exact)

_factory: list[Callable[[Any], Vote | None]] = []


def use(factory: Callable[[Any], Vote | None]) -> None:
    """The backend's vote for a model (None where its ranks do not train together); the
    bootstrap sets it for synchronous backends."""
    _factory[:] = [factory]


def vote_for(model: Any) -> Vote | None:
    """How this rank's fit votes with the others, or None where it stops on its own."""
    return _factory[0](model) if _factory else None


class Agreement:
    """The votes of one ``fit``: when the next comes, and whether every rank stops."""

    def __init__(self, vote: Vote):
        self.vote = vote
        self.next_step = 1  # the first batch end votes: nothing is known of batch times yet
        self.last_step, self.last_time = 0, time.monotonic()

    def stop_at(self, step: int) -> bool:
        """At the end of batch ``step`` (counted from the start of fit): do all ranks stop here?
        The same answer on every rank, when every rank asks at every batch end."""
        if step < self.next_step:
            return False
        now = time.monotonic()
        mean_ms = int(1000 * (now - self.last_time) / max(1, step - self.last_step))
        totals = self.vote([*preempt.kinds_requested(), min(mean_ms, _MAX_BATCH_MS), 1])
        kinds = len(preempt.KINDS)
        ranks, summed_ms = totals[kinds + 1], totals[kinds]
        # Integer arithmetic on the totals every rank received alike: every rank computes the
        # same next vote (or they would wait for each other in different collectives).
        self.next_step = step + max(1, min(MAX_BATCHES, (int(VOTE_EVERY_S * 1000) * ranks) // max(1, summed_ms)))
        self.last_step, self.last_time = step, time.monotonic()
        asked = [kind for kind, total in zip(preempt.KINDS, totals) if total]
        preempt.adopt(asked)
        return bool(asked)
