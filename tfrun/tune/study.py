"""An asynchronous tuning study: ask Optuna for a trial, run it as its own run (its own Slurm
job, or a local process), follow every trial in flight with one status refresh per poll
(:func:`tfrun.runner.control.refresh`: one ``sacct`` for all), report each new epoch's
objective to the study, stop the trials the policy prunes, and tell the study how each one
ended. A new trial starts as soon as a slot frees: never in lock-step batches.

The study lives in Optuna's storage (a journal file in the sweep dir by default). Each trial
records its run dir there before it is submitted, so a follower started again on the same
sweep (``tfrun tune resume``) re-follows the trials still running, tells the ones that ended
meanwhile, and asks only for the trials still missing: none is lost or run twice.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tfrun import rundir, targets
from tfrun.config.space import Space
from tfrun.errors import TfrunError
from tfrun.paths import RunPaths, SweepPaths
from tfrun.plan import Plan
from tfrun.runner import control
from tfrun.states import FINAL, RunState
from tfrun.tune import policies
from tfrun.tune.tuning import (
    Settings,
    distributions,
    make_sampler,
    objective_curve,
    open_storage,
)

LOCAL_POLL_S = 0.25


@dataclass
class Live:
    """A trial in flight (or, ``draining``, pruned and not yet ended)."""

    number: int
    run_dir: Path
    reported: set[int] = field(default_factory=set)
    thread: threading.Thread | None = None
    draining: bool = False
    handle: Any = None  # its optuna.trial.Trial: ask()'s, or made once when followed again (that asks the sampler)


def say(text: str) -> None:
    """A line of the study's progress on stderr."""
    print(f"tfrun: {text}", file=sys.stderr, flush=True)


