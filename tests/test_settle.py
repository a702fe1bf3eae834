"""The one settle: how a run ended, whatever its target, from what the target saw and what
its ranks, its watchdog and its tuning policy left in the run dir. Pure: a run dir in
tmp_path, written through tfrun's own helpers; no process, no Slurm."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tfrun import rundir
from tfrun.paths import RunPaths
from tfrun.targets.settle import TIME_LIMIT, Ending, settle
from tfrun.task import preempt

HANG = {"rank": 1, "host": "node2", "reason": "rank 1 on node2 made no progress since step 5 (12 s)", "requeued": False}
PRUNE = {"policy": "asha", "epoch": 3, "why": "below the median", "trial": 4}
PREEMPTED = {
    "started": 1.0,
    "ended": 2.0,
    "reason": "preempted",
    "requeued": False,
    "why_not_requeued": "partition low ends preempted jobs (PreemptMode=CANCEL) and compute.requeue_on_preempt=false",
}
EXPORT = {"format": "onnx", "passed": True, "onnx": "model.onnx"}
FAILED_AT_1 = {1: {"host": "node2", "ended": 10.0, "exit_code": 1, "error": "ValueError: boom from rank 1"}}
SRUN_SAYS = {"failed_rank": 1, "host": "node2", "reason": "killed by SIGKILL"}


@dataclass
class Case:
    """What the target saw (``ending``), what the run dir holds, and the fields expected
    (``absent``: fields the settle must not set)."""

    ending: Ending
    expected: dict[str, Any]
    records: dict[int, dict[str, Any]] = field(default_factory=dict)
    attempt: dict[str, Any] | None = None
    hang: dict[str, Any] | None = None
    prune: dict[str, Any] | None = None
    export: dict[str, Any] | None = None
    absent: tuple[str, ...] = ()


EVERYTHING = dict(records=FAILED_AT_1, attempt=PREEMPTED, hang=HANG, prune=PRUNE)
FAILED_BY_RANK_1 = {"state": "FAILED", "failed_rank": 1, "host": "node2", "reason": "ValueError: boom from rank 1"}

CASES: dict[str, Case] = {
    # 1. A cancel wins over everything the run dir says.
    "cancelled-over-all": Case(
        Ending("CANCELLED", {0: 0, 1: 1}, SRUN_SAYS, cancelled=True, reason="cancelled with tfrun cancel"),
        {"state": "CANCELLED", "reason": "cancelled with tfrun cancel", "exit_codes": {"0": 0, "1": 1}},
        **EVERYTHING,
        absent=("failed_rank",),
    ),
    "cancelled-by-ctrl-c": Case(
        Ending("CANCELLED", {0: -15}, cancelled=True), {"state": "CANCELLED"}, absent=("reason", "failed_rank")
    ),
    # 2. Preempted and not requeued: STOPPED, resumable, over a prune, a hang and a failure.
    "preempted-not-requeued": Case(
        Ending("FAILED", scheduler="Slurm"),
        {
            "state": "STOPPED",
            "failed_rank": None,
            "reason": f"preempted; not requeued ({PREEMPTED['why_not_requeued']})",
        },
        **EVERYTHING,
    ),
    "preempted-stopped": Case(
        Ending("STOPPED"),
        {"state": "STOPPED", "failed_rank": None, "reason": "preempted; not requeued (Slurm ended it)"},
        attempt={**PREEMPTED, "why_not_requeued": None},
    ),
    "preempted-requeued": Case(
        Ending("FAILED", scheduler="Slurm"),
        FAILED_BY_RANK_1,
        records=FAILED_AT_1,
        attempt={**PREEMPTED, "requeued": True},
    ),
    "preempted-then-completed": Case(
        Ending("COMPLETED", {0: 0}), {"state": "COMPLETED"}, attempt=PREEMPTED, absent=("reason",)
    ),
    # 3. Pruned by its tuning policy, whatever the target called the stop; over a hang and a failure.
    "pruned-over-hang-and-failure": Case(
        Ending("FAILED", {0: 0, 1: 1}, SRUN_SAYS),
        {
            "state": "PRUNED",
            "failed_rank": None,
            "pruned_epoch": 3,
            "reason": "pruned by policy asha at epoch 3: below the median",
        },
        records=FAILED_AT_1,
        hang=HANG,
        prune=PRUNE,
    ),
    "pruned-stopped": Case(
        Ending("STOPPED", {0: preempt.EXIT_PREEMPTED}, reason="stopped on request"),
        {"state": "PRUNED", "pruned_epoch": 3},
        prune=PRUNE,
    ),
    "pruned-queued-job-cancelled-by-slurm": Case(
        Ending("CANCELLED", scheduler="Slurm"), {"state": "PRUNED"}, prune=PRUNE
    ),
    "pruned-but-completed": Case(
        Ending("COMPLETED", {0: 0}),
        {"state": "COMPLETED", "export": EXPORT},
        prune=PRUNE,
        export=EXPORT,
        absent=("pruned_epoch",),
    ),
    # 4. A hang the watchdog ended: its account wins over the ranks' and the scheduler's.
    "hang-over-failure": Case(
        Ending("FAILED", {0: -9, 1: 1}, SRUN_SAYS),
        {"state": "FAILED", "failed_rank": 1, "host": "node2", "reason": f"hang: {HANG['reason']}"},
        records=FAILED_AT_1,
        hang=HANG,
    ),
    "hang-over-slurm-cancelled": Case(
        Ending("CANCELLED", scheduler="Slurm"),
        {"state": "FAILED", "failed_rank": 1, "reason": f"hang: {HANG['reason']}"},
        hang=HANG,
    ),
    "hang-over-timeout": Case(Ending("TIMEOUT", {0: -15, 1: -15}), {"state": "FAILED", "failed_rank": 1}, hang=HANG),
    "hang-requeue-refused": Case(
        Ending("CANCELLED", scheduler="Slurm"),
        {"state": "FAILED", "reason": f"hang: {HANG['reason']}; not requeued: disabled"},
        hang={**HANG, "requeue_failed": "disabled"},
    ),
    "hang-requeued": Case(
        Ending("FAILED", scheduler="Slurm"), FAILED_BY_RANK_1, records=FAILED_AT_1, hang={**HANG, "requeued": True}
    ),
    "hang-but-completed": Case(
        Ending("COMPLETED", {0: 0, 1: 0}), {"state": "COMPLETED"}, hang=HANG, absent=("failed_rank",)
    ),
    # 5. The first failing rank: the target's account, with the rank's own error before an exit's description.
    "first-failure-rank-error-wins": Case(
        Ending("FAILED", {0: -15, 1: 1}, {"failed_rank": 1, "host": "here", "reason": "exit code 1"}),
        {**FAILED_BY_RANK_1, "host": "here"},
        records=FAILED_AT_1,
    ),
    "first-failure-as-the-target-says": Case(
        Ending("FAILED", {0: -15, 1: -9}, SRUN_SAYS), SRUN_SAYS, records={1: {"host": "node2"}}
    ),
    "first-failure-of-the-exit-codes": Case(
        Ending("FAILED", {0: 3, 1: -9}, host="here"),
        {"failed_rank": 1, "host": "node2", "reason": "killed by SIGKILL"},
        records={0: {"host": "node1", "ended": 20.0}, 1: {"host": "node2", "ended": 10.0}},
    ),
    "first-failure-without-records": Case(
        Ending("FAILED", {0: 0, 1: 7}, host="here"),
        {"failed_rank": 1, "host": "here", "reason": "exit code 7", "exit_codes": {"0": 0, "1": 7}},
    ),
    "first-failure-of-the-records": Case(
        Ending("FAILED", scheduler="Slurm"),
        {**FAILED_BY_RANK_1, "exit_codes": {"0": 0, "1": 1}},
        records={0: {"host": "node1", "ended": 11.0, "exit_code": 0}, **FAILED_AT_1},
    ),
    "unfinished-rank": Case(
        Ending("FAILED", scheduler="Slurm"),
        {
            "failed_rank": 1,
            "host": "node2",
            "reason": "killed before it finished (Slurm state FAILED)",
            "exit_codes": {"0": 0, "1": None},
        },
        records={0: {"host": "node1", "ended": 11.0, "exit_code": 0}, 1: {"host": "node2"}},
    ),
    "timeout-unfinished-rank": Case(
        Ending("TIMEOUT", scheduler="Slurm"),
        {"state": "TIMEOUT", "failed_rank": 0, "reason": "killed before it finished (Slurm state TIMEOUT)"},
        records={0: {"host": "node1"}},
    ),
    "timeout-exits-are-the-limit's": Case(
        Ending("TIMEOUT", {0: -15, 1: preempt.EXIT_PREEMPTED}),
        {"state": "TIMEOUT", "reason": TIME_LIMIT},
        absent=("failed_rank",),
    ),
    "stopped-exits-are-no-failure": Case(
        Ending("STOPPED", {0: preempt.EXIT_PREEMPTED, 1: 0}, reason="stopped on request"),
        {"state": "STOPPED", "reason": "stopped on request"},
        records={0: {"exit_code": preempt.EXIT_PREEMPTED, "ended": 5.0}},
        absent=("failed_rank",),
    ),
    # 6. COMPLETED: with its export; a rank that failed on its own (a lost server) is no failure.
    "completed-with-export": Case(
        Ending("COMPLETED", {0: 0, 1: -signal.SIGKILL}),
        {"state": "COMPLETED", "export": EXPORT},
        export=EXPORT,
        absent=("failed_rank", "reason"),
    ),
    "export-only-when-completed": Case(
        Ending("FAILED", {0: 1}), {"state": "FAILED", "failed_rank": 0}, export=EXPORT, absent=("export",)
    ),
}


def _write(run_dir: Path, case: Case) -> None:
    for rank, record in case.records.items():
        rundir.update_rank(run_dir, rank, **record)
    if case.attempt is not None:
        rundir.update_attempt(run_dir, "attempt-1", **case.attempt)
    if case.hang is not None:
        rundir.update_status(run_dir, hang=case.hang)
    if case.prune is not None:
        rundir.write_json(RunPaths.of(run_dir).prune, case.prune)
    if case.export is not None:
        rundir.write_json(RunPaths.of(run_dir).export, case.export)


@pytest.mark.parametrize("name", list(CASES))
def test_one_settle_applies_the_rules_in_one_order(tmp_path: Path, name: str) -> None:
    case = CASES[name]
    _write(tmp_path, case)
    fields = settle(tmp_path, case.ending)
    assert {k: fields.get(k) for k in case.expected} == case.expected, fields
    assert [k for k in case.absent if fields.get(k) is not None] == [], fields
    assert fields["ended"] > 0


def test_every_rule_gives_way_to_the_one_above_it(tmp_path: Path) -> None:
    """All the evidence at once, then taken away from the top: each rule decides in turn."""
    run_dir = tmp_path / "run"
    _write(run_dir, Case(Ending("FAILED"), {}, records=FAILED_AT_1, attempt=PREEMPTED, hang=HANG, prune=PRUNE))
    ending = Ending("FAILED", {0: 0, 1: 1}, SRUN_SAYS, host="here")
    seen = [settle(run_dir, Ending("FAILED", {0: 0, 1: 1}, cancelled=True))["state"]]
    seen.append(settle(run_dir, ending)["reason"].split(";")[0])
    rundir.update_attempt(run_dir, "attempt-1", requeued=True)
    seen.append(settle(run_dir, ending)["state"])
    RunPaths.of(run_dir).prune.unlink()
    seen.append(settle(run_dir, ending)["reason"].split(":")[0])
    rundir.update_status(run_dir, hang=None)
    seen.append(settle(run_dir, ending)["reason"])
    assert seen == ["CANCELLED", "preempted", "PRUNED", "hang", "ValueError: boom from rank 1"]


def test_a_run_that_completes_after_a_requeued_hang_names_no_failure(tmp_path: Path) -> None:
    """The watchdog recorded the hang's rank and account in the status, then the job was requeued
    and completed: the status a user reads says nothing failed."""
    rundir.update_status(
        tmp_path, hang={**HANG, "requeued": True}, failed_rank=1, host="node2", reason=f"hang: {HANG['reason']}"
    )
    rundir.update_status(tmp_path, **settle(tmp_path, Ending("COMPLETED", {0: 0, 1: 0})))
    status = rundir.read_status(tmp_path)
    assert (status["state"], status.get("failed_rank"), status.get("reason")) == ("COMPLETED", None, None), status
