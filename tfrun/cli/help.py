"""``tfrun --help``: what the command does, its verbs, the config groups and their options.

Built without Hydra (the groups' options are the YAML files of tfrun's config dir and of the
user's, ``./conf`` or ``--config-dir``), so it answers as fast as Python starts. The composed
config itself is ``tfrun --cfg job [OVERRIDES]``; every key is in docs/reference/config.md.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tfrun.cli import verbs

# Groups that hold tfrun's schemas or Hydra's settings, never a user's choice.
_HIDDEN_GROUPS = ("schema", "hydra")
_OPTIONS = (
    (
        "--dry-run[=json]",
        "print the plan (every task's command, environment, TF_CONFIG, the sbatch script) and run nothing",
    ),
    ("-m, --multirun", "a sweep: one run per combination of comma-separated values"),
    ("--config-dir DIR, -cd DIR", "your project's config dir (default: ./conf if it exists)"),
    ("--config-name NAME, -cn NAME", "the root config in it (default: config)"),
    ("--cfg job|hydra|all", "print the composed config (Hydra's own flag; also --info, --hydra-help, --resolve)"),
    ("--shell-completion install=bash", 'print the completion script (eval "$(tfrun -sc install=bash)")'),
    ("--version", "tfrun's version"),
)


def _config_dirs(argv: list[str]) -> list[Path]:
    """tfrun's own config dir, then the user's (``--config-dir``, else ./conf)."""
    spec = importlib.util.find_spec("tfrun.conf")
    dirs = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    given = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config-dir", "-cd")), None)
    user = Path(given) if given else Path("conf")
    return dirs + ([user] if user.is_dir() else [])


def groups(argv: list[str]) -> dict[str, list[str]]:
    """Every user-facing config group and its options, from the config dirs."""
    found: dict[str, set[str]] = {}
    for root in _config_dirs(argv):
        for option in root.rglob("*.yaml"):
            group = option.parent.relative_to(root).as_posix()
            if group != "." and group.split("/")[0] not in _HIDDEN_GROUPS:
                found.setdefault(group, set()).add(option.stem)
    return {group: sorted(options) for group, options in sorted(found.items())}


def _defaults(argv: list[str]) -> dict[str, str]:
    """group -> the option tfrun's root config picks."""
    import yaml

    picked: dict[str, str] = {}
    root = _config_dirs(argv)[0] / "config.yaml" if _config_dirs(argv) else None
    if root is None or not root.is_file():
        return picked
    for entry in yaml.safe_load(root.read_text()).get("defaults", []):
        if isinstance(entry, dict):
            for key, value in entry.items():
                picked[str(key).replace("optional ", "")] = str(value)
    return picked


def text(argv: list[str]) -> str:
    """The help text (``argv``: the command line, for the user's config dir)."""
    width = max(len(v.name) for v in verbs.VERBS) + 2
    lines = [
        "tfrun: train TensorFlow/Keras scripts on this machine or on Slurm from a composed config.",
        "",
        "usage: tfrun [--dry-run[=json]] [-m] [OVERRIDES...]   compose a run (with -m, a sweep) and launch it",
        "       tfrun VERB [ARGS...]                          act on runs (tfrun VERB --help: its arguments)",
        "",
        "verbs:",
    ]
    lines += [f"  {v.name:<{width}}{v.summary}" for v in verbs.VERBS]
    lines += [
        f"  {'help':<{width}}this text; `tfrun help VERB` is `tfrun VERB --help`",
        "",
        "config groups (group=option; the default is marked *):",
    ]
    defaults = _defaults(argv)
    found = groups(argv)
    group_width = max((len(g) for g in found), default=0) + 2
    for group, options in found.items():
        shown = ", ".join(o + ("*" if defaults.get(group) == o else "") for o in options)
        lines.append(f"  {group + ':':<{group_width}}{shown}")
    lines += [
        "",
        "overrides: key=value sets any key: entry.script=train.py, trainer.lr=0.01 (the script's parameters),",
        "  compute.nodes=2, ...; `tfrun --cfg job [OVERRIDES]` prints the composed config, "
        "docs/reference/config.md every key.",
        "",
        "options:",
    ]
    option_width = max(len(o) for o, _ in _OPTIONS) + 2
    lines += [f"  {option:<{option_width}}{what}" for option, what in _OPTIONS]
    lines += [
        "",
        "exit codes: 0 the run completed; 1 it failed, timed out or was cancelled; 2 the command line or config was",
        "  wrong and nothing was started; 3 it completed but its export=onnx failed.",
    ]
    return "\n".join(lines)
