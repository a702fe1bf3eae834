"""tfrun's schemas (structured configs) as a Hydra config source, built only when a
composition loads one.

Putting every schema into Hydra's ConfigStore builds all of them (``OmegaConf.structured``
of each dataclass) in every process that composes, ``--dry-run`` and ``--help``-style
views included, though a run uses one per group. This source (scheme ``tfrun-schema``)
answers Hydra's listing from tfrun's table of schemas (:mod:`tfrun.config.store`) and
builds a schema when Hydra loads it; the search path plugin below adds it to the search
path of tfrun's app (the one whose configs are ``pkg://tfrun.conf``), and of no other app.

No ``from __future__ import annotations`` here: Hydra imports plugin modules without
registering them in sys.modules, and dataclasses then cannot resolve string annotations."""

from typing import List, Optional

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigResult, ConfigSource
from hydra.plugins.search_path_plugin import SearchPathPlugin

SCHEME = "tfrun-schema"
CONFIGS = "pkg://tfrun.conf"


class TfrunSchemaSource(ConfigSource):
    """``tfrun-schema://``: the schemas of :data:`tfrun.config.store.SCHEMAS`."""

    @staticmethod
    def scheme() -> str:
        return SCHEME

    def load_config(self, config_path: str) -> ConfigResult:
        from tfrun.config import store

        return ConfigResult(
            config=store.schema_node(self._name(config_path)),
            path=self.full_path(),
            provider=self.provider,
            header={"package": None},
        )

    def available(self) -> bool:
        return True

    def is_group(self, config_path: str) -> bool:
        from tfrun.config import store

        return config_path.strip("/") in store.schema_groups()

    def is_config(self, config_path: str) -> bool:
        from tfrun.config import store

        return self._name(config_path) in store.SCHEMAS

    def list(self, config_path: str, results_filter: Optional[ObjectType]) -> List[str]:
        from tfrun.config import store

        found: List[str] = []
        for name in store.schema_children(config_path.strip("/")):
            path = f"{config_path.strip('/')}/{name}".lstrip("/")
            self._list_add_result(files=found, file_path=path, file_name=name, results_filter=results_filter)
        return sorted(set(found))

    @staticmethod
    def _name(config_path: str) -> str:
        path = config_path.strip("/")
        return path[: -len(".yaml")] if path.endswith(".yaml") else path


class TfrunSchemaSearchPath(SearchPathPlugin):
    """Adds ``tfrun-schema://`` to tfrun's own app's search path."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        if any(entry.path == CONFIGS for entry in search_path.get_path()):
            search_path.append("tfrun", f"{SCHEME}://tfrun.config.schema")
