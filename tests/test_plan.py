"""Pure tests: composing a run and planning it start no process and touch no run dir."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import DIGITS
from tfrun.cli import render
from tfrun.cli.main import main
from tfrun.config.compose import compose_config, normalize_overrides
from tfrun.errors import ConfigError
from tfrun.plan import Plan
from tfrun.plan.build import script_args
from tfrun.plan.planner import compose_plans
from tfrun.task import gpus, identity

TFRUN_VARS = {
    "TFRUN_RUN_ID",
    "TFRUN_RUN_DIR",
    "TFRUN_OUTPUT_DIR",
    "TFRUN_RANK",
    "TFRUN_LOCAL_RANK",
    "TFRUN_NODE_INDEX",
    "TFRUN_WORLD_SIZE",
    "TFRUN_ROLE",
}


def plan_for(*overrides: str) -> Plan:
    """The single plan ``tfrun OVERRIDES`` would run (the CLI's own override rewriting)."""
    plans = compose_plans(normalize_overrides(list(overrides)))
    assert len(plans) == 1
    return plans[0]


# --- trainer keys become flags ------------------------------------------------------


def test_default_run_is_the_digits_example(scratch: Path) -> None:
    plan = plan_for()
    assert plan.script == str(DIGITS)
    assert plan.source_dir == str(scratch)
    assert plan.target == "local" and plan.backend == "none"
    assert [t.argv for t in plan.tasks] == [[str(DIGITS)]]
    assert plan.command[-2:] == ["tfrun.bootstrap", plan.run_dir]


def test_trainer_keys_become_flags_in_order(scratch: Path) -> None:
    plan = plan_for("trainer.lr=0.01", "trainer.batch_size=50")
    assert plan.tasks[0].argv == [str(DIGITS), "--lr", "0.01", "--batch_size", "50"]


def test_flag_style_dashes(scratch: Path) -> None:
    plan = plan_for("entry.flag_style=dashes", "trainer.batch_size=50", "trainer.lr=0.1")
    assert plan.tasks[0].argv[1:] == ["--batch-size", "50", "--lr", "0.1"]


def test_flag_prefix_and_extra_args(scratch: Path) -> None:
    plan = plan_for("entry.flag_prefix=-", "trainer.lr=0.1", "entry.args=[--verbose,x]")
    assert plan.tasks[0].argv[1:] == ["-lr", "0.1", "--verbose", "x"]


def test_script_args_none_and_lists() -> None:
    args = script_args({"resume": None, "layers": [64, 32], "name": "a/b"}, "--", "keep")
    assert args == ["--resume", "--layers", "64", "32", "--name", "a/b"]


def test_bad_flag_style_is_a_config_error(scratch: Path) -> None:
    with pytest.raises(ConfigError, match=r"entry\.flag_style='snake'.*keep, dashes"):
        plan_for("entry.flag_style=snake")


def test_compose_config_keeps_trainer_and_hydra_node(scratch: Path) -> None:
    cfg = compose_config(normalize_overrides(["trainer.lr=0.5", "compute.nodes=2"]))
    assert cfg.trainer.lr == 0.5 and cfg.compute.nodes == 2
    assert "hydra" in cfg and cfg.hydra.run.dir.startswith(str(scratch / "runs"))


# --- sweep points: one composition per choice of group options ---------------------


def _sweep_loader(sweep_dir: Path, *hydra_overrides: str):
    """Hydra's config loader and a multirun master config for tfrun's configs."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.types import RunMode

    from tfrun.config.compose import setup

    setup()
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path("pkg://tfrun.conf"))
    master = loader.load_configuration(
        "config", [f"hydra.sweep.dir={sweep_dir}", *hydra_overrides], run_mode=RunMode.MULTIRUN
    )
    return loader, master


@pytest.mark.parametrize(
    "point",
    [
        ["+trainer.x=3"],
        ["backend=ps", "+trainer.lr=0.1", "compute.tasks_per_node=4"],
        ["compute=slurm", "compute.partition=debug", "++trainer.name=a b"],
        ["++trainer.x=1", "compute=slurm_gpu", "backend=horovod", "deps=pip", "compute.nodes=2"],
        ["compute={nodes: 2}", "+trainer.a=1", "~trainer.a"],
    ],
)
def test_sweep_point_composition_is_hydras(scratch: Path, point: list[str]) -> None:
    from omegaconf import OmegaConf

    from tfrun.config.points import PointComposer

    loader, master = _sweep_loader(scratch / "sweep")
    expected = loader.load_sweep_config(master, point)
    composer = PointComposer(loader)
    got = composer(master, point)
    again = composer(master, point)  # from the cached composition of the same group options
    for config in (got, again):
        assert OmegaConf.to_container(config) == OmegaConf.to_container(expected)
        assert OmegaConf.get_type(config, "compute") is OmegaConf.get_type(expected, "compute")
        assert OmegaConf.is_struct(config) and OmegaConf.is_struct(expected)
    assert OmegaConf.to_container(composer.take(master, point)) == OmegaConf.to_container(expected)
    got.compute.nodes = 7  # points never share nodes with each other or with the cache
    assert again.compute.nodes == expected.compute.nodes
    assert composer(master, point).compute.nodes == expected.compute.nodes


def test_sweep_point_composition_with_a_user_config_dir(scratch: Path) -> None:
    from omegaconf import OmegaConf

    from tfrun.config.points import PointComposer

    (scratch / "conf" / "compute").mkdir(parents=True)
    (scratch / "conf" / "compute" / "mybox.yaml").write_text(
        "defaults:\n  - /schema/compute/local@_here_\n  - _self_\ntasks_per_node: 2\n"
    )
    loader, master = _sweep_loader(scratch / "sweep", f"hydra.searchpath=[file://{scratch / 'conf'}]")
    composer = PointComposer(loader)
    for point in (["compute=mybox", "+trainer.x=1"], ["compute=mybox", "+trainer.x=2"]):
        expected = loader.load_sweep_config(master, point)
        assert OmegaConf.to_container(composer(master, point)) == OmegaConf.to_container(expected)
    assert expected.compute.tasks_per_node == 2 and len(composer.bases) == 1


def test_save_yaml_writes_what_omegaconf_writes(scratch: Path) -> None:
    from omegaconf import OmegaConf

    from tfrun.config.hydra_files import save_yaml

    loader, master = _sweep_loader(scratch / "sweep")
    config = loader.load_sweep_config(
        master, ["compute=slurm", "++trainer.name=a b", "++trainer.v='1e-3'", "++trainer.flag='true'", "+trainer.n=3"]
    )
    for cfg in (config, config.hydra, config.hydra.overrides.task, OmegaConf.create({"s": "ünï", "x": [1, "2"]})):
        save_yaml(cfg, scratch / "ours.yaml")
        OmegaConf.save(cfg, scratch / "omegaconf.yaml")
        assert (scratch / "ours.yaml").read_text() == (scratch / "omegaconf.yaml").read_text()


def test_sweep_point_bad_value_fails_as_in_hydra(scratch: Path) -> None:
    from hydra.errors import ConfigCompositionException

    from tfrun.config.points import PointComposer

    loader, master = _sweep_loader(scratch / "sweep")
    composer = PointComposer(loader)
    composer(master, ["compute.nodes=2"])
    with pytest.raises(ConfigCompositionException) as hydra_error:
        loader.load_sweep_config(master, ["compute.nodes=many"])
    with pytest.raises(ConfigCompositionException) as ours:
        composer(master, ["compute.nodes=many"])
    assert str(ours.value.__cause__) == str(hydra_error.value.__cause__)


@pytest.fixture
def slow_points(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Turns off planning a point from resolved values: every point is composed, as Hydra would."""
    from tfrun.config.points import PointComposer

    return lambda: monkeypatch.setattr(PointComposer, "resolved", lambda self, master, overrides: None)


def _sweep_plans(sweep_dir: Path, overrides: list[str]) -> str:
    plans = compose_plans([*normalize_overrides(overrides), f"hydra.sweep.dir={sweep_dir}"], multirun=True)
    return json.dumps([plan.to_dict() for plan in plans], sort_keys=True)  # NaN == NaN as text


LITERALS = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        [
            "true",
            "False",
            "NULL",
            "inf",
            "-inf",
            "nan",
            "1e-3",
            ".5",
            "1.",
            "007",
            "1_000",
            "a-b",
            "'quoted'",
            "[1,2]",
            "x y",
            "0x10",
            "+3",
            "-0",
            "${trainer.lr}",
            "???",
        ]
    ),
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True),
)


