"""The command line under generated input (Hypothesis): whatever the overrides, group options,
sweep syntax, Unicode or very long strings, and whatever a verb's arguments, ``tfrun`` answers
with exit code 0, 1 or 2 and never a Python traceback, and a refused command (2) leaves no run
dir behind. Each case runs the real command in a process of its own."""

from __future__ import annotations

import os
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import run_tfrun
from tfrun.cli.verbs import BY_NAME

pytestmark = pytest.mark.slow

SCRIPT = "import sys\nprint('argv', len(sys.argv))\n"
KEYS = [
    "trainer.lr",
    "trainer.note",
    "trainer.x_y",
    "compute.nodes",
    "compute.tasks_per_node",
    "compute.target",
    "backend.name",
    "entry.flag_style",
    "entry.bool_style",
    "deps.kind",
    "tfrun.objective",
    "compute.foo",
    "trainer",
    "nothere",
    "+deps.env.A",
    "~trainer.lr",
    "hydra.job.chdir",
    "export.opset",
]
GROUPS = {
    "compute": ["local", "slurm", "slurm_gpu", "nope"],
    "backend": ["none", "horovod", "ps", "mwms", "x"],
    "deps": ["none", "pip", "modules", "y"],
    "export": ["none", "onnx"],
    "tracking": ["none", "z"],
}
text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=30)
values = st.one_of(
    text,
    st.text(alphabet=string.printable, max_size=12),
    st.integers(-5, 10**6).map(str),
    st.sampled_from(
        [
            "true",
            "false",
            "null",
            "[1,2]",
            "{a: 1}",
            "'q'",
            '"dq"',
            "1,2,3",
            "range(0,3)",
            "choice(a,b)",
            "interval(0,1)",
            "tag(log,interval(1e-4,1))",
            "${oc.env:HOME}",
            "${nope}",
            "~/x",
            "$(ls)",
            "a;b",
            "-1",
            "1e-3",
            "",
            "???",
        ]
    ),
    st.text(min_size=2000, max_size=5000, alphabet="ab c,='\""),  # very long
)
override = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), values),
    st.sampled_from(sorted(GROUPS)).flatmap(lambda g: st.sampled_from(GROUPS[g]).map(lambda o: f"{g}={o}")),
    text,
)
VERBS = list(BY_NAME)  # every verb, from the one registry
verb_args = st.lists(
    st.one_of(
        text,
        st.sampled_from(
            [
                "--rank",
                "-1",
                "--follow",
                "--sweep",
                "--last",
                "0",
                "x",
                "--metric",
                "--port",
                "70000",
                "list",
                "prune",
                "--all",
                "--older-than",
                "-5",
                "--help",
            ]
        ),
    ),
    max_size=4,
)
CASES = {"dry-run": 0, "run": 0, "verb": 0}  # counted, for a look with -s


def check(tmp_path: Path, result, what: str) -> None:
    assert result.returncode in (0, 1, 2), f"{what}: exit {result.returncode}\n{result.stderr[-2000:]}"
    assert "Traceback (most recent call last)" not in result.stderr + result.stdout, f"{what}:\n{result.stderr[-3000:]}"
    if result.returncode == 2:
        assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("plan.json")), (
            f"{what}: refused (2) but left a run dir"
        )


def _fresh(tmp_path: Path, name: str) -> Path:
    case = tmp_path / f"{name}-{sum(CASES.values())}"
    case.mkdir()
    (case / "script.py").write_text(SCRIPT)
    return case


# 40 dry runs by default (each a process of its own, ~0.65 s): with up to 5 overrides a case,
# every key, group option and value kind is drawn many times over; TFRUN_FUZZ_EXAMPLES=200
# for a deeper search.
@settings(
    max_examples=int(os.environ.get("TFRUN_FUZZ_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(override, max_size=5), st.booleans())
def test_dry_run_with_generated_overrides(tmp_path: Path, overrides: list[str], multirun: bool) -> None:
    case = _fresh(tmp_path, "dry")
    args = ["--dry-run", *(["-m"] if multirun else []), "entry.script=script.py", *overrides]
    check(case, run_tfrun(case, *args, timeout=120), " ".join(args)[:300])
    CASES["dry-run"] += 1


@settings(
    max_examples=int(os.environ.get("TFRUN_FUZZ_RUNS", "20")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.lists(st.builds(lambda k, v: f"trainer.{k}={v}", st.sampled_from(["a", "b_c", "d-e"]), values), max_size=3),
    st.sampled_from([[], ["compute.tasks_per_node=2"], ["-m", "trainer.z=1,2"], ["compute.nodes=0"], ["backend=nope"]]),
)
def test_runs_with_generated_script_parameters(tmp_path: Path, overrides: list[str], extra: list[str]) -> None:
    case = _fresh(tmp_path, "run")
    args = ["entry.script=script.py", *extra, *overrides]
    check(case, run_tfrun(case, *args, timeout=180), " ".join(args)[:300])
    CASES["run"] += 1


@settings(
    max_examples=int(os.environ.get("TFRUN_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.sampled_from(VERBS), verb_args)
def test_verbs_with_generated_arguments(tmp_path: Path, verb: str, args: list[str]) -> None:
    case = _fresh(tmp_path, "verb")
    if verb == "serve":  # a verb that would serve forever: only its refusals are fuzzed here
        args = [*args, "--port", "-3"]
    check(case, run_tfrun(case, verb, *args, timeout=60), f"{verb} {args}"[:300])
    CASES["verb"] += 1
