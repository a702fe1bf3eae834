"""Tuning studies of hydra/sweeper=tfrun (issue 18): asynchronous trials, early-termination
policies, reattaching to a study whose follower was killed, bad input. Real runs, no mocks;
the trials are a synthetic script (no TensorFlow) whose curve is a function of its
parameters, so the right decision is known."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import DIGITS, popen_tfrun, read_json, run_dir_from, run_tfrun, scratch_env, stop, wait_for

pytestmark = pytest.mark.slow

# After epoch e of E: q * (e+1) / E; the bad trials (q < 0.5) are a bit worse when s=1, and
# have slower epochs (so that a follower on a loaded machine still sees them mid-way).
SYNTH = """
import argparse, time
from tfrun.tracking.metrics import log_epoch
p = argparse.ArgumentParser()
p.add_argument("--q", type=float, default=1.0); p.add_argument("--s", type=int, default=0)
p.add_argument("--epochs", type=int, default=5); p.add_argument("--secs", type=float, default=0.25)
a = p.parse_args()
for e in range(a.epochs):
    time.sleep(a.secs if a.q >= 0.5 else 4 * a.secs)
    log_epoch(e, {"score": a.q * (e + 1) / a.epochs - (0.01 * a.s if a.q < 0.5 else 0.0)})
"""
# Two epochs of secs/2 each: trials as long as their parameter says.
UNEVEN = """
import argparse, time
from tfrun.tracking.metrics import log_epoch
p = argparse.ArgumentParser(); p.add_argument("--secs", type=float, default=1.0); a = p.parse_args()
for e in range(2):
    time.sleep(a.secs / 2)
    log_epoch(e, {"score": a.secs})
"""
TUNE = ("-m", "hydra/sweeper=tfrun", "tfrun.objective=score")


def sweep_of(tmp_path: Path) -> Path:
    found = sorted((tmp_path / "runs").glob("sweep-*"))
    assert len(found) == 1, found
    return found[0]


def trials(sweep: Path) -> dict[int, dict]:
    """Trial number -> its point in sweep.json, with its status."""
    points = read_json(sweep / "sweep.json")["points"]
    return {p["trial"]: {**p, "status": read_json(Path(p["run_dir"]) / "status.json")} for p in points}


def study_states(sweep: Path) -> list[str]:
    import optuna
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(sweep / "study.journal")))
    study = optuna.load_study(study_name="tfrun", storage=storage)
    return [t.state.name for t in sorted(study.get_trials(), key=lambda t: t.number)]


def epochs_recorded(run_dir: str) -> int:
    path = Path(run_dir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return sum(1 for line in lines if "epoch" in json.loads(line))


POLICIES = {
    "median": [],
    "bandit": ["hydra.sweeper.policy_args.slack_factor=0.2"],
    "truncation": ["hydra.sweeper.policy_args.truncation_percentage=50"],
    "asha": ["hydra.sweeper.policy_args.min_resource=1", "hydra.sweeper.policy_args.reduction_factor=2"],
    "hyperband": ["hydra.sweeper.policy_args.min_resource=1", "hydra.sweeper.policy_args.max_resource=5"],
}


@pytest.mark.slow
@pytest.mark.parametrize("policy", list(POLICIES))
def test_policy_prunes_the_bad_trials_and_lets_the_good_run_on(tmp_path: Path, policy: str) -> None:
    """A grid in the order written: the two good trials (q=1) run first, side by side, then the
    two bad ones (q=0.2), which every policy should stop at its first evaluation."""
    (tmp_path / "synth.py").write_text(SYNTH)
    result = run_tfrun(
        tmp_path,
        *TUNE,
        "entry.script=synth.py",
        "hydra.sweeper.sampler=grid",
        "trainer.q=choice(1.0,0.2)",
        "trainer.s=choice(0,1)",
        f"hydra.sweeper.policy={policy}",
        *POLICIES[policy],
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = sweep_of(tmp_path)
    found = trials(sweep)
    assert sorted(found) == [0, 1, 2, 3]
    good, bad = [found[0], found[1]], [found[2], found[3]]
    assert all(t["status"]["state"] == "COMPLETED" and t["objective"]["value"] == pytest.approx(1.0) for t in good), (
        found
    )
    pruned = [t for t in found.values() if t["status"]["state"] == "PRUNED"]
    assert all(t in bad for t in pruned), found
    if policy == "hyperband":  # its brackets split 4 trials: a bad one may have no better one to lose to
        assert pruned, found
    else:
        assert len(pruned) == 2, found
    states = study_states(sweep)
    for t in pruned:
        # Stopped within one epoch of the decision, told to the study as pruned, not requeued or failed.
        assert epochs_recorded(t["run_dir"]) <= t["status"]["pruned_epoch"] + 1, t
        assert states[t["trial"]] == "PRUNED" and t["state"] == "PRUNED", (states, t)
        assert (Path(t["run_dir"]) / "prune.json").exists()
        assert "received SIGUSR2" in (Path(t["run_dir"]) / "logs" / "rank0.log").read_text()
    assert f"{2 + (2 - len(pruned))} done, {len(pruned)} pruned, 0 failed" in result.stderr, result.stderr
    assert "compute saved by policy" in result.stderr and f"best trial: {found[0]['run_dir']} " in result.stderr
    # Saved: the epochs a pruned trial did not run (of 5) at its 1 s per epoch, one task each;
    # its start-up (importing, a process) is paid once, not once per epoch.
    saved = read_json(sweep / "sweep.json")["study"]["saved_task_seconds"]
    expected = sum(5 - epochs_recorded(t["run_dir"]) for t in pruned) * 1.0
    assert 0.6 * expected <= saved <= 1.4 * expected + 0.5, (saved, expected)
    if policy == "bandit":
        table = run_tfrun(tmp_path, "runs", "--sweep", str(sweep)).stdout
        assert table.count("PRUNED@1") == 2 and table.count("COMPLETED") == 2, table
        again = run_tfrun(tmp_path, "resume", pruned[0]["run_dir"])
        assert again.returncode == 2 and "was pruned by its tuning study's policy" in again.stderr, again.stderr


@pytest.mark.slow
def test_a_pruned_keras_trial_keeps_its_backup(tmp_path: Path) -> None:
    """One trial at a time: a good one (a stand-in that records val_accuracy 0.9 per epoch
    without TensorFlow, to keep the test short), then the digits example with a learning rate
    that does not learn: it is stopped after a few of its 40 epochs, the last of them in its backup."""
    (tmp_path / "digits_or_good.py").write_text(
        "import runpy, sys\n"
        "if float(sys.argv[sys.argv.index('--lr') + 1]) > 0.01:\n"
        "    from tfrun.tracking.metrics import log_epoch\n"
        "    for e in range(int(sys.argv[sys.argv.index('--epochs') + 1])):\n"
        "        log_epoch(e, {'val_accuracy': 0.9})\n"
        "else:\n"
        f"    sys.argv[0] = {str(DIGITS)!r}\n"
        f"    runpy.run_path({str(DIGITS)!r}, run_name='__main__')\n"
    )
    result = run_tfrun(
        tmp_path,
        *TUNE[:2],
        "tfrun.objective=val_accuracy",
        "entry.script=digits_or_good.py",
        "hydra.sweeper.sampler=grid",
        "hydra.sweeper.max_parallel=1",
        "trainer.epochs=40",
        "trainer.lr=choice(0.05,0.00001)",
        "hydra.sweeper.policy=bandit",
        "hydra.sweeper.policy_args.slack_factor=0.1",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = trials(sweep_of(tmp_path))
    assert found[0]["status"]["state"] == "COMPLETED" and found[1]["status"]["state"] == "PRUNED", found
    pruned = Path(found[1]["run_dir"])
    # Epochs of digits take ~0.3 s: the follower (one poll every 0.25 s) decides within a few.
    assert found[1]["status"]["pruned_epoch"] <= 10, found[1]
    assert epochs_recorded(str(pruned)) <= found[1]["status"]["pruned_epoch"] + 1
    assert read_json(pruned / "checkpoints" / "backup" / "state.json")
    assert list((pruned / "checkpoints" / "backup").glob("epoch-*.weights.h5"))
    attempts = read_json(pruned / "attempts.json")
    assert all(not a.get("requeued") for a in attempts.values()), attempts


# Four trials, one after another: a good one, two that diverge at their second epoch (NaN, +inf)
# and a poor one that falls behind at its second epoch (where the diverged ones have no number).
DIVERGING = """
import argparse, time
from tfrun.tracking.metrics import log_epoch
p = argparse.ArgumentParser(); p.add_argument("--case", default="good"); a = p.parse_args()
for e in range(4):
    time.sleep(0.4)
    value = 0.25 * (e + 1) if e == 0 or a.case in ("good", "nan", "inf") else 0.1
    if a.case in ("nan", "inf") and e >= 1:
        value = float(a.case)
    log_epoch(e, {"score": value})
