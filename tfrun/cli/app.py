"""``tfrun [--dry-run] [-m] OVERRIDES``: runs and sweeps composed with Hydra.

A single run is composed once with the configs Hydra's app would use
(:func:`tfrun.plan.planner.plan_run`); ``-m`` runs Hydra's multirun, whose sweeper picks
the points and whose launcher plugin plans and launches them; ``--dry-run`` prints the
plan(s); Hydra's own flags that launch nothing (``--cfg``, ``--info``, ``--hydra-help``)
go to Hydra's app as they would.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tfrun import rundir
from tfrun.cli.output import EXIT_CONFIG, error, reader_gone
from tfrun.errors import ConfigError, TfrunError
from tfrun.paths import SweepPaths
from tfrun.states import OK, RunState


@dataclass
class _Invocation:
    """What main() learned from argv before handing the rest to Hydra."""

    entered_task: bool = False  # Hydra got as far as our task function


_INVOCATION = _Invocation()


def _pop_dry_run(argv: list[str]) -> tuple[str | None, list[str]]:
    mode, rest = None, []
    for arg in argv:
        if arg == "--dry-run":
            mode = "text"
        elif arg.startswith("--dry-run="):
            mode = arg.split("=", 1)[1]
            if mode not in ("text", "json"):
                raise ConfigError.invalid("--dry-run", mode, ("text", "json"))
        else:
            rest.append(arg)
    return mode, rest


def _option_value(argv: list[str], *names: str) -> str | None:
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def with_project_config_dir(argv: list[str]) -> list[str]:
    """Add ./conf as the user's config dir when they did not name one."""
    if _option_value(argv, "--config-dir", "-cd") is None and Path("conf").is_dir():
        return ["--config-dir", str(Path("conf").resolve()), *argv]
    return argv


def overrides_only(argv: list[str]) -> tuple[list[str], bool, str | None, str]:
    """(overrides, multirun, config dir, config name) from argv."""
    overrides, multirun, skip = [], False, False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg in ("--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp"):
            skip = True
        elif not arg.startswith("-"):
            overrides.append(arg)
    name = _option_value(argv, "--config-name", "-cn") or "config"
    return overrides, multirun, _option_value(argv, "--config-dir", "-cd"), name


# Hydra's own flags that launch nothing (config and info views, completion, rerun): with any of these,
# Hydra's app runs the command line as it would. Runs and sweeps compose through tfrun's
# own path (tfrun.plan.planner), which shares the app's search path.
_HYDRA_FLAGS = (
    "--cfg",
    "-c",
    "--info",
    "-i",
    "--hydra-help",
    "--resolve",
    "--package",
    "-p",
    "--experimental-rerun",
    "--shell-completion",
    "-sc",
)
_MULTIRUN_FLAGS = ("-m", "--multirun")


def _has_flag(argv: list[str], flags: tuple[str, ...]) -> bool:
    return any(a in flags or a.split("=", 1)[0] in flags for a in argv)


def _print(text: str) -> None:
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:  # `tfrun --dry-run | head`: the reader has what it wanted
        reader_gone()


def dry_run(argv: list[str], mode: str) -> int:
    """Print the plan(s) ``argv`` would launch."""
    from tfrun.cli import render
    from tfrun.plan.planner import TuningStudy, compose_plans

    overrides, multirun, config_dir, config_name = overrides_only(argv)
    if multirun and _tuning(overrides):
        return _dry_run_study(overrides, config_dir, config_name, mode)
    try:
        plans = compose_plans(overrides, multirun=multirun, config_dir=config_dir, config_name=config_name)
    except TuningStudy:  # the user's config chose hydra/sweeper=tfrun
        return _dry_run_study(overrides, config_dir, config_name, mode)
    _print(render.plans_json(plans, multirun) if mode == "json" else render.plans_text(plans, multirun))
    return 0


def _tuning(overrides: list[str]) -> bool:
    return any(o.replace(" ", "") in ("hydra/sweeper=tfrun", "override hydra/sweeper=tfrun") for o in overrides)


def _dry_run_study(overrides: list[str], config_dir: str | None, config_name: str, mode: str) -> int:
    """``--dry-run -m hydra/sweeper=tfrun``: the study (sampler, space, policy, storage) and the
    plan of its first trial; checked as a run would check it, nothing written."""
    from tfrun.cli import render
    from tfrun.targets.pool import trials
    from tfrun.tune import tuning

    info, plan = tuning.preview(overrides, config_dir, config_name)
    pool = trials.settings(info.get("pool"), info["max_parallel"], plan.compute)
    pool_lines = trials.describe(pool, plan, info["sweep_dir"])
    plan = trials.as_item(pool, plan, info["sweep_dir"])
    if mode == "json":
        spec = trials.spec(pool, plan).to_dict() if pool is not None else None
        _print(
            tuning.dumps(
                {
                    **info,
                    "pool": {"settings": info.get("pool"), "spec": spec, "describe": pool_lines},
                    "example_trial": plan.to_dict(),
                }
            )
        )
    else:
        _print(
            tuning.describe_text(info)
            + "\n"
            + "\n".join("  " + line for line in pool_lines)
            + "\n\nthe first trial's plan (the space's first values):\n"
            + render.plan_text(plan)
        )
    return 0


def launch_plan(plan: Any) -> str:
    """Launch a plan where its compute target says, print the outcome, return the state."""
    from tfrun import runner

    return runner.launch(plan)


