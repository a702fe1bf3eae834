"""Script parameters reach the script as they were given: every ``trainer`` value is one argv
entry, byte for byte, whatever it holds (blanks, quotes, ``$(...)``, ``;``, a newline,
non-ASCII); never through a shell. Booleans are switches. Locally and on Slurm."""

from __future__ import annotations

import json
import shlex
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import read_json, run_dir_from, run_tfrun
from tfrun.config import overrides
from tfrun.config.compose import compose_config, normalize_overrides

# key -> the value as typed on a command line (one shell word each) and as the script must see it
VALUES = {
    "note": "baseline run",
    "path": "/data/my runs/x",
    "quotes": 'it\'s "quoted"',
    "subst": "$(touch PWNED)",
    "backticks": "`touch PWNED2`",
    "semi": "a;b && touch PWNED3",
    "newline": "line1\nline2",
    "unicode": "héllo ünïcode 🚀",
    "json": '{"a": [1, 2]}',
}
ARGV_DUMP = """\
import json, os, sys
with open(os.path.join(os.environ["TFRUN_OUTPUT_DIR"], "argv-rank" + os.environ["TFRUN_RANK"] + ".json"), "w") as f:
    json.dump(sys.argv[1:], f)
"""


def typed(key: str, value: str) -> str:
    """How a person passes it: JSON-like values need Hydra's quotes (else they are a mapping)."""
    return f"trainer.{key}={overrides.quote(value) if key == 'json' else value}"


def expected_argv() -> list[str]:
    return [w for key, value in VALUES.items() for w in (f"--{key}", value)]


def check_run(tmp_path: Path, *extra: str) -> Path:
    (tmp_path / "dump.py").write_text(ARGV_DUMP)
    result = run_tfrun(tmp_path, *extra, "entry.script=dump.py", *(typed(k, v) for k, v in VALUES.items()), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = run_dir_from(result.stderr)
    for rank_file in sorted((run_dir / "outputs").glob("argv-rank*.json")):
        assert read_json(rank_file) == expected_argv(), rank_file
    assert not list(tmp_path.rglob("PWNED*")), "a value was run as a command"
    return run_dir


def test_values_reach_a_local_script_byte_for_byte(tmp_path: Path) -> None:
    run_dir = check_run(tmp_path, "compute.tasks_per_node=2")
    assert len(list((run_dir / "outputs").glob("argv-rank*.json"))) == 2


@pytest.mark.slurm
@pytest.mark.slow
def test_values_reach_a_slurm_script_byte_for_byte(tmp_path: Path) -> None:
    run_dir = check_run(tmp_path, "compute=slurm", "compute.nodes=2")
    assert len(list((run_dir / "outputs").glob("argv-rank*.json"))) == 2


def test_dry_run_shows_the_command_shell_quoted(tmp_path: Path) -> None:
    """The printed argv, pasted into a shell, gives the script the same argv."""
    (tmp_path / "dump.py").write_text(ARGV_DUMP)
    result = run_tfrun(tmp_path, "--dry-run", "entry.script=dump.py", *(typed(k, v) for k, v in VALUES.items()))
    assert result.returncode == 0, result.stderr
    shown = result.stdout.split("    argv:    ", 1)[1].split("\n    env:", 1)[0]
    assert shlex.split(shown)[1:] == expected_argv()


def test_booleans_are_switches_unless_asked_for_values(tmp_path: Path) -> None:
    def argv(*extra: str) -> list[str]:
        result = run_tfrun(
            tmp_path, "--dry-run=json", "trainer.verbose=true", "trainer.shuffle=false", "trainer.text='true'", *extra
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)["tasks"][0]["argv"][1:]

    # store_true style: --verbose present, --shuffle absent; the string 'true' stays a value
    assert argv() == ["--verbose", "--text", "true"]
    assert argv("entry.bool_style=value") == ["--verbose", "True", "--shuffle", "False", "--text", "true"]


def test_a_nul_character_is_refused(scratch: Path) -> None:
    from tfrun.errors import ConfigError
    from tfrun.plan.planner import compose_plans

    with pytest.raises(ConfigError, match=r"trainer.x='a\\x00b' is not valid: text without NUL"):
        compose_plans(normalize_overrides([f"trainer.x={overrides.quote('a' + chr(0) + 'b')}"]))


# 100 examples (~0.23 s each: a full Hydra compose): both alphabets, empty and 40-char texts,
# quotes, backslashes, `${`, Unicode are all drawn many times over (was 150: suite time).
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=40)
    | st.text(alphabet=string.printable + "\\'\"${}", max_size=40)
)
def test_quote_reads_back_as_the_same_text_through_hydra(text: str) -> None:
    """Any text, quoted for Hydra's grammar, composes to exactly that text."""
    cfg = compose_config(normalize_overrides([f"trainer.v={overrides.quote(text)}"]))
    assert cfg.trainer.v == text