@settings(max_examples=300, deadline=None)
@given(text=LITERALS)
def test_a_literal_reads_as_hydras_parser_reads_it(text: str) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from tfrun.config.points import _NOT_LITERAL, literal

    ours = literal(text)
    if ours is _NOT_LITERAL:
        return
    theirs = OverridesParser.create().parse_override(f"++trainer.x={text}").value()
    assert type(ours) is type(theirs) and repr(ours) == repr(theirs)


@pytest.mark.parametrize(
    "sweep, resolved",
    [
        # every literal kind a grid or a sampler writes, and words Hydra reads otherwise (composed)
        # (Hydra writes the grid's 1_000 as 1000; 007 and a-b are composed)
        (["trainer.seed=1,2", "trainer.v=0,-3,1e-3,.5,inf,nan,true,NULL,abc,007,1_000,a-b", "compute=slurm"], 24 - 4),
        (["trainer.lr=0.1,0.2", "backend=ps", "compute.tasks_per_node=4", "++trainer.extra=x"], 2),
        # a point adds to the trainer the strict way, or run dirs are named by the overrides: composed
        (["trainer.lr=0.1,0.2", "+trainer.n=3"], 0),
        (["trainer.lr=0.1,0.2", "hydra.sweep.subdir=${hydra.job.override_dirname}"], 0),
    ],
)
def test_a_sweep_planned_from_resolved_values_is_the_composed_one(
    scratch: Path, monkeypatch: pytest.MonkeyPatch, slow_points: Callable[[], None], sweep: list[str], resolved: int
) -> None:
    """Points planned from resolved values get exactly the plans that composing each one gives."""
    from tfrun.config.points import PointComposer

    answers: list[object] = []
    real = PointComposer.resolved
    monkeypatch.setattr(PointComposer, "resolved", lambda self, *a: answers.append(real(self, *a)) or answers[-1])
    fast = _sweep_plans(scratch / "sweep", sweep)
    assert sum(a is not None for a in answers) == resolved
    slow_points()
    assert fast == _sweep_plans(scratch / "sweep", sweep)


