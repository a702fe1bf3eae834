"""Contracts with the private parts of Hydra, OmegaConf, MLflow, submitit and Horovod that tfrun uses.

Each private call lives in one compat module (``tfrun/config/hydra_compat.py``,
``tfrun/tracking/mlflow_compat.py``, ``tfrun/plan/submitit_compat.py``,
``tfrun/backends/horovod_compat.py``); each test here
checks one of them against the installed library and, when it fails, says which upgrade
changed what.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, List

import pytest
from omegaconf import OmegaConf

from tfrun.config import compose, hydra_compat
from tfrun.plan import submitit_compat

HYDRA = f"hydra-core {metadata.version('hydra-core')}"
SUBMITIT = f"submitit {metadata.version('submitit')}"


def broke(library: str, what: str, wrapper: str) -> str:
    return f"{library} changed {what}: update {wrapper} (and this test) for it"


def _parse(lines: list[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(lines)


# --- Hydra ------------------------------------------------------------------------------


def test_search_path_is_the_apps_with_the_config_dir_before_the_schemas(tmp_path: Path) -> None:
    compose.setup()  # Hydra lists its plugins once, when a search path is first made
    path = hydra_compat.search_path(compose.CONFIG_MODULE, str(tmp_path))
    entries = [(e.provider, e.path) for e in path.get_path()]
    providers = [p for p, _ in entries]
    assert ("main", f"pkg://{compose.CONFIG_MODULE}") in entries, broke(
        HYDRA, f"the app's search path ({entries})", "hydra_compat.search_path"
    )
    assert ("command-line", f"file://{tmp_path.resolve()}") in entries, broke(
        HYDRA, "ConfigSearchPath.prepend", "hydra_compat.search_path"
    )
    assert providers.index("command-line") < providers.index("schema"), broke(
        HYDRA, f"the order of the search path ({providers})", "hydra_compat.search_path"
    )


def test_a_hydra_made_and_put_back() -> None:
    from hydra.core.global_hydra import GlobalHydra

    before = GlobalHydra.instance().is_initialized()
    with compose.session() as hydra:
        assert GlobalHydra.instance().is_initialized() and GlobalHydra.instance().hydra is hydra, broke(
            HYDRA, "Hydra.create_main_hydra2", "hydra_compat.create_hydra"
        )
        assert hydra.config_loader is not None
    assert GlobalHydra.instance().is_initialized() == before, broke(
        HYDRA, "hydra.initialize.get_gh_backup/restore_gh_from_backup", "hydra_compat.save/restore_global_hydra"
    )


def test_grid_points_come_in_the_basic_sweepers_order() -> None:
    points = hydra_compat.grid_points(_parse(["a=1,2", "b=x,y", "c=3"]))
    assert points == [["a=1", "b=x", "c=3"], ["a=1", "b=y", "c=3"], ["a=2", "b=x", "c=3"], ["a=2", "b=y", "c=3"]], (
        broke(HYDRA, "BasicSweeper.split_arguments", "hydra_compat.grid_points")
    )


def test_tfrun_basic_is_hydras_basic_sweeper_with_its_batch_check_replaced() -> None:
    import dataclasses

    from hydra.plugins.sweeper import Sweeper
    from hydra_plugins.tfrun_launcher.tfrun_basic_sweeper import (
        BasicSweeper,
        TfrunBasicSweeperConf,
    )

    theirs, conf = hydra_compat.basic_sweeper()
    assert issubclass(theirs, Sweeper) and issubclass(BasicSweeper, theirs), broke(
        HYDRA, "where its basic sweeper lives", "hydra_compat.basic_sweeper"
    )
    assert "validate_batch_is_legal" in inspect.getsource(theirs.sweep), broke(
        HYDRA,
        "BasicSweeper.sweep (it no longer checks each batch with validate_batch_is_legal)",
        "hydra_compat.basic_sweeper and the tfrun_basic sweeper",
    )
    assert list(inspect.signature(theirs.validate_batch_is_legal).parameters) == ["self", "batch"], broke(
        HYDRA, "BasicSweeper.validate_batch_is_legal's signature", "the tfrun_basic sweeper"
    )
    fields = {f.name for f in dataclasses.fields(TfrunBasicSweeperConf)}
    assert issubclass(TfrunBasicSweeperConf, conf) and {"max_batch_size", "params"} <= fields, broke(
        HYDRA, f"BasicSweeperConf's keys ({sorted(fields)})", "hydra_compat.basic_sweeper"
    )


def test_private_parts_of_dependencies_are_used_in_the_compat_modules_only() -> None:
    """hydra._internal and omegaconf._utils in hydra_compat only, submitit's records of its
    submissions in submitit_compat only; Optuna's private attributes (a trial's or a study's
    id, its storage) nowhere: its storage API addresses a trial."""
    repo = Path(__file__).resolve().parents[1]
    hydra, submitit = {"tfrun/config/hydra_compat.py"}, {"tfrun/plan/submitit_compat.py"}
    allowed = {
        "hydra._internal": hydra,
        "omegaconf._utils": hydra,
        "_submitted.pkl": submitit,
        "._trial_id": set(),
        "._study_id": set(),
        "study._storage": set(),
    }
    found = []
    for path in [*(repo / "tfrun").rglob("*.py"), *(repo / "launchers").rglob("*.py")]:
        text, name = path.read_text(), str(path.relative_to(repo))
        found += [f"{name}: {what}" for what, where in allowed.items() if what in text and name not in where]
    assert not found, found


def test_value_overrides_apply_as_hydras_loader_applies_them() -> None:
    cfg = OmegaConf.create({"trainer": {"lr": 0.1}, "entry": {"args": []}})
    hydra_compat.apply_overrides(_parse(["trainer.lr=0.5", "++trainer.new=x", "entry.args=[a,b]"]), cfg)
    assert OmegaConf.to_container(cfg) == {"trainer": {"lr": 0.5, "new": "x"}, "entry": {"args": ["a", "b"]}}, broke(
        HYDRA, "ConfigLoaderImpl._apply_overrides_to_config", "hydra_compat.apply_overrides"
    )


def test_the_held_hydra_node_answers_as_hydras_set_config() -> None:
    """hold_hydra_node stands in for HydraConfig.set_config without its copy."""
    from hydra.core.hydra_config import HydraConfig

    cfg = compose.compose_config(["hydra.job.num=3", "hydra.sweep.subdir=${hydra.job.num}"])
    cfg.hydra.runtime.output_dir = "/tmp/out"
    holder = HydraConfig.instance()
    before = holder.cfg
    try:
        holder.set_config(cfg)
        theirs = OmegaConf.to_container(HydraConfig.get(), resolve=True)
        hydra_compat.hold_hydra_node(cfg)
        ours = OmegaConf.to_container(HydraConfig.get(), resolve=True)
        resolved = OmegaConf.create({"num": "${hydra:job.num}", "out": "${hydra:runtime.output_dir}"})
        assert ours == theirs and OmegaConf.to_container(resolved, resolve=True) == {"num": 3, "out": "/tmp/out"}, (
            broke(HYDRA, "HydraConfig.set_config", "hydra_compat.hold_hydra_node")
        )
    finally:
        holder.cfg = before


def test_override_dirname_is_hydras() -> None:
    name = hydra_compat.overrides_dirname(_parse(["b=2", "a=1", "seed=3"]), "=", ",", ["seed"])
    assert name == "a=1,b=2", broke(HYDRA, "get_overrides_dirname", "hydra_compat.overrides_dirname")


def test_the_loaders_repository_knows_the_config_groups() -> None:
    with compose.session() as hydra:
        repo = hydra_compat.caching_repo(hydra.config_loader, compose.CONFIG_NAME, [])
        assert repo is not None, broke(
            HYDRA,
            "ConfigLoaderImpl._parse_overrides_and_create_caching_repo",
            "hydra_compat.caching_repo (sweeps now compose every point the slow way)",
        )
        assert repo.group_exists("compute") and not repo.group_exists("trainer"), broke(
            HYDRA, "the caching repository's group_exists", "hydra_compat.caching_repo"
        )


def test_sweepers_and_launchers_compose_points_through_load_sweep_config() -> None:
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.plugins.sweeper import Sweeper

    assert list(inspect.signature(ConfigLoaderImpl.load_sweep_config).parameters) == [
        "self",
        "master_config",
        "sweep_overrides",
    ], broke(HYDRA, "ConfigLoaderImpl.load_sweep_config's signature", "hydra_compat.route_sweep_compositions")
    assert "load_sweep_config" in inspect.getsource(Sweeper.validate_batch_is_legal), broke(
        HYDRA, "how a sweeper validates its points", "hydra_compat.route_sweep_compositions"
    )
    with compose.session() as hydra:
        loader = hydra.config_loader
        seen = []
        hydra_compat.route_sweep_compositions(loader, lambda master, overrides: seen.append(overrides))
        loader.load_sweep_config(None, ["a=1"])
        assert seen == [["a=1"]]


def test_the_multirun_config_is_hydras() -> None:
    from hydra.types import RunMode

    with compose.session() as hydra:
        sweep = hydra_compat.compose_multirun_config(
            hydra, compose.CONFIG_NAME, ["++trainer.lr=0.1,0.2", "hydra.job.chdir=false"]
        )
        assert sweep.hydra.mode == RunMode.MULTIRUN, broke(
            HYDRA, "Hydra.compose_config", "hydra_compat.compose_multirun_config"
        )
        assert list(sweep.hydra.overrides.task) == ["++trainer.lr=0.1,0.2"], broke(
            HYDRA, "hydra.overrides.task of a multirun", "hydra_compat.compose_multirun_config"
        )
        assert list(sweep.hydra.overrides.hydra) == ["hydra.job.chdir=false", "hydra.mode=MULTIRUN"]
        assert hydra.get_mode(config_name=compose.CONFIG_NAME, overrides=[]) is None, broke(
            HYDRA, "Hydra.get_mode", "hydra_compat.multirun"
        )
    params = list(inspect.signature(type(hydra).multirun).parameters)
    assert params[:4] == ["self", "config_name", "task_function", "overrides"], broke(
        HYDRA, "Hydra.multirun's signature", "hydra_compat.multirun"
    )


def test_omegaconfs_dumper_quotes_what_would_read_back_as_another_type(tmp_path: Path) -> None:
    dumper = hydra_compat.omegaconf_dumper()
    assert hasattr(dumper, "str_representer"), broke(
        "omegaconf", "get_omega_conf_dumper", "hydra_compat.omegaconf_dumper"
    )
    from tfrun.config.hydra_files import save_yaml

    cfg = OmegaConf.create({"a": "1", "b": "true", "c": "text"})
    save_yaml(cfg, tmp_path / "x.yaml")
    assert OmegaConf.load(tmp_path / "x.yaml") == cfg


@dataclass
class _Trainer:
    lr: float = 0.1
    layers: List[int] = field(default_factory=lambda: [1])
    note: Any = "x"
    maybe: Any = None


def test_typed_keys_are_those_of_a_declared_type() -> None:
    """points.py composes a sweep's points from values alone unless a trainer key is typed
    (OmegaConf checks those): the keys whose node is not an AnyNode."""
    cfg = OmegaConf.structured(_Trainer)
    assert hydra_compat.typed_keys(cfg) == {"lr", "layers"}, broke(
        f"omegaconf {metadata.version('omegaconf')}",
        "DictConfig._get_node or its node types",
        "hydra_compat.typed_keys",
    )


# --- MLflow -------------------------------------------------------------------------------

SYSTEM_METRICS = """
import json, sys
from mlflow import MlflowClient
from tfrun.tracking import mlflow_compat
uri = sys.argv[1]
client = MlflowClient(uri)
run = client.create_run(client.create_experiment("compat"))
monitor = mlflow_compat.start_system_metrics(run.info.run_id, uri, resume=False)
mlflow_compat.stop_system_metrics(monitor)  # at once: only the last sample it takes on stopping
print(json.dumps(sorted(client.get_run(run.info.run_id).data.metrics)))
"""


def test_mlflows_system_metrics_monitor_logs_a_last_sample_for_a_run(tmp_path: Path) -> None:
    """tracking.system_metrics=true: SystemMetricsMonitor for a run id (the client's, not the
    fluent API's active run), and its collect/aggregate/publish for the sample taken at the end."""
    mlflow = f"mlflow {metadata.version('mlflow')}"
    done = subprocess.run(
        [sys.executable, "-c", SYSTEM_METRICS, f"sqlite:///{tmp_path / 'mlflow.db'}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, broke(
        mlflow,
        f"SystemMetricsMonitor's signature or start ({done.stderr[-2000:]})",
        "mlflow_compat.start_system_metrics",
    )
    assert "no last system metrics sample" not in done.stderr, broke(
        mlflow,
        "SystemMetricsMonitor.collect_metrics/aggregate_metrics/publish_metrics",
        "mlflow_compat.stop_system_metrics",
    )
    logged = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(logged), broke(
        mlflow, f"the metrics the monitor logs ({logged})", "mlflow_compat.stop_system_metrics"
    )


# --- submitit ---------------------------------------------------------------------------


def test_the_sbatch_script_is_the_one_submitit_writes(tmp_path: Path) -> None:
    if shutil.which("srun") is None:
        pytest.skip("SlurmExecutor needs srun on PATH (scripts/local-slurm install)")
    import submitit

    params = {
        "job_name": "t",
        "time": 5,
        "nodes": 2,
        "ntasks_per_node": 2,
        "gpus_per_node": 1,
        "signal_delay_s": 60,
        "stderr_to_stdout": True,
        "srun_args": ["--kill-on-bad-exit=1"],
        "setup": ["module load x"],
        "mem": submitit_compat.mem(2),
    }
    executor = submitit.SlurmExecutor(folder=tmp_path, python="python3")
    executor.update_parameters(**params)
    command = f"python3 -u -m {submitit_compat.SUBMIT_MODULE} {tmp_path}"
    theirs = executor._make_submission_file_text(command, "uid")
    ours = submitit_compat.sbatch_script(command, tmp_path, **params)
    assert ours == theirs, broke(
        SUBMITIT, "_make_sbatch_string (or how SlurmExecutor calls it)", "submitit_compat.sbatch_script"
    )
    assert "--mem=2GB" in ours


def test_submitits_job_runner_and_memory_words() -> None:
    assert importlib.util.find_spec(submitit_compat.SUBMIT_MODULE) is not None, broke(
        SUBMITIT, f"the module its jobs run ({submitit_compat.SUBMIT_MODULE})", "submitit_compat.SUBMIT_MODULE"
    )
    assert (submitit_compat.mem(2), submitit_compat.mem(1.5)) == ("2GB", "1536MB"), broke(
        SUBMITIT, "_convert_mem", "submitit_compat.mem"
    )


def test_what_submitit_submitted_is_found_in_its_folder(tmp_path: Path) -> None:
    from submitit.core.utils import DelayedSubmission, JobPaths

    path = JobPaths(tmp_path, job_id="123").submitted_pickle
    DelayedSubmission(print, "/runs/sweep/3").dump(path)
    (tmp_path / "124_submitted.pkl").write_bytes(b"half a pickle")
    assert list(submitit_compat.submitted(tmp_path)) == [("123", ("/runs/sweep/3",))], broke(
        SUBMITIT, f"the record of a submission ({path.name}, DelayedSubmission.args)", "submitit_compat.submitted"
    )


def test_sacct_output_is_read_per_job_and_array_element() -> None:
    text = (
        "JobID|State|NodeList|ExitCode\n12|RUNNING|node1|0:0\n12.batch|RUNNING|node1|0:0\n"
        "13_[0-1]|PENDING|None assigned|0:0\n14_1|COMPLETED|node2|0:0\n"
    )
    info = submitit_compat.read_sacct(text)
    assert {k: v["State"] for k, v in info.items()} == {
        "12": "RUNNING",
        "13_0": "PENDING",
        "13_1": "PENDING",
        "14_1": "COMPLETED",
    }, broke(SUBMITIT, "SlurmInfoWatcher.read_info", "submitit_compat.read_sacct")
    assert info["14_1"]["NodeList"] == "node2"


# --- Horovod ------------------------------------------------------------------------------


def test_the_rendezvous_server_is_horovods_on_the_address_given() -> None:
    """horovod_compat.start_rendezvous sets RendezvousServer's _httpd and _listen_thread,
    which Horovod's own init() and stop() use."""
    pytest.importorskip("horovod", reason="backend=horovod needs scripts/build-horovod")
    from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts
    from horovod.runner.http.http_server import RendezvousServer

    from tfrun.backends import horovod_compat

    horovod_version = f"horovod {metadata.version('horovod')}"
    assert {"_httpd", "_listen_thread"} <= set(vars(RendezvousServer())), broke(
        horovod_version, "RendezvousServer's attributes", "horovod_compat.start_rendezvous"
    )
    server, port = horovod_compat.start_rendezvous("127.0.0.1")
    try:
        assert server._httpd.server_address == ("127.0.0.1", port) and server._listen_thread.is_alive()
        server.init(get_host_assignments(parse_hosts("localhost:2"), 2))
        assert server._httpd.scope_size["global"] == 2, broke(
            horovod_version, "RendezvousServer.init", "horovod_compat.start_rendezvous"
        )
    finally:
        server.stop()
        server._httpd.server_close()
    assert not server._listen_thread.is_alive(), broke(
        horovod_version, "RendezvousServer.stop", "horovod_compat.start_rendezvous"
    )


def test_a_composition_builds_only_the_schemas_it_loads(scratch: Path) -> None:
    """tfrun's schemas reach Hydra through the ``tfrun-schema://`` config source, which builds a
    schema only when composition loads it: a run builds the root's and one per group."""
    from tfrun.config import store

    store._built.cache_clear()
    cfg = compose.compose_config(["compute=slurm", "backend=horovod"])
    assert cfg.compute.partition is None and cfg.backend.name == "horovod"
    built = store._built.cache_info().currsize
    assert built == 1 + len(store.GROUP_SCHEMAS) < len(store.SCHEMAS), broke(
        HYDRA,
        f"the config source plugin API ({built} of {len(store.SCHEMAS)} schemas built)",
        "launchers/hydra_plugins/tfrun_launcher/tfrun_schemas.py",
    )
    with compose.session():
        from hydra.core.global_hydra import GlobalHydra

        path = [(e.provider, e.path) for e in GlobalHydra.instance().config_loader().get_search_path().get_path()]
    assert ("tfrun", "tfrun-schema://tfrun.config.schema") in path, broke(
        HYDRA, f"the search path plugin API ({path})", "tfrun_schemas.TfrunSchemaSearchPath"
    )
