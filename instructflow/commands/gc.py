"""`instructflow gc [--remove]`: list (or delete) leftover temp dirs and quarantined artifacts.

What counts as a leftover, and where it is looked for: instructflow.housekeeping.
"""

from __future__ import annotations

import argparse
import math
import sys


def register(sub) -> None:
    p = sub.add_parser(
        "gc", help="list (--remove: delete) temp dirs of killed runs and corrupt artifacts"
    )
    p.add_argument("--remove", action="store_true", help="delete them and print what was freed")
    p.add_argument(
        "--older-than",
        type=_hours,
        default=24.0,
        metavar="HOURS",
        help="a .tmp-* dir counts when untouched this long (default 24; a younger one may "
        "belong to a running process)",
    )
    p.set_defaults(func=run)


def _hours(text: str) -> float:
    try:
        hours = float(text)
    except ValueError:
        hours = math.nan
    if not (math.isfinite(hours) and hours >= 0):
        raise argparse.ArgumentTypeError(f"expected hours >= 0, got {text!r}")
    return hours


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def human_age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86_400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86_400:.1f} d"


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from instructflow import housekeeping, runs, workspace
    from instructflow.user_cache import cache_root

    console = Console()
    if not console.is_terminal:
        # A pipe or log: whole lines, so a path stays greppable.
        console = Console(soft_wrap=True, width=200)
    home, cache = workspace.home(), cache_root()
    found = housekeeping.leftovers(home, cache, older_than_s=args.older_than * 3600)
    live = runs.live(home)
    if live:
        pids = ", ".join(str(o.record.get("pid")) for o in live)
        console.print(
            f"{len(live)} run(s) of this workspace still running (pid {pids}): temp dirs "
            "changed since they started are theirs and are kept"
        )
    if not found:
        console.print(
            f"no leftovers (looked in {home / 'artifacts'} and {cache}; .tmp-* dirs count "
            f"after {args.older_than:g} h)"
        )
        return 0
    table = Table(title="leftovers")
    table.add_column("path", overflow="fold")
    table.add_column("size", no_wrap=True)  # figures stay whole however narrow the console
    table.add_column("age", no_wrap=True)
    table.add_column("why", overflow="fold")
    for item in found:
        table.add_row(str(item.path), human_bytes(item.bytes), human_age(item.age_s), item.reason)
    console.print(table)
    total = sum(item.bytes for item in found)
    if not args.remove:
        console.print(
            f"{len(found)} leftover(s), {human_bytes(total)} ({total} bytes); "
            "`instructflow gc --remove` deletes them"
        )
        return 0
    freed = housekeeping.remove(found)
    stuck = [item for item in found if item.path.exists()]
    console.print(
        f"removed {len(found) - len(stuck)} leftover(s), freed {human_bytes(freed)} ({freed} bytes)"
    )
    if stuck:
        paths = ", ".join(str(item.path) for item in stuck)
        print(f"error: could not remove {len(stuck)}: {paths}", file=sys.stderr)
        return 1
    return 0