def test_a_config_that_interpolates_the_trainer_is_composed_per_point(scratch: Path) -> None:
    (scratch / "conf").mkdir()
    (scratch / "conf" / "mine.yaml").write_text(
        "defaults:\n  - config\n  - _self_\ntrainer:\n  lr: 0.1\n  warm: ${trainer.lr}\n"
    )
    plans = compose_plans(
        normalize_overrides(["trainer.lr=0.3,0.2", f"hydra.sweep.dir={scratch / 'sweep'}"]),
        multirun=True,
        config_dir=str(scratch / "conf"),
        config_name="mine",
    )
    assert [plan.tasks[0].argv[1:] for plan in plans] == [
        ["--lr", "0.3", "--warm", "0.3"],
        ["--lr", "0.2", "--warm", "0.2"],
    ]


@pytest.mark.parametrize(
    "sweep",
    [
        ["trainer.seed=3,4", "compute=slurm"],
        # every literal kind (YAML's own words among them), run dirs named without compute
        [
            "trainer.v=0,-3,1e-3,.5,inf,nan,true,NULL,abc,yes,off",
            "compute=slurm",
            "hydra.job.config.override_dirname.exclude_keys=[compute]",
        ],
        [
            "trainer.lr=0.1,0.2",
            "backend=ps",
            "compute.tasks_per_node=4",
            "++trainer.extra=x",
            "hydra.job.config.override_dirname.kv_sep=_",
            "hydra.output_subdir=meta",
        ],
        ["trainer.lr=0.1,0.2", "hydra.output_subdir=null"],
    ],
)
def test_a_planned_point_writes_the_composed_points_hydra_files(
    scratch: Path, monkeypatch: pytest.MonkeyPatch, slow_points: Callable[[], None], sweep: list[str]
) -> None:
    """A point planned from resolved values writes, from those values, the same .hydra files
    (text) as the point composed up front."""
    from tfrun.config.points import PointComposer

    made: list[object] = []
    real = PointComposer.files
    monkeypatch.setattr(PointComposer, "files", lambda self, *a: made.append(real(self, *a)) or made[-1])
    sweep = normalize_overrides(sweep)
    fast = compose_plans([*sweep, f"hydra.sweep.dir={scratch / 'a'}"], multirun=True, write=True)
    assert len(made) == len(fast) > 1  # every point's files from its resolved values
    slow_points()
    compose_plans([*sweep, f"hydra.sweep.dir={scratch / 'b'}"], multirun=True, write=True)
    written = 0
    for point in range(len(fast)):
        for path in sorted((scratch / "b" / str(point)).rglob("*.yaml")):
            theirs = path.read_text().replace(str(scratch / "b"), str(scratch / "a"))
            ours = scratch / "a" / path.relative_to(scratch / "b")
            assert ours.read_text() == theirs, path
            written += 1
    assert written == (0 if "hydra.output_subdir=null" in sweep else 3 * len(fast))
    assert sorted(p.relative_to(scratch / "a") for p in (scratch / "a").rglob("*.yaml")) == sorted(
        p.relative_to(scratch / "b") for p in (scratch / "b").rglob("*.yaml")
    )


