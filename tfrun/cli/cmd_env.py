"""``tfrun env list`` / ``tfrun env prune [--older-than DAYS] [--all]``: the environment cache of
deps=pip|conda (tfrun/deps/cache.py)."""

from __future__ import annotations

import argparse
import time

from tfrun import variables
from tfrun.cli import verbs

CACHE_HELP = f"the cache (default: ${variables.ENV_CACHE} or ~/.cache/tfrun/envs)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``env``'s actions and their arguments."""
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = verbs.add_subparser(actions, "list", "every environment: hash, packages, size, last used")
    listing.add_argument("--cache-dir", help=CACHE_HELP)
    prune = verbs.add_subparser(
        actions,
        "prune",
        "remove unfinished builds, and environments unused for DAYS "
        "(or all), except those a queued, running or requeued run uses",
    )
    prune.add_argument("--cache-dir", help=CACHE_HELP)
    prune.add_argument("--older-than", type=float, metavar="DAYS", help="also remove environments unused for DAYS days")
    prune.add_argument("--all", action="store_true", help="remove every environment no run still uses")


def _human(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def _when(stamp: float) -> str:
    days = (time.time() - stamp) / 86400
    ago = f"{days:.0f} d ago" if days >= 1 else f"{days * 24:.0f} h ago" if days * 24 >= 1 else "just now"
    return f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(stamp))} ({ago})"


def run(args: argparse.Namespace) -> int:
    """List or prune the cache."""
    from tfrun.deps import cache

    root = cache.cache_root(args.cache_dir)
    if args.action == "list":
        rows = cache.entries(root)
        print(f"{'KEY':<22} {'KIND':<6} {'SIZE':>9}  {'LAST USED':<28} PACKAGES")
        for row in rows:
            packages = " ".join(row["packages"]) if row["complete"] else "(unfinished build)"
            print(
                f"{row['key']:<22} {row['kind']:<6} {_human(row['size']):>9}  {_when(row['last_used']):<28} {packages}"
            )
        print(f"{len(rows)} environment(s), {_human(sum(r['size'] for r in rows))} in {root}")
        return 0
    from tfrun.runner import control

    older_than, remove_all = getattr(args, "older_than", None), getattr(args, "all", False)
    done = cache.prune(root, older_than, remove_all, in_use=control.in_use)
    for key in done["removed"]:
        print(f"tfrun: removed {key}")
    for key in done["busy"]:
        print(f"tfrun: kept {key}: another process is building or removing it")
    for key in done["in_use"]:
        print(f"tfrun: kept {key}: a run that uses it is queued, running or requeued")
    hint = "" if remove_all or older_than is not None else " (--older-than DAYS or --all remove environments)"
    kept = len(done["kept"]) + len(done["busy"]) + len(done["in_use"])
    print(f"tfrun: removed {len(done['removed'])}, kept {kept} in {root}{hint}")
    return 0