def run_single(argv: list[str]) -> int:
    """One run, composed once with the same configs Hydra's app would use."""
    from tfrun import targets
    from tfrun.model import export
    from tfrun.plan.planner import plan_run
    from tfrun.targets import local

    overrides, _, config_dir, config_name = overrides_only(argv)
    local.prestart()  # most single runs are local: their first task starts while we compose
    try:
        planned = plan_run(overrides, config_dir=config_dir, config_name=config_name)
        planned.write()
        plan = planned.plan
        if not targets.followed_here(plan.target):
            local.dismiss_prestarted()  # the tasks start on the scheduler's nodes, not here
        state = launch_plan(plan)
    finally:
        local.dismiss_prestarted()
    if state == RunState.COMPLETED and export.failed(plan.run_dir):
        return export.EXIT_EXPORT_FAILED
    return 0 if state in OK else 1


def run_plan_here(cfg: Any) -> str:
    """Hydra task function body (``--cfg``-style invocations that still run)."""
    from hydra.core.hydra_config import HydraConfig

    from tfrun.config import compose, run_config
    from tfrun.plan.build import build_plan

    run = run_config.from_data(compose.to_run_config(cfg))
    return launch_plan(build_plan(run, HydraConfig.get().runtime.output_dir))


def run_sweep(argv: list[str]) -> int:
    """``tfrun -m``: Hydra's multirun; its sweeper picks the points, the launcher plugin plans
    and launches them (tfrun.runner.sweeps)."""
    from tfrun.cli import live
    from tfrun.config.compose import multirun

    live.install()  # on a terminal, a sweep on Slurm is followed in tfrun watch's live table
    overrides, _, config_dir, config_name = overrides_only(argv)
    if _tuning(overrides):
        from tfrun.tune import tuning

        tuning.remember_invocation(overrides, config_dir, config_name)
    multirun(overrides, _task, config_dir=config_dir, config_name=config_name)
    return sweep_exit_code()


def _task(cfg: Any) -> None:
    _INVOCATION.entered_task = True
    try:
        state = run_plan_here(cfg)
    except TfrunError as exc:
        error(str(exc))
        raise SystemExit(exc.exit_code)
    if state not in OK:
        raise SystemExit(1)


def _hydra_main(argv: list[str]) -> int:
    import hydra

    from tfrun.config.compose import CONFIG_MODULE, CONFIG_NAME, setup

    setup()
    app = hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name=CONFIG_NAME)(_task)
    sys.argv = [sys.argv[0], *argv]
    try:
        app()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
        # Hydra exits 1 for anything it rejects before running our task: bad overrides,
        # unknown options or keys, wrong types. Those are configuration errors.
        return EXIT_CONFIG if code == 1 and not _INVOCATION.entered_task else code
    except BrokenPipeError:  # `tfrun --cfg job | head`
        reader_gone()
    return 0


def sweep_exit_code() -> int:
    """After a multirun: name the failed points; with an objective, the best run too."""
    from tfrun.runner.sweeps import SweepOutcome
    from tfrun.tracking import mlflow_sync
    from tfrun.tracking.compare import best_point, study_objective

    if SweepOutcome.sweep_dir:  # once its points have ended (with compute.wait=false, tfrun status does it later)
        mlflow_sync.finish_sweep_if_ended(SweepOutcome.sweep_dir)
    if SweepOutcome.failed:
        error(f"{len(SweepOutcome.failed)} sweep point(s) did not complete: {', '.join(SweepOutcome.failed)}")
    if SweepOutcome.objective and SweepOutcome.sweep_dir:
        best = best_point(SweepOutcome.sweep_dir, SweepOutcome.maximize)
        if best and not study_objective(SweepOutcome.sweep_dir):  # a study has named its best trial
            print(
                f"tfrun: best run: {best['run_dir']} ({SweepOutcome.objective}={best['objective']['value']:.6g}; "
                f"{' '.join(best['overrides'])})",
                file=sys.stderr,
            )
        # A tuning study tolerates failed trials (they are reported to the sweeper as failed).
        return 0 if best else 1
    return 1 if SweepOutcome.failed else 0


def resume_study(sweep: str) -> int:
    """``tfrun tune resume SWEEP``: follow a tuning study again (its follower was stopped or
    killed): trials still running are followed, ended ones told, missing ones started."""
    from tfrun.config.compose import normalize_overrides
    from tfrun.tune import tuning

    sweep_dir = rundir.find_run(sweep)
    argv, cwd = tuning.resume_argv(sweep_dir)
    SweepPaths.of(sweep_dir).cancel_request.unlink(missing_ok=True)  # resuming is asking for its trials again
    os.chdir(cwd)  # the study's relative paths (entry.script, ./conf) mean what they meant
    return run_sweep(with_project_config_dir(normalize_overrides(argv)))


def _explained(exc: Exception, argv: list[str]) -> ConfigError | None:
    """Hydra's and OmegaConf's composition errors, as the error tfrun prints; None for others."""
    if not type(exc).__module__.startswith(("hydra", "omegaconf")):
        return None
    from tfrun.config.explain import explain

    overrides, _, config_dir, _ = overrides_only(argv)
    return ConfigError(explain(exc, overrides, config_dir))


def main(argv: list[str]) -> int:
    """A run, a sweep, a dry run, or one of Hydra's own views; the exit code."""
    from tfrun.config.compose import normalize_overrides

    try:
        mode, argv = _pop_dry_run(argv)
        argv = with_project_config_dir(normalize_overrides(argv))
        if mode:
            return dry_run(argv, mode)
        if not _has_flag(argv, _HYDRA_FLAGS):
            return run_sweep(argv) if _has_flag(argv, _MULTIRUN_FLAGS) else run_single(argv)
    except TfrunError as exc:
        error(str(exc))
        return exc.exit_code
    except Exception as exc:
        explained = _explained(exc, argv)
        if explained is None:
            raise
        error(str(explained))
        return EXIT_CONFIG
    return _hydra_main(argv)