# --- tasks, ranks, GPUs -------------------------------------------------------------


def test_nodes_times_tasks_per_node(scratch: Path) -> None:
    plan = plan_for("compute.nodes=2", "compute.tasks_per_node=3")
    ranks = [(t.rank, t.local_rank, t.node_index) for t in plan.tasks]
    assert ranks == [(0, 0, 0), (1, 1, 0), (2, 2, 0), (3, 0, 1), (4, 1, 1), (5, 2, 1)]
    for task in plan.tasks:
        assert task.env["TFRUN_RANK"] == str(task.rank)
        assert task.env["TFRUN_LOCAL_RANK"] == str(task.local_rank)
        assert task.env["TFRUN_NODE_INDEX"] == str(task.node_index)
        assert task.env["TFRUN_WORLD_SIZE"] == "6"
        assert task.role == "worker" and task.runs_script
    assert [p["rank"] for p in plan.request["processes"]] == list(range(6))


@pytest.mark.parametrize(
    "gpus_per_node, tasks, expected",
    [
        (0, 2, [None, None]),
        (2, 2, ["0", "1"]),
        (4, 2, ["0,1", "2,3"]),
        (4, 1, ["0,1,2,3"]),
    ],
)
def test_gpus_per_node_split_per_local_task(scratch: Path, gpus_per_node: int, tasks: int, expected: list) -> None:
    plan = plan_for(f"compute.gpus_per_node={gpus_per_node}", f"compute.tasks_per_node={tasks}")
    assert [t.gpus for t in plan.tasks] == expected


def test_gpus_per_node_must_divide_among_tasks(scratch: Path) -> None:
    with pytest.raises(ConfigError, match=r"compute\.gpus_per_node=3.*tasks_per_node=2"):
        plan_for("compute.gpus_per_node=3", "compute.tasks_per_node=2")


# --- the environment of every task ---------------------------------------------------