class Study:
    """Runs a study to ``n_trials``: :meth:`run`. ``plan_trial(number, overrides)`` composes,
    plans and writes a trial's run dir (the sweeper's Hydra composition)."""

    def __init__(
        self, found: Settings, space: Space, plan_trial: Callable[[int, list[str]], Plan], pool: Any = None
    ) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.found, self.space, self.plan_trial = found, space, plan_trial
        self.storage = open_storage(found)
        existing = [s.study_name for s in optuna.study.get_all_study_summaries(self.storage)]
        self.resumed = found.study_name in existing
        self.study = optuna.create_study(
            storage=self.storage,
            study_name=found.study_name,
            load_if_exists=True,
            direction=found.direction,
            sampler=make_sampler(found),
            pruner=policies.optuna_pruner(found.policy),
        )
        self.distributions = distributions(space)
        if found.sampler == "grid" and not self.resumed:
            for params in space.grid()[: found.n_trials]:
                self.study.enqueue_trial(params)
        self.live: list[Live] = []
        self._threads: dict[int, threading.Thread] = {}
        self.launched = 0  # trials this follower started
        self.target = ""
        self.poll_s = LOCAL_POLL_S
        self.pool = pool  # a tfrun.targets.pool.trials.TrialPool: the trials run in its slots

    # -- starting trials ---------------------------------------------------------------
    def _started(self) -> int:
        from optuna.trial import TrialState

        return sum(1 for t in self.study.get_trials(deepcopy=False) if t.state != TrialState.WAITING)

    def _more(self) -> bool:
        from optuna.trial import TrialState

        if self.pool is not None and self.pool.stopped:  # the study was cancelled
            return False
        if SweepPaths.of(self.found.sweep_dir).cancel_request.exists():  # tfrun cancel SWEEP: no replacements
            return False
        if self.found.sampler == "grid":
            return bool(self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
        return self._started() < self.found.n_trials

    def _start_next(self) -> None:
        from optuna.trial import TrialState

        from tfrun.errors import ConfigError
        from tfrun.runner.sweeps import SweepOutcome

        trial = self.study.ask(self.distributions)
        overrides = self.space.overrides(trial.params)
        try:
            plan = self.plan_trial(trial.number, overrides)
            trial.set_user_attr("run_dir", plan.run_dir)
            trial.set_user_attr("overrides", overrides)
            self._record_point(plan, overrides, trial.number)
            self._launch(plan, trial.number, overrides[: len(self.space.dimensions)])
        except ConfigError as exc:  # this point cannot run (or Slurm refused it): a failed trial
            self.study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            if not self.launched:
                raise  # the first one: nothing was submitted, the study stops here (exit 2)
            SweepOutcome.failed.append(f"trial {trial.number}")
            say(f"trial {trial.number}: not started: {exc}")
            return
        self.launched += 1
        self.live.append(Live(trial.number, Path(plan.run_dir), handle=trial))
        self._attach_thread(self.live[-1])

    def _record_point(self, plan: Plan, overrides: list[str], number: int) -> None:
        from tfrun.runner.sweeps import record_points, record_study

        if not self.launched:  # (with the first point: a study that plans none leaves no sweep behind)
            record_study(self.found.sweep_dir, self.found.objective, self.found.direction)
        record_points(self.found.sweep_dir, [plan], [overrides], trial=number, state=RunState.PENDING)

    def _launch(self, plan: Plan, number: int, shown: list[str]) -> None:
        self.target = plan.target
        if self.pool is not None:  # its status is a file the pool's coordinator writes: polled often
            self.pool.launch(plan)
            say(f"trial {number}: {self.pool.description()}: {' '.join(shown)}")
            return
        target = targets.get(plan.target)
        if not target.follows_here:  # submitted; followed by this study's polls
            self.poll_s = min(float(plan.compute.get("poll_s", 2.0)), 2.0)
            job = target.submit(plan, SweepPaths.of(self.found.sweep_dir).submitit)
            say(f"trial {number}: job {job}: {' '.join(shown)}")
            return
        thread = threading.Thread(target=_run_local, args=(plan,), name=f"trial-{number}", daemon=True)
        self._threads[number] = thread
        thread.start()
        say(f"trial {number}: started: {' '.join(shown)}")

    def _attach_thread(self, live: Live) -> None:
        live.thread = self._threads.pop(live.number, None)

    # -- following ---------------------------------------------------------------------
    def _reattach(self) -> None:
        """Resume: trials the storage has as running are followed again (or, never
        submitted, submitted now); ones that ended meanwhile are told."""
        from optuna.trial import TrialState

        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            run_dir = trial.user_attrs.get("run_dir")
            if not run_dir:  # asked but never planned: nothing ran; the study forgets it
                self.study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
                continue
            status = rundir.read_status(run_dir)
            live = Live(trial.number, Path(run_dir), reported=set(trial.intermediate_values))
            if not status.get("state"):
                plan = Plan.load(run_dir) if RunPaths.of(run_dir).plan.exists() else None
                if plan is None:
                    plan = self.plan_trial(trial.number, list(trial.user_attrs["overrides"]))
                job = None if targets.followed_here(plan.target) else submitted_job(self.found.sweep_dir, plan)
                if job:
                    say(f"trial {trial.number}: following job {job} (submitted just before the earlier follower ended)")
                else:
                    self._launch(plan, trial.number, [])
                    self._attach_thread(live)
                    say(f"trial {trial.number}: submitted now (the earlier follower ended before it did)")
            elif targets.followed_here(status.get("target")) and status.get("state") not in FINAL:
                rundir.update_status(
                    run_dir,
                    state=RunState.FAILED,
                    ended=time.time(),
                    reason="its tuning study's follower ended while it ran locally",
                )
            else:
                if self.pool is not None and status.get("pool"):  # fed just before the earlier follower ended?
                    self.pool.launch(Plan.load(run_dir))
                say(f"trial {trial.number}: following it again ({status.get('state')})")
            live.draining = RunPaths.of(run_dir).prune.exists()
            self.live.append(live)

    def run(self) -> None:
        """Run the study to its end (every trial asked for has ended)."""
        if self.resumed:
            done = self._started() - len(self.study.get_trials(deepcopy=False, states=(_running(),)))
            say(f"resuming the study in {self.found.sweep_dir}: {done} trial(s) ended already")
            self._reattach()
            self.launched = max(1, len(self.live))  # a resumed study has run before: a bad trial fails alone
        try:
            while True:
                # A pruned trial keeps its slot until it has stopped (its job may still be
                # running, or waiting to): max_parallel counts jobs, not judgements.
                while len(self.live) < self.found.max_parallel and self._more():
                    self._start_next()
                if not self.live:
                    break
                if self.pool is not None:
                    self.pool.poll()
                self._poll()
                if self.live:
                    time.sleep(self.poll_s)
        except KeyboardInterrupt:
            self._interrupted()
            raise
        except TfrunError:
            if self.pool is not None:
                self.pool.stop()  # the study stops here: so do its pool's allocations
            raise
        if self.pool is not None:
            self.pool.close()  # every trial has ended: the pool's allocations end now

    def _interrupted(self) -> None:
        """Ctrl-C: Slurm trials go on (``tfrun tune resume`` follows them again); local ones
        run in this process's threads, so they are cancelled, and told as failed."""
        if self.pool is not None:
            self.pool.interrupted()  # a local pool ends with its follower: its trials are cancelled
        local_pool = self.pool is not None and targets.followed_here(self.target)
        self._cancel(
            [t for t in self.live if local_pool or (t.thread is not None and t.thread.is_alive())],
            "its tuning study's follower was stopped while it ran locally",
        )

    def _cancel(self, trials: list[Live], why: str) -> None:
        """Cancel trials in flight (a Slurm trial's job, a local one's tasks in this process's
        thread) and tell them as failed."""
        from optuna.trial import TrialState

        for live in trials:
            control.cancel(live.run_dir)
            if live.thread is not None:
                live.thread.join(timeout=30)
            if rundir.read_status(live.run_dir).get("state") == RunState.CANCELLED:
                rundir.update_status(live.run_dir, reason=why)
            self.study.tell(live.number, state=TrialState.FAIL, skip_if_finished=True)
            rundir.update_point(self.found.sweep_dir, live.run_dir, state=rundir.read_status(live.run_dir).get("state"))

    def _poll(self) -> None:
        statuses = control.refresh([t.run_dir for t in self.live])
        curves = None
        for live, status in zip(list(self.live), statuses):
            state = status.get("state")
            if state in FINAL and (live.thread is None or not live.thread.is_alive()):
                self._ended(live, status)
                continue
            if live.draining:
                continue
            if curves is None:
                curves = self._curves()
            self._judge(live, curves)

    def _curves(self) -> dict[int, dict[int, float]]:
        """Every trial's objective per epoch: the storage's reports, and the live trials' files."""
        found = {
            t.number: {int(k): v for k, v in t.intermediate_values.items()}
            for t in self.study.get_trials(deepcopy=False)
        }
        for live in self.live:
            found[live.number] = {**found.get(live.number, {}), **objective_curve(live.run_dir, self.found.objective)}
        return found

    def _trial(self, live: Live) -> Any:
        """The trial's ``optuna.trial.Trial``, found by its number through the storage's API."""
        import optuna

        if live.handle is None:
            study_id = self.storage.get_study_id_from_name(self.found.study_name)
            live.handle = optuna.trial.Trial(
                self.study, self.storage.get_trial_id_from_study_id_trial_number(study_id, live.number)
            )
        return live.handle

    def _report(self, live: Live, curve: dict[int, float]) -> None:
        policies.report(self._trial(live), curve, live.reported)

    def _judge(self, live: Live, curves: dict[int, dict[int, float]]) -> None:
        """Tell the study a running trial's new epochs, and stop it if its policy says so."""
        curve = curves.get(live.number, {})
        if not curve:
            return
        peers = [c for n, c in curves.items() if n != live.number]
        decided = policies.judge(self.found.policy, self.found.maximize, curve, peers, self._trial(live), live.reported)
        if decided is not None:
            self._prune(live, *decided, failed=policies.diverged(curve) is not None)

    def _prune(self, live: Live, epoch: int, why: str, failed: bool = False) -> None:
        """Stop a trial for good. One whose objective is not a finite number is told as failed:
        it has no result (the samplers model a pruned trial from its last value)."""
        from optuna.trial import TrialState

        rundir.write_json(
            RunPaths.of(live.run_dir).prune,
            {"policy": self.found.policy.name, "epoch": epoch, "why": why, "time": time.time(), "trial": live.number},
        )
        waiting = rundir.read_status(live.run_dir).get("state") in (RunState.PENDING, RunState.PREEMPTED)
        stop_request(live.run_dir)
        self.study.tell(live.number, state=TrialState.FAIL if failed else TrialState.PRUNED, skip_if_finished=True)
        live.draining = True  # followed (and holding its slot) until it has stopped
        rundir.update_point(self.found.sweep_dir, live.run_dir, state=RunState.PRUNED, pruned_epoch=epoch)
        say(
            f"trial {live.number}: pruned after {epoch} epoch(s) ({self.found.policy.name}: {why})"
            + ("; its job was waiting to run: cancelled" if waiting else "")
        )

    def _ended(self, live: Live, status: dict[str, Any]) -> None:
        from optuna.trial import TrialState

        from tfrun.runner.sweeps import SweepOutcome

        self.live.remove(live)
        state = status.get("state")
        metric = self.found.objective
        curve = objective_curve(live.run_dir, metric)
        if not live.draining:  # (a pruned trial was told already: its storage record is closed)
            self._report(live, curve)  # epochs since the last poll: the policies compare later trials with them
        value = curve[max(curve)] if curve and state == RunState.COMPLETED else None
        why: str | None  # None: a status with no state
        if value is not None and not math.isfinite(value):
            why, value = f"its {metric} is {value}, not a finite number", None  # never the best, never told as one
        else:
            why = status.get("reason") or (f"no {metric} recorded" if state == RunState.COMPLETED else state)
        if state == RunState.PRUNED or live.draining:  # (it may have completed before the stop request came)
            self.study.tell(live.number, state=TrialState.PRUNED, skip_if_finished=True)
            rundir.update_point(
                self.found.sweep_dir,
                live.run_dir,
                state=state,
                pruned_epoch=status.get("pruned_epoch"),
                objective={"metric": metric, "value": value},
            )
            return
        if value is None:
            self.study.tell(live.number, state=TrialState.FAIL, skip_if_finished=True)
            SweepOutcome.failed.append(f"trial {live.number}")
            say(f"trial {live.number}: {state}: {why}")
        else:
            self.study.tell(live.number, value, skip_if_finished=True)
            say(f"trial {live.number}: {state}: {metric}={value:.6g}")
        rundir.update_point(
            self.found.sweep_dir, live.run_dir, state=state, objective={"metric": metric, "value": value}
        )
        if state == RunState.COMPLETED and not curve and not self._objective_recorded():
            self._objective_never_recorded(live)

    def _objective_recorded(self) -> bool:
        """Has any trial of the study recorded the objective (a finite value or not)?"""
        index = rundir.read_json(SweepPaths.of(self.found.sweep_dir).index, {"points": []})
        return any(objective_curve(Path(p["run_dir"]), self.found.objective) for p in index["points"] if "trial" in p)

    def _objective_never_recorded(self, live: Live) -> None:
        """A trial completed without the objective, and no trial has recorded it: a name the
        script does not record (a typo), and every trial would end the same way. The study
        stops here: the trials in flight are cancelled, and the error names what was recorded."""
        from tfrun.errors import ConfigError
        from tfrun.tracking.compare import epoch_series

        recorded = sorted(epoch_series(live.run_dir))
        self._cancel(
            list(self.live), f"its tuning study stopped: no trial records its objective {self.found.objective}"
        )
        self.live.clear()
        metric, where = self.found.objective, RunPaths.of(live.run_dir).metrics
        what = (
            f"it recorded {', '.join(recorded)} ({where}): set tfrun.objective to one of them"
            if recorded
            else f"it recorded no metric at all ({where} has none): a Keras fit records its "
            f"metrics by itself, another script calls tfrun.log_metric(name, value, step)"
        )
        raise ConfigError(
            f"tfrun.objective={metric}: trial {live.number} completed without recording {metric}, and "
            f"no trial of the study has; {what}. The study stopped (its other trials were cancelled)"
        )


def _running() -> Any:
    from optuna.trial import TrialState

    return TrialState.RUNNING


def _run_local(plan: Plan) -> None:
    """A local trial, in a thread of the follower: its tasks' output goes to their logs only."""
    from tfrun import runner

    try:
        with open(os.devnull, "wb") as sink:
            runner.launch(plan, out=sink, report=False, warn=None)
    except Exception as exc:  # the study goes on; the trial is a failed one
        rundir.update_status(
            plan.run_dir,
            run_id=plan.run_id,
            state=RunState.FAILED,
            target="local",
            ended=time.time(),
            reason=f"could not run: {exc}",
        )


def submitted_job(sweep_dir: Path, plan: Plan) -> str | None:
    """A trial Slurm has but its status does not (the follower was killed between sbatch and
    recording the job id): found in submitit's record of what it submitted, and recorded now,
    so that it is followed rather than submitted twice."""
    from tfrun.plan import submitit_compat

    folder = SweepPaths.of(sweep_dir).submitit
    for job, args in submitit_compat.submitted(folder):
        if args and str(args[0]) == plan.run_dir:
            now = time.time()
            rundir.update_status(
                plan.run_dir,
                run_id=plan.run_id,
                state=RunState.PENDING,
                target="slurm",
                submitit_folder=str(folder),
                backend=plan.backend,
                job_ids=[job],
                submitted=now,
                started=now,
                ended=None,
                world_size=len(plan.tasks),
                failed_rank=None,
                reason=None,
            )
            return job
    return None


def stop_request(run_dir: Path) -> None:
    """Ask a pruned trial's tasks to stop (their Keras fit backs up the last epoch and returns),
    with SIGUSR2 through its target (a job that waits in Slurm's queue is cancelled: it has
    nothing to back up). Either way a task that starts after ``prune.json`` was written stops
    at its start (:func:`tfrun.bootstrap.run_task`), so a job that starts in between does not train."""
    import signal

    control.signal(run_dir, signal.SIGUSR2)
