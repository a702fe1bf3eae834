"""Hydra sweeper ``hydra/sweeper=tfrun``: an asynchronous Optuna study (ask and tell) whose
trials are tfrun runs, with early-termination policies. A thin adapter: the study is
:mod:`tfrun.tune.study`, its settings :mod:`tfrun.tune.tuning`, the space
:mod:`tfrun.config.space`.

No ``from __future__ import annotations`` here: Hydra imports plugin modules without
registering them in sys.modules, and dataclasses then cannot resolve string annotations."""

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class TfrunSweeperConf:
    """``hydra/sweeper=tfrun``: see docs/guides/sweeps.md."""

    _target_: str = "hydra_plugins.tfrun_launcher.tfrun_sweeper.TfrunSweeper"
    sampler: str = "tpe"  # random, grid, tpe, qmc, cmaes, gp
    n_trials: int = 10
    max_parallel: int = 2  # trials in flight
    direction: str = "maximize"
    seed: Optional[int] = None
    n_startup_trials: Optional[int] = None  # tpe, gp, cmaes: random trials first (null: tpe min(10, n_trials // 3))
    storage: Optional[str] = None  # a journal file (default: study.journal in the sweep dir) or a database URL
    policy: str = "none"  # none, median, bandit, truncation, asha, hyperband
    policy_args: Dict[str, Any] = field(default_factory=dict)
    params: Optional[Dict[str, str]] = None  # the search space, as Hydra's sweepers take it (besides the command line)
    # The trials' warm pool: false (a job or process per trial), or allocations, slots, idle_timeout_s
    pool: Any = field(default_factory=lambda: {"allocations": 1, "slots": None, "idle_timeout_s": 60.0})


ConfigStore.instance().store(group="hydra/sweeper", name="tfrun", node=TfrunSweeperConf, provider="tfrun")


class TfrunSweeper(Sweeper):
    """Runs a tuning study over the sweep's overrides; trials go through tfrun's plan and launch code."""

    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from tfrun.config import points

        self.config, self.hydra_context = config, hydra_context
        points.install(hydra_context.config_loader)

    def sweep(self, arguments: List[str]) -> Any:
        from hydra.core.utils import configure_log, setup_globals
        from omegaconf import OmegaConf

        from tfrun.config.space import parse
        from tfrun.errors import ConfigError, TfrunError
        from tfrun.paths import SweepPaths
        from tfrun.plan import planner
        from tfrun.runner.sweeps import SweepOutcome, _remove_empty_sweep
        from tfrun.targets.pool import trials
        from tfrun.tune import study, tuning

        assert self.config is not None and self.hydra_context is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        config, loader = self.config, self.hydra_context.config_loader
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        existed = sweep_dir.exists()

        def plan_trial(number: int, overrides: List[str]) -> Any:
            planned = planner.plan_points(loader, config, [overrides], number)[0]
            planned.write()
            return planned.plan

        try:
            space = parse(arguments, self.settings.get("params"))
            sweeper = OmegaConf.to_container(config.hydra.sweeper, resolve=True)
            found = tuning.settings(sweeper, config.tfrun.get("objective"), sweep_dir)
            if found.sampler == "grid":
                space.grid()
            first = planner.plan_points(loader, config, [space.overrides(space.first())], 0)[
                0
            ].plan  # a bad config: nothing runs
            pool_settings = trials.settings(sweeper.get("pool"), found.max_parallel, first.compute)
            if pool_settings is not None and first.target == "slurm" and not SweepPaths.of(sweep_dir).pool.exists():
                trials.check_allocation(trials.spec(pool_settings, first), str(SweepPaths.of(sweep_dir).pool))
            SweepOutcome.sweep_dir, SweepOutcome.objective, SweepOutcome.maximize = (
                sweep_dir,
                found.objective,
                found.maximize,
            )
            sweep_dir.mkdir(parents=True, exist_ok=True)
            with tuning.follow_alone(found):
                running = study.Study(
                    found,
                    space,
                    plan_trial,
                    trials.TrialPool(pool_settings, sweep_dir) if pool_settings is not None else None,
                )
                tuning.save_invocation(found, [*config.hydra.overrides.hydra, *arguments])
                running.run()
        except ConfigError as exc:
            if not existed and not SweepPaths.of(sweep_dir).index.exists():
                _remove_empty_sweep(sweep_dir)
            SweepOutcome.config_error = exc
            print(f"tfrun: error: {exc}", file=sys.stderr)
            raise SystemExit(2)
        except TfrunError as exc:  # another follower has the study, or a launch failed: one line, exit 1
            print(f"tfrun: error: {exc}", file=sys.stderr)
            raise SystemExit(exc.exit_code)
        except KeyboardInterrupt:
            print(
                f"tfrun: stopped following the study (its Slurm trials go on; local ones were cancelled); "
                f"continue it with: tfrun tune resume {sweep_dir}",
                file=sys.stderr,
            )
            raise SystemExit(130)
        for line in tuning.summary_lines(tuning.summary(found), found.objective):
            print(f"tfrun: {line}", file=sys.stderr)
        return None