def test_every_task_gets_the_tfrun_variables(scratch: Path) -> None:
    plan = plan_for("compute.tasks_per_node=2")
    runs = scratch / "runs"
    assert Path(plan.run_dir).parent == runs  # TFRUN_RUNS_DIR decides where runs go
    assert plan.run_id == Path(plan.run_dir).name
    for task in plan.tasks:
        assert TFRUN_VARS <= set(task.env)
        assert task.env["TFRUN_RUN_DIR"] == plan.run_dir
        assert task.env["TFRUN_RUN_ID"] == plan.run_id
        assert task.env["TFRUN_OUTPUT_DIR"] == os.path.join(plan.run_dir, "outputs") == plan.output_dir
        assert task.env["TFRUN_ROLE"] == "worker"


def test_runs_dir_override_wins_over_environment(scratch: Path) -> None:
    plan = plan_for(f"tfrun.runs_dir={scratch / 'elsewhere'}")
    assert Path(plan.run_dir).parent == scratch / "elsewhere"


def test_deps_env_and_legacy_keras_reach_every_task(scratch: Path) -> None:
    plan = plan_for(
        "+deps.env.MY_FLAG=on", "+deps.env.OMP_NUM_THREADS=2", "backend.legacy_keras=true", "compute.tasks_per_node=2"
    )
    for task in plan.tasks:
        assert task.env["MY_FLAG"] == "on" and task.env["OMP_NUM_THREADS"] == "2"
        assert task.env["TF_USE_LEGACY_KERAS"] == "1"


def test_plan_survives_json_round_trip(scratch: Path) -> None:
    plan = plan_for("compute.tasks_per_node=2", "trainer.lr=0.1")
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_composing_writes_nothing(scratch: Path) -> None:
    plan_for("compute.tasks_per_node=2")
    assert list(scratch.iterdir()) == []


# --- --dry-run=json ------------------------------------------------------------------


def test_dry_run_json_parses_and_holds_the_tasks(scratch: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--dry-run=json", "compute.tasks_per_node=2", "trainer.lr=0.01"])
    assert exit_.value.code == 0
    data = json.loads(capsys.readouterr().out)
    assert [t["rank"] for t in data["tasks"]] == [0, 1]
    assert data["tasks"][1]["argv"] == [str(DIGITS), "--lr", "0.01"]
    assert data["tasks"][1]["env"]["TFRUN_WORLD_SIZE"] == "2"
    assert data["config"]["compute"]["tasks_per_node"] == 2
    assert not (scratch / "runs").exists()


def test_render_text_names_every_task(scratch: Path) -> None:
    text = render.plans_text([plan_for("compute.tasks_per_node=2", "trainer.lr=0.01")])
    assert "task rank 0" in text and "task rank 1" in text and "--lr 0.01" in text


# --- tfrun.gpus.pin ------------------------------------------------------------------


@pytest.mark.parametrize(
    "existing, local_rank, per_task, expected",
    [
        (None, 0, 0, None),  # no GPUs asked: leave CUDA_VISIBLE_DEVICES alone
        ("0,1", 1, 0, None),
        (None, 0, 1, "0"),  # nothing bound: slice by local rank
        (None, 1, 2, "2,3"),
        ("", 1, 1, "1"),
        ("3", 0, 1, "3"),  # the scheduler bound exactly this task's share
        ("2,5", 1, 2, "2,5"),
        ("0,1,2,3", 0, 2, "0,1"),  # whole node visible to every task: take the local slice
        ("0,1,2,3", 1, 2, "2,3"),
        ("4,5,6,7", 3, 1, "7"),
        ("0,1", 2, 1, "0,1"),  # too few devices for this rank: left as is
    ],
)
def test_gpu_pinning(existing: str | None, local_rank: int, per_task: int, expected: str | None) -> None:
    devices, why = gpus.pin(existing, local_rank, per_task)
    assert devices == expected
    assert why


# --- tfrun.identity ------------------------------------------------------------------


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node1", ["node1"]),
        ("a,b", ["a", "b"]),
        ("node[1-3,7],gpu01", ["node1", "node2", "node3", "node7", "gpu01"]),
        ("n[01-03]", ["n01", "n02", "n03"]),
        ("x[8-11]", ["x8", "x9", "x10", "x11"]),
        ("a[09-10],b[1,3]", ["a09", "a10", "b1", "b3"]),
        ("gpu[1-2]-ib", ["gpu1-ib", "gpu2-ib"]),
        ("rack[1-2]n[1,3]", ["rack1n1", "rack1n3", "rack2n1", "rack2n3"]),  # as `scontrol show hostnames`
    ],
)
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert identity.expand_nodelist(nodelist) == hosts