"""


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["none", "bandit", "asha"])
def test_a_diverged_trial_is_stopped_told_as_failed_and_never_the_best(tmp_path: Path, policy: str) -> None:
    (tmp_path / "diverging.py").write_text(DIVERGING)
    args = {
        "none": [],
        "bandit": ["hydra.sweeper.policy_args.slack_factor=0.1"],
        "asha": ["hydra.sweeper.policy_args.min_resource=1", "hydra.sweeper.policy_args.reduction_factor=2"],
    }
    result = run_tfrun(
        tmp_path,
        *TUNE,
        "entry.script=diverging.py",
        "hydra.sweeper.sampler=grid",
        "hydra.sweeper.max_parallel=1",
        "trainer.case=choice(good,nan,inf,poor)",
        f"hydra.sweeper.policy={policy}",
        *args[policy],
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = sweep_of(tmp_path)
    found = trials(sweep)
    assert study_states(sweep) == ["COMPLETE", "FAIL", "FAIL", "COMPLETE" if policy == "none" else "PRUNED"]
    assert f"tfrun: best trial: {found[0]['run_dir']} (score=1)" in result.stderr, result.stderr
    assert read_json(sweep / "sweep.json")["study"]["best"] == {"run_dir": found[0]["run_dir"], "value": 1.0}
    for n in (1, 2):
        if policy == "none":  # nothing stops it: it ends, and is a failed trial
            assert found[n]["status"]["state"] == "COMPLETED" and found[n]["objective"]["value"] is None, found[n]
            assert f"trial {n}: COMPLETED: its score is {('nan', 'inf')[n - 1]}, not a finite number" in result.stderr
        else:
            assert found[n]["status"]["state"] == "PRUNED" and found[n]["status"]["pruned_epoch"] == 2, found[n]
            assert "not a finite number" in found[n]["status"]["reason"], found[n]
    if policy != "none":
        assert found[3]["status"]["state"] == "PRUNED" and found[3]["status"]["pruned_epoch"] == 2, found[3]
    assert ("2 done, 0 pruned, 2 failed" if policy == "none" else "1 done, 3 pruned, 0 failed") in result.stderr


ARGV = """
import json, sys
from pathlib import Path
from tfrun.tracking.metrics import log_epoch
with open(Path(__file__).with_name("argv.jsonl"), "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
log_epoch(0, {"score": 1.0})
"""


@pytest.mark.slow
def test_a_choice_with_a_comma_reaches_the_trial_as_one_value(tmp_path: Path) -> None:
    """Values with Hydra's syntax in them (a comma, a quote, an equals sign) are quoted for the
    trial's overrides: each trial's script gets its value whole, as one argument."""
    (tmp_path / "argv.py").write_text(ARGV)
    result = run_tfrun(
        tmp_path,
        *TUNE,
        "entry.script=argv.py",
        "hydra.sweeper.sampler=grid",
        "hydra.sweeper.max_parallel=1",
        """trainer.opt=choice("a,b",sgd,"it's",'x=(1)')""",
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = [json.loads(line) for line in (tmp_path / "argv.jsonl").read_text().splitlines()]
    values = [argv[argv.index("--opt") + 1] for argv in seen]
    assert values == ["a,b", "sgd", "it's", "x=(1)"], seen
    overrides = [t["overrides"][0] for _, t in sorted(trials(sweep_of(tmp_path)).items())]
    assert overrides == [
        "++trainer.opt='a,b'",
        "++trainer.opt=sgd",
        "++trainer.opt='it\\'s'",
        "++trainer.opt='x=(1)'",
    ], overrides


@pytest.mark.slow
def test_an_objective_no_trial_records_stops_the_study_after_the_first_trial(tmp_path: Path) -> None:
    """tfrun.objective with a typo: the first trial completes without it; the study stops there
    (exit 2, the metrics the trial did record named), the long trial beside it is cancelled and
    no other trial starts."""
    (tmp_path / "synth.py").write_text(SYNTH)
    result = run_tfrun(
        tmp_path,
        "-m",
        "hydra/sweeper=tfrun",
        "tfrun.objective=scroe",
        "entry.script=synth.py",
        "hydra.sweeper.sampler=grid",
        "hydra.sweeper.max_parallel=2",
        "trainer.q=choice(1.0,0.9)",
        "trainer.secs=choice(0.1,3)",
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    sweep = sweep_of(tmp_path)
    found = trials(sweep)
    assert last.startswith(
        "tfrun: error: tfrun.objective=scroe: trial 0 completed without recording scroe, and no "
        f"trial of the study has; it recorded score ({found[0]['run_dir']}/metrics.jsonl): set "
        "tfrun.objective to one of them"
    ), result.stderr
    assert sorted(found) == [0, 1], found  # nothing started after it
    assert found[0]["status"]["state"] == "COMPLETED" and found[1]["status"]["state"] == "CANCELLED", found
    assert epochs_recorded(found[1]["run_dir"]) < 5, found[1]  # stopped, not run to its end
    assert study_states(sweep) == ["FAIL", "FAIL", "WAITING", "WAITING"]  # (the grid's other points, never asked for)


@pytest.mark.slow
def test_a_second_follower_of_a_study_is_refused(tmp_path: Path) -> None:
    """While a study is followed, `tfrun tune resume` is refused (exit 1), naming the follower's
    pid and host, and starts nothing; once that follower is killed, its lock is gone with it."""
    import signal
    import socket

    (tmp_path / "synth.py").write_text(SYNTH)
    proc, _, err = popen_tfrun(
        tmp_path,
        *TUNE,
        "entry.script=synth.py",
        "hydra.sweeper.sampler=grid",
        "hydra.sweeper.max_parallel=1",
        "trainer.q=choice(1.0,0.9)",
        "trainer.secs=3",
    )
    try:
        deadline = time.monotonic() + 60
        while not list((tmp_path / "runs").glob("sweep-*/0/ranks/0.json")):
            assert time.monotonic() < deadline and proc.poll() is None, err.read_text()
            time.sleep(0.2)
        sweep = sweep_of(tmp_path)
        second = run_tfrun(tmp_path, "tune", "resume", sweep.name, timeout=60)
        assert proc.poll() is None, err.read_text()  # (the first one still follows)
        assert second.returncode == 1, second.stderr
        assert second.stderr.startswith(
            f"tfrun: error: the study in {sweep} is being followed already, by tfrun pid "
            f"{proc.pid} on {socket.gethostname()} since "
        ), second.stderr
        assert second.stderr.strip().count("\n") == 0, second.stderr
        assert sorted(trials(sweep)) == [0], trials(sweep)  # it started nothing
    finally:
        proc.kill()  # SIGKILL: the kernel drops its lock
        proc.wait()
        for path in (tmp_path / "runs").glob("sweep-*/*/ranks/*.json"):  # its local trial's task, orphaned
            record = read_json(path)
            if record.get("ended") is None:
                try:
                    os.kill(record["pid"], signal.SIGKILL)
                except ProcessLookupError:  # it ended without recording it: nothing to stop
                    pass
    result = run_tfrun(tmp_path, "tune", "resume", sweep.name, timeout=120)
    assert result.returncode == 0 and "resuming the study" in result.stderr, result.stderr[-3000:]
    assert sorted(trials(sweep)) == [0, 1]


@pytest.mark.slow
def test_the_sweep_table_sorts_and_marks_the_best_by_the_studys_direction(tmp_path: Path) -> None:
    """A study that minimizes a metric whose name says nothing of it (score): `runs --sweep
    --sort score` puts the lowest first and marks it as the best, as the study judged."""
    (tmp_path / "synth.py").write_text(SYNTH)
    result = run_tfrun(
        tmp_path,
        *TUNE,
        "entry.script=synth.py",
        "hydra.sweeper.sampler=grid",
        "hydra.sweeper.direction=minimize",
        "trainer.q=choice(0.8,0.5,1.0)",
        "trainer.secs=0.05",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = sweep_of(tmp_path)
    table = run_tfrun(tmp_path, "runs", "--sweep", str(sweep), "--sort", "score").stdout.splitlines()
    assert [line.split()[:2] for line in table[1:4]] == [["1*", "0.5"], ["0", "0.8"], ["2", "1.0"]], table
    assert table[1].split()[-1] == "0.5/0.1", table  # its best score is its lowest (after one epoch of five)
    assert table[-1] == "* the study's best: score=0.5 (minimize)", table


def rank0(trial: dict) -> dict:
    return read_json(Path(trial["run_dir"]) / "ranks" / "0.json")


@pytest.mark.slow
@pytest.mark.slurm
def test_an_asynchronous_study_on_slurm_survives_a_killed_follower(tmp_path: Path, job_name: str) -> None:
    """Two slots, trials of 8 s, 1 s, 2 s and 3 s, each its own Slurm job. The third starts as
    soon as the short one ends, while the long one still runs (in lock-step batches it would
    wait for the long one). The follower is then killed (SIGKILL) and `tfrun tune resume`
    reattaches: the running trials are followed, not resubmitted, the missing one is started,
    and every trial ran once."""
    (tmp_path / "uneven.py").write_text(UNEVEN)
    proc, _, err = popen_tfrun(
        tmp_path,
        *TUNE,
        "compute=slurm",
        "compute.poll_s=0.5",
        f"compute.job_name={job_name}",
        "entry.script=uneven.py",
        "hydra.sweeper.sampler=grid",
        "hydra.sweeper.max_parallel=2",
        "trainer.secs=choice(8,1,2,3)",
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            index = tmp_path / "runs"
            sweeps = list(index.glob("sweep-*/sweep.json")) if index.exists() else []
            points = read_json(sweeps[0])["points"] if sweeps else []
            if len(points) >= 3 and (
                read_json(Path(points[2]["run_dir"]) / "status.json")
                if (Path(points[2]["run_dir"]) / "status.json").exists()
                else {}
            ).get("job_ids"):
                break  # the third trial is submitted (and trial 0 still runs)
            time.sleep(0.2)
        else:
            pytest.fail(f"the study did not reach its third trial:\n{err.read_text()}")
    finally:
        proc.kill()  # SIGKILL: no chance to tidy up
        proc.wait()
    stop(proc)
    sweep = sweep_of(tmp_path)
    before = trials(sweep)
    assert before[1]["status"]["state"] == "COMPLETED" and len(before) == 3, before
    result = run_tfrun(tmp_path, "tune", "resume", sweep.name, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming the study" in result.stderr and "trial 0: following it again" in result.stderr, result.stderr
    after = trials(sweep)
    assert sorted(after) == [0, 1, 2, 3] and all(t["status"]["state"] == "COMPLETED" for t in after.values()), after
    assert all(len(t["status"]["job_ids"]) == 1 for t in after.values()), after  # nothing submitted twice
    assert [after[n]["status"]["job_ids"] for n in (0, 1, 2)] == [before[n]["status"]["job_ids"] for n in (0, 1, 2)]
    assert study_states(sweep) == ["COMPLETE"] * 4
    long, short, third = (rank0(after[n]) for n in (0, 1, 2))
    assert short["ended"] <= third["started"] < long["ended"], (long, short, third)
    assert "study: 4 trial(s): 4 done, 0 pruned, 0 failed" in result.stderr


# q < 0.5: one epoch, then it waits (the test requeues its job, held, meanwhile); the others
# wait for the test's go (a file) before their first epoch, so that nothing is judged before.
GATED = """
import argparse, time
from pathlib import Path
from tfrun.tracking.metrics import log_epoch
p = argparse.ArgumentParser(); p.add_argument("--q", type=float); p.add_argument("--go"); a = p.parse_args()
if a.q < 0.5:
    log_epoch(0, {"score": a.q})
    time.sleep(600)
deadline = time.time() + 600
while not Path(a.go).exists():
    if time.time() > deadline:
        raise SystemExit("no go from the test in 600 s")
    time.sleep(0.1)
for e in range(3):
    log_epoch(e, {"score": a.q})
    time.sleep(0.5)
"""


def sacct_jobs(job_ids: list[str]) -> dict[str, dict[str, str]]:
    out = subprocess.run(
        ["sacct", "-X", "-P", "-n", "-o", "JobID,State,Submit,Start,End", "-j", ",".join(job_ids)],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    rows = [line.split("|") for line in out.splitlines() if line]
    return {r[0]: {"State": r[1], "Submit": r[2], "Start": r[3], "End": r[4]} for r in rows}


@pytest.mark.slow
@pytest.mark.slurm
def test_a_trial_pruned_while_its_job_waits_is_cancelled_and_keeps_its_slot(tmp_path: Path, job_name: str) -> None:
    """Two slots. Trial 1 records a poor first epoch, then its job is requeued and held (PENDING,
    as a preempted trial waits to run again); only then does trial 0 record its first epoch, and
    the median policy prunes trial 1 while its job waits. The job is cancelled (a signal cannot
    reach a job that is not running), and trial 2 is submitted only once it has ended: never
    more than two trials' jobs at once."""
    (tmp_path / "gated.py").write_text(GATED)
    go = tmp_path / "go"
    name = job_name
    # A job per trial (hydra.sweeper.pool=false): in a pool a trial has no job of its own to wait.
    proc, _, err = popen_tfrun(
        tmp_path,
        *TUNE,
        "compute=slurm",
        "compute.poll_s=0.5",
        f"compute.job_name={name}",
        "entry.script=gated.py",
        "hydra.sweeper.sampler=grid",
        "hydra.sweeper.max_parallel=2",
        "hydra.sweeper.policy=median",
        "trainer.q=choice(1.0,0.2,1.1)",
        f"trainer.go={go}",
        "hydra.sweeper.pool=false",
    )
    try:
        deadline = time.monotonic() + 240
        while not list((tmp_path / "runs").glob("sweep-*/1/metrics.jsonl")):
            assert time.monotonic() < deadline and proc.poll() is None, err.read_text()
            time.sleep(0.2)
        sweep = sweep_of(tmp_path)
        job = read_json(sweep / "1" / "status.json")["job_ids"][-1]
        held = subprocess.run(["scontrol", "requeuehold", job], capture_output=True, text=True, timeout=60)
        assert held.returncode == 0, held.stderr
        while (
            subprocess.run(
                ["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=60
            ).stdout.strip()
            != "PENDING"
        ):
            assert time.monotonic() < deadline, err.read_text()
            time.sleep(0.2)
        go.write_text("")
        proc.wait(timeout=180)
    finally:
        stop(proc)
        subprocess.run(["scancel", f"--name={name}"], capture_output=True, timeout=60)  # (a job left held)
    assert proc.returncode == 0, err.read_text()[-3000:]
    found = trials(sweep)
    assert [found[n]["status"]["state"] for n in (0, 1, 2)] == ["COMPLETED", "PRUNED", "COMPLETED"], found
    assert found[1]["status"]["pruned_epoch"] == 1, found[1]
    assert "its job was waiting to run: cancelled" in err.read_text(), err.read_text()
    jobs = sacct_jobs([found[n]["status"]["job_ids"][-1] for n in (0, 1, 2)])
    pruned, third = jobs[job], jobs[found[2]["status"]["job_ids"][-1]]
    assert pruned["State"].startswith("CANCELLED"), jobs  # cancelled while it waited, never run again
    assert len(rundir_attempts(found[1]["run_dir"])) == 1, found[1]
    assert third["Submit"] >= pruned["End"], jobs  # its slot was held until its job had ended
    for t in (j["Submit"] for j in jobs.values()):  # never more than max_parallel jobs at once
        assert sum(1 for j in jobs.values() if j["Submit"] <= t < j["End"]) <= 2, jobs


def rundir_attempts(run_dir: str) -> list:
    path = Path(run_dir) / "attempts.json"
    return list(read_json(path).values()) if path.exists() else []


@pytest.mark.slow
def test_the_tasks_of_a_pruned_trial_stop_at_their_start(tmp_path: Path) -> None:
    """A pruned trial whose job starts anyway (it started between the follower's look and its
    cancel, or the signal found no task yet): its task finds prune.json and runs no script."""
    from tfrun.task.preempt import EXIT_PREEMPTED

    (tmp_path / "mark.py").write_text("from pathlib import Path\nPath(__file__).with_name('ran').touch()\n")
    result = run_tfrun(tmp_path, "entry.script=mark.py")
    assert result.returncode == 0 and (tmp_path / "ran").exists(), result.stderr
    run_dir = run_dir_from(result.stderr)
    (tmp_path / "ran").unlink()
    (run_dir / "prune.json").write_text(json.dumps({"policy": "median", "epoch": 1, "why": "behind", "trial": 0}))
    task = subprocess.run(
        [sys.executable, "-m", "tfrun.bootstrap", str(run_dir)],
        cwd=tmp_path,
        env=scratch_env(tmp_path, TFRUN_RANK="0"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert task.returncode == EXIT_PREEMPTED and not (tmp_path / "ran").exists(), task.stderr
    assert "pruned by the tuning study before this attempt started: the script is not run" in task.stderr


BAD = {
    "sampler": (
        ["hydra.sweeper.sampler=annealing", "trainer.q=choice(1,2)", "tfrun.objective=score"],
        "hydra.sweeper.sampler='annealing' is not valid: one of: random, grid, tpe",
    ),
    "policy": (
        ["hydra.sweeper.policy=early", "trainer.q=choice(1,2)", "tfrun.objective=score"],
        "hydra.sweeper.policy='early' is not valid: one of: none, median, bandit, truncation, asha, hyperband",
    ),
    "no objective": (
        ["hydra.sweeper.policy=median", "trainer.q=choice(1,2)"],
        "hydra.sweeper.policy=median stops trials from the objective's values per epoch, but no objective",
    ),
    "empty space": (["trainer.q=1", "tfrun.objective=score"], "empty search space"),
    "startup on random": (
        [
            "hydra.sweeper.sampler=random",
            "hydra.sweeper.n_startup_trials=3",
            "trainer.q=choice(1,2)",
            "tfrun.objective=score",
        ],
        "hydra.sweeper.n_startup_trials=3: only the samplers that model the results start with "
        "random trials (tpe, gp, cmaes); sampler=random does not",
    ),
    "startup negative": (
        ["hydra.sweeper.n_startup_trials=-1", "trainer.q=choice(1,2)", "tfrun.objective=score"],
        "hydra.sweeper.n_startup_trials=-1 is not valid: a whole number, 0 or more",
    ),
    "policy argument": (
        [
            "hydra.sweeper.policy=truncation",
            "hydra.sweeper.policy_args.truncation_percentage=half",
            "trainer.q=choice(1,2)",
            "tfrun.objective=score",
        ],
        "hydra.sweeper.policy_args.truncation_percentage='half': a percentage between 1 and 99",
    ),
    # Optuna's Hyperband would only fail when the first trial asks it, with trials running.
    "optuna policy argument": (
        [
            "hydra.sweeper.policy=hyperband",
            "hydra.sweeper.policy_args.reduction_factor=1",
            "trainer.q=choice(1,2)",
            "tfrun.objective=score",
        ],
        "hydra.sweeper.policy_args.reduction_factor=1 is not valid: a whole number, 2 or more",
    ),
    "storage": (
        ["hydra.sweeper.storage=/nonexistent/dir/study.journal", "trainer.q=choice(1,2)", "tfrun.objective=score"],
        "hydra.sweeper.storage='/nonexistent/dir/study.journal' is not valid: a journal file in an existing",
    ),
}


def test_bad_input_is_one_paragraph_exit_2_and_nothing_runs(tmp_path: Path) -> None:
    (tmp_path / "synth.py").write_text(SYNTH)
    for name, (args, expected) in BAD.items():
        result = run_tfrun(tmp_path, "-m", "hydra/sweeper=tfrun", "entry.script=synth.py", "compute=slurm", *args)
        assert result.returncode == 2, (name, result.stderr)
        assert result.stderr.startswith("tfrun: error: ") and expected in result.stderr, (name, result.stderr)
        assert result.stderr.strip().count("\n") == 0, (name, result.stderr)  # one paragraph
        assert not list((tmp_path / "runs").glob("*")), name  # no sweep dir: nothing was planned to run


def test_dry_run_shows_the_study(tmp_path: Path) -> None:
    (tmp_path / "synth.py").write_text(SYNTH)
    result = run_tfrun(
        tmp_path,
        "--dry-run",
        *TUNE,
        "entry.script=synth.py",
        "hydra.sweeper.n_trials=24",
        "hydra.sweeper.max_parallel=4",
        "hydra.sweeper.policy=bandit",
        "hydra.sweeper.policy_args.slack_factor=0.1",
        "trainer.lr=tag(log,interval(1e-4,1e-1))",
        "trainer.batch_size=choice(32,64)",
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for line in (
        "sampler:    tpe (multivariate, constant liar, 8 random trial(s) first)",
        "trials:     24, at most 4 at once",
        "policy:     bandit delay_evaluation=0 evaluation_interval=1 slack_factor=0.1",
        "storage:    journal file ",
        "trainer.lr: float in [0.0001, 0.1], log scale",
        "trainer.batch_size: one of 32, 64",
        "argv:    ",
    ):
        assert line in out, out
    assert not (tmp_path / "runs").exists()
    fewer = run_tfrun(
        tmp_path,
        "--dry-run",
        *TUNE,
        "entry.script=synth.py",
        "hydra.sweeper.n_startup_trials=3",
        "trainer.lr=tag(log,interval(1e-4,1e-1))",
    )
    assert fewer.returncode == 0 and "tpe (multivariate, constant liar, 3 random trial(s) first)" in fewer.stdout, (
        fewer.stdout + fewer.stderr
    )


# --- the pieces, without running anything ------------------------------------------------


def test_policies_decide_from_the_curves() -> None:
    from tfrun.errors import ConfigError
    from tfrun.tune import policies

    bandit = policies.make("bandit", {"slack_factor": 0.1}, "acc")
    assert policies.decide(bandit, True, {1: 0.5}, [{1: 0.6}]) is not None  # 0.5 < 0.6 / 1.1
    assert policies.decide(bandit, True, {1: 0.56}, [{1: 0.6}]) is None
    assert policies.decide(bandit, True, {1: 0.5}, []) is None  # nothing to compare with: runs on
    assert policies.decide(bandit, False, {1: 0.7}, [{1: 0.6}]) is not None  # minimize: 0.7 > 0.6 * 1.1
    amount = policies.make("bandit", {"slack_amount": 0.2}, "loss")
    assert policies.decide(amount, False, {1: 0.75}, [{1: 0.6}]) is None
    delayed = policies.make("median", {"delay_evaluation": 2, "evaluation_interval": 2}, "acc")
    assert [policies.evaluation_point(delayed, n) for n in (1, 3, 4, 5, 6)] == [None, None, 4, 4, 6]
    assert policies.decide(delayed, True, {1: 0.0, 2: 0.0, 3: 0.0}, [{1: 1.0, 2: 1.0, 3: 1.0}]) is None
    assert policies.decide(delayed, True, {1: 0.0, 2: 0.0, 3: 0.0, 4: 0.0}, [{4: 1.0, 1: 1, 2: 1, 3: 1}])
    cut = policies.make("truncation", {"truncation_percentage": 50}, "acc")
    assert policies.decide(cut, True, {1: 0.5}, [{1: 0.5}]) is None  # a tie is not the lowest half
    assert policies.decide(cut, True, {1: 0.4}, [{1: 0.5}, {1: 0.6}]) is not None
    for name, args in (
        ("bandit", {}),
        ("median", {"evaluation_interval": 0}),
        ("truncation", {"x": 1}),
        ("none", {"slack_factor": 0.1}),
        ("bandit", {"slack_factor": "abc"}),
        ("bandit", {"slack_amount": -0.1}),
        ("truncation", {"truncation_percentage": "abc"}),
        ("median", {"delay_evaluation": True}),
        ("asha", {"min_resource": 0}),
        ("asha", {"reduction_factor": 1}),
        ("hyperband", {"min_resource": "auto"}),
        ("hyperband", {"min_resource": 10, "max_resource": 5}),
        ("hyperband", {"bootstrap_count": -1}),
    ):
        with pytest.raises(ConfigError):
            policies.make(name, args, "acc")
    assert policies.make("asha", {"min_resource": "auto"}, "acc").args == {"min_resource": "auto"}
    assert policies.make("hyperband", {"min_resource": 5, "max_resource": "auto"}, "acc").name == "hyperband"


def test_the_space_reads_hydra_sweep_syntax() -> None:
    from tfrun.config import space
    from tfrun.errors import ConfigError

    found = space.parse(
        [
            "++trainer.lr=tag(log,interval(1e-4,1e-1))",
            "++trainer.bs=choice(32,64)",
            "x=1,2",
            "++trainer.n=range(2,10,4)",
            "++trainer.f=range(0.5,1.0,0.25)",
            "compute=local",
        ]
    )
    assert [d.describe() for d in found.dimensions] == [
        "trainer.lr: float in [0.0001, 0.1], log scale",
        "trainer.bs: one of 32, 64",
        "x: one of 1, 2",
        "trainer.n: int in [2, 6], step 4",
        "trainer.f: one of 0.5, 0.75",
    ]
    assert found.fixed == ("compute=local",)
    assert found.overrides({"trainer.lr": 0.01, "trainer.bs": 32, "x": 2, "trainer.n": 6, "trainer.f": 0.5})[:2] == [
        "++trainer.lr=0.01",
        "++trainer.bs=32",
    ]
    grid = space.parse(["a=choice(1,2)", "b=range(0,3)"]).grid()
    assert grid[:4] == [{"a": 1, "b": 0}, {"a": 1, "b": 1}, {"a": 1, "b": 2}, {"a": 2, "b": 0}] and len(grid) == 6
    with pytest.raises(ConfigError, match="continuous interval"):
        space.parse(["a=interval(0,1)"]).grid()
    with pytest.raises(ConfigError, match="empty search space"):
        space.parse(["a=1"])


# --- decisions over a table of curves, both directions -------------------------------------

NAN, INF = float("nan"), float("inf")
DECIDING = {
    "median": {},
    "bandit": {"slack_factor": 0.1},
    "truncation": {"truncation_percentage": 50},
    "asha": {"min_resource": 1, "reduction_factor": 2},
    "hyperband": {"min_resource": 1, "max_resource": 4, "reduction_factor": 2},
}


def flipped(curve: dict[int, float], maximize: bool) -> dict[int, float]:
    """The table's curves are written for maximize; minimize sees them negated (better is lower)."""
    return curve if maximize else {e: -v for e, v in curve.items()}


def run_curves(policy_name: str, maximize: bool, curves: list[dict[int, float]]) -> list:
    """Each curve in turn, epoch by epoch, as the study judges it: its decision (or None), with
    the Optuna study of asha and hyperband told what the study would tell it."""
    import optuna

    from tfrun.tune import policies

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    policy = policies.make(policy_name, DECIDING[policy_name], "score")
    study = optuna.create_study(
        direction="maximize" if maximize else "minimize", study_name="tfrun", pruner=policies.optuna_pruner(policy)
    )
    seen: list[dict[int, float]] = []
    decisions = []
    for curve in (flipped(c, maximize) for c in curves):
        trial, reported, decided = study.ask(), set(), None
        for epoch in sorted(curve):
            so_far = {e: v for e, v in curve.items() if e <= epoch}
            decided = policies.judge(policy, maximize, so_far, seen, trial, reported)
            if decided:
                break
        seen.append(curve)
        decisions.append(decided)
        study.tell(
            trial.number, state=optuna.trial.TrialState.PRUNED if decided else None, values=None if decided else [0.0]
        )
    for frozen in study.get_trials():  # Optuna's pruners only ever saw numbers
        assert all(math.isfinite(v) for v in frozen.intermediate_values.values()), frozen.intermediate_values
        assert all(math.isfinite(v) for v in frozen.system_attrs.values() if isinstance(v, float)), frozen.system_attrs
    return decisions


@pytest.mark.parametrize("maximize", [True, False], ids=["maximize", "minimize"])
@pytest.mark.parametrize("policy", list(DECIDING))
@pytest.mark.parametrize("bad", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_a_value_that_is_not_a_number_stops_the_trial_under_every_policy(
    policy: str, maximize: bool, bad: float
) -> None:
    """A good trial, then one whose second value is not finite: stopped at that epoch by every
    policy (before any comparison, whatever the schedule), and never shown to Optuna."""
    decisions = run_curves(policy, maximize, [{1: 0.5, 2: 0.6, 3: 0.7}, {1: 0.9, 2: bad, 3: 0.9}])
    assert decisions[0] is None, decisions
    assert decisions[1] is not None and decisions[1][0] == 2 and "not a finite number" in decisions[1][1], decisions


@pytest.mark.parametrize("maximize", [True, False], ids=["maximize", "minimize"])
@pytest.mark.parametrize("bad", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_a_trial_that_is_not_a_number_does_not_stop_the_pruning_of_others(maximize: bool, bad: float) -> None:
    """After a diverged trial, a poor trial is still stopped and a good one still runs on."""
    from tfrun.tune import policies

    for name in ("median", "bandit", "truncation"):
        policy = policies.make(name, DECIDING[name], "score")
        peers = [flipped(c, maximize) for c in ({1: bad}, {1: 0.9}, {1: 0.8})]
        poor, good = flipped({1: 0.1}, maximize), flipped({1: 0.95}, maximize)
        assert policies.decide(policy, maximize, poor, peers) is not None, (name, peers)
        assert policies.decide(policy, maximize, good, peers) is None, (name, peers)
    # Optuna's successive halving: the diverged trial never reaches its rungs.
    decisions = run_curves("asha", maximize, [{1: 0.9}, {1: bad}, {1: 0.1}, {1: 0.95}])
    assert decisions[0] is None and decisions[1] is not None and decisions[2] is not None and decisions[3] is None, (
        decisions
    )


def test_asha_judges_each_epoch_of_a_trial_seen_late() -> None:
    """Two trials with the same curve; the follower sees the first only after three epochs (a
    slow poll): Optuna is still told and asked epoch by epoch, so the first trial's rungs hold
    its own epochs' values and the second, no worse, runs on (told three epochs and asked once,
    successive halving took the third epoch's value for every rung, and stopped the second)."""
    import optuna

    from tfrun.tune import policies

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    chosen = policies.make("asha", DECIDING["asha"], "score")
    study = optuna.create_study(direction="maximize", study_name="tfrun", pruner=policies.optuna_pruner(chosen))
    curve = {1: 0.2, 2: 0.4, 3: 0.6}
    late, reported = study.ask(), set()
    assert policies.judge(chosen, True, curve, [], late, reported) is None and reported == {1, 2, 3}
    second, told = study.ask(), set()
    for epoch in (1, 2, 3):
        so_far = {e: v for e, v in curve.items() if e <= epoch}
        assert policies.judge(chosen, True, so_far, [curve], second, told) is None, epoch


@pytest.mark.parametrize("sign", [1, -1], ids=["positive", "negative"])
@pytest.mark.parametrize("maximize", [True, False], ids=["maximize", "minimize"])
def test_bandits_slack_factor_never_stops_the_best(maximize: bool, sign: int) -> None:
    """slack_factor on a metric of either sign, in either direction: the best trial at an epoch
    is inside its own slack; one clearly behind is outside it."""
    from tfrun.tune import policies

    bandit = policies.make("bandit", {"slack_factor": 0.1}, "score")
    values = [sign * v for v in (0.5, 0.52, 0.53, 1.5)]
    best = max(values) if maximize else min(values)
    for value in values:
        peers = [{1: v} for v in values if v != value]
        decided = policies.decide(bandit, maximize, {1: value}, peers)
        assert (decided is None) == (abs(value - best) < 0.2), (value, values, decided)
    # On the other side of zero the bound keeps the same distance: maximize best -0.5 lets down to -0.5 - 0.5*0.1/1.1.
    bound = policies.bandit_bound({"slack_factor": 0.1}, maximize, sign * 0.5)
    assert bound == pytest.approx(sign * 0.5 + (-0.5 / 11 if maximize else 0.05)), bound


def test_the_best_point_is_a_finite_number(tmp_path: Path) -> None:
    from tfrun.tracking.compare import best_point

    points = [
        {"run_dir": str(tmp_path / str(n)), "objective": {"metric": "score", "value": v}}
        for n, v in enumerate([NAN, INF, -INF, 0.5, None, 0.25])
    ]
    (tmp_path / "sweep.json").write_text(json.dumps({"points": points}))  # (Python writes NaN and Infinity)
    assert best_point(tmp_path, True)["run_dir"] == str(tmp_path / "3")
    assert best_point(tmp_path, False)["run_dir"] == str(tmp_path / "5")


def test_every_choice_reads_back_as_itself_in_a_trials_override() -> None:
    """The override a trial gets for a choice is parsed by Hydra into that very value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from tfrun.config import space

    values = [
        "a,b",
        "it's",
        'say "x"',
        "a b",
        "x=y",
        "(x)",
        "[1]",
        "{a:1}",
        "a\\",
        "a\\'b",
        "\\\\'",
        "",
        "1",
        "true",
        "null",
        "nan",
        " lead",
        "a\\,b",
        "sgd",
        "1e-3",
        None,
        True,
        3,
        0.5,
        float("inf"),
    ]
    found = space.Space((space.Dimension("++trainer.x", "choice", choices=tuple(values)),), ())
    parser = OverridesParser.create()
    for value in values:
        override = parser.parse_override(found.overrides({"trainer.x": value})[0])
        assert not override.is_sweep_override() and override.value() == value, (value, override.input_line)
        assert type(override.value()) is type(value), (value, override.input_line)


@pytest.mark.slurm
def test_cancel_of_a_study_on_slurm_submits_no_replacement_trials(tmp_path: Path, job_name: str) -> None:
    """`tfrun cancel SWEEP` while a study on Slurm runs two of its four trials: those are
    cancelled, its follower starts no other trial in their place and ends."""
    (tmp_path / "uneven.py").write_text(UNEVEN)
    proc, _, err = popen_tfrun(
        tmp_path,
        *TUNE,
        "compute=slurm",
        "compute.poll_s=0.5",
        f"compute.job_name={job_name}",
        "entry.script=uneven.py",
        "hydra.sweeper.sampler=grid",
        "hydra.sweeper.max_parallel=2",
        "trainer.secs=choice(60,61,62,63)",
    )
    try:

        def two_submitted() -> bool:
            index = list((tmp_path / "runs").glob("sweep-*/sweep.json"))
            points = read_json(index[0]).get("points", []) if index else []
            return len(points) == 2 and all(
                (
                    read_json(Path(p["run_dir"]) / "status.json")
                    if (Path(p["run_dir"]) / "status.json").exists()
                    else {}
                ).get("job_ids")
                for p in points
            )

        wait_for(two_submitted, 120, "the study's first two trials to be submitted")
        sweep = sweep_of(tmp_path)
        cancelled = run_tfrun(tmp_path, "cancel", sweep.name)
        assert cancelled.returncode == 0, cancelled.stderr
        proc.wait(timeout=90)
    finally:
        stop(proc)
    after = trials(sweep)
    assert sorted(after) == [0, 1], (after, err.read_text()[-3000:])
    assert all(t["status"]["state"] == "CANCELLED" for t in after.values()), after
