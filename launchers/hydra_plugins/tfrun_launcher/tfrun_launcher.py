"""Hydra launcher that runs sweep points the tfrun way: planned first, then launched
locally one after another or as Slurm job array(s). A thin adapter: the work is in
:mod:`tfrun.runner.sweeps`.

No ``from __future__ import annotations`` here: Hydra imports plugin modules without
registering them in sys.modules, and dataclasses then cannot resolve string annotations."""

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class TfrunLauncherConf:
    """``hydra/launcher=tfrun``: where each point runs is the point's own ``compute``."""

    _target_: str = "hydra_plugins.tfrun_launcher.tfrun_launcher.TfrunLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="tfrun", node=TfrunLauncherConf, provider="tfrun")


class TfrunLauncher(Launcher):
    """Launches multirun points through tfrun's plan + launch code."""

    def __init__(self) -> None:
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self.task_function: Optional[TaskFunction] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from tfrun.config import points

        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function
        points.install(hydra_context.config_loader)  # the sweeper composes every point before launch(): once each

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from hydra.core.utils import configure_log, setup_globals

        from tfrun.runner.sweeps import launch_points

        assert self.config is not None and self.hydra_context is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        returns: Any = launch_points(
            self.hydra_context, self.config, job_overrides, initial_job_idx, self.task_function
        )
        return returns
