"""Hydra sweeper ``hydra/sweeper=tfrun_basic``, tfrun's default: Hydra's basic sweeper (grids
and lists, ``max_batch_size``) whose check of each batch before its launch does not compose a
point that tfrun plans from resolved values.

Hydra's basic sweeper composes every point of a batch only to see that it composes, and
throws the result away; a point that differs from its base only in plain trainer values
(:meth:`tfrun.config.points.PointComposer.resolved`) composes if its base does, so only the
base is composed (once). Everything else is Hydra's ``BasicSweeper`` unchanged;
``hydra/sweeper=basic`` is Hydra's own.

No ``from __future__ import annotations`` here: Hydra imports plugin modules without
registering them in sys.modules, and dataclasses then cannot resolve string annotations."""

from dataclasses import dataclass
from typing import Sequence

from hydra.core.config_store import ConfigStore

from tfrun.config import hydra_compat

HydraBasicSweeper, BasicSweeperConf = hydra_compat.basic_sweeper()


@dataclass
class TfrunBasicSweeperConf(BasicSweeperConf):
    """``hydra/sweeper=tfrun_basic``: the keys of Hydra's basic sweeper."""

    _target_: str = "hydra_plugins.tfrun_launcher.tfrun_basic_sweeper.BasicSweeper"


ConfigStore.instance().store(group="hydra/sweeper", name="tfrun_basic", node=TfrunBasicSweeperConf, provider="tfrun")


class BasicSweeper(HydraBasicSweeper):
    """Hydra's basic sweeper; each point of a batch is checked by tfrun's point composer."""

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        from tfrun.config import compose, points

        assert self.hydra_context is not None and self.config is not None
        composer = points.install(self.hydra_context.config_loader)
        for overrides in batch:
            # As the launcher will plan it: trainer keys are add-or-set (compose.normalize_overrides).
            composer.check(self.config, compose.normalize_overrides(list(overrides)))