def test_slurm_identity_from_env() -> None:
    env = {
        "SLURM_JOB_NODELIST": "big[1-9]",
        "SLURM_STEP_NODELIST": "node[3-4]",
        "SLURM_NTASKS": "4",
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
    }
    ident = identity.slurm_identity(env)
    assert (ident.rank, ident.local_rank, ident.world_size, ident.local_world_size) == (3, 1, 4, 2)
    assert (ident.node_index, ident.num_nodes, ident.hostnames) == (1, 2, ("node3", "node4"))
    assert ident.hostname == "node4" and ident.launcher == "slurm"


def test_slurm_identity_falls_back_to_job_nodelist() -> None:
    env = {
        "SLURM_JOB_NODELIST": "c1",
        "SLURM_NTASKS": "2",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
    }
    assert identity.slurm_identity(env).hostnames == ("c1",)
    assert identity.detect("slurm", 1, 2, env).world_size == 2


def test_local_identity_from_env() -> None:
    ident = identity.detect("local", 2, 2, {"TFRUN_RANK": "3"})
    assert (ident.rank, ident.local_rank, ident.node_index, ident.world_size) == (3, 1, 1, 4)
    assert identity.detect("local", 2, 2, {}).world_size == 1  # started by hand


# --- Slurm: jobs tfrun may requeue ask for it --------------------------------------------


@pytest.mark.parametrize(
    "overrides, line",
    [
        ([], "#SBATCH --requeue"),
        (["+compute.additional_parameters.no_requeue=true"], "#SBATCH --no-requeue"),
    ],
)
def test_slurm_jobs_ask_to_be_requeueable(scratch: Path, overrides: list[str], line: str) -> None:
    """tfrun requeues jobs itself (time limits, preemptions, hangs); a cluster whose default is
    JobRequeue=0 refuses that for a job that did not ask. A user's own choice wins."""
    sbatch = plan_for("compute=slurm", *overrides).request["sbatch"]
    assert line in sbatch.splitlines(), sbatch
    assert sbatch.count("requeue") == 1, sbatch


# --- the sbatch script, byte for byte -----------------------------------------------------------

GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize(
    "name, overrides",
    [
        (
            "horovod-2x2",
            [
                "compute=slurm",
                "compute.nodes=2",
                "compute.tasks_per_node=2",
                "compute.gpus_per_node=2",
                "backend=horovod",
                "compute.setup=[module load cuda]",
            ],
        ),
        (
            "ps-partition-account",
            [
                "compute=slurm",
                "compute.nodes=2",
                "compute.tasks_per_node=2",
                "backend=ps",
                "compute.partition=gpu",
                "compute.account=proj42",
                "compute.timeout_min=90",
                "compute.max_requeues=1",
            ],
        ),
    ],
)
def test_the_sbatch_script_is_the_golden_one(scratch: Path, name: str, overrides: list[str]) -> None:
    """The exact script a Slurm run submits (plan.json's request, which --dry-run prints and the
    submission writes unchanged: tests/test_slurm.py checks that half). A change to it is a
    change every user's jobs see: regenerate with UPDATE_GOLDEN=1 and read the diff."""
    (scratch / "train.py").write_text("print('hello')\n")
    plan = plan_for("entry.script=train.py", f"hydra.run.dir=runs/{name}", *overrides)
    text = plan.request["sbatch"].replace(str(scratch), "{PROJECT}").replace(plan.python, "{PYTHON}")
    golden = GOLDEN / f"{name}.sbatch"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()
