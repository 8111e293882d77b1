"""`instructflow schedule`: serve the nightly deployment from one process (no work pool needed).

The deployment's defaults (name, cron, timezone, concurrency) come from
deployments/prefect.yaml, so this and `prefect deploy` register the same thing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

PREFECT_YAML = Path(__file__).resolve().parents[2] / "deployments" / "prefect.yaml"


def nightly_spec(path: Path = PREFECT_YAML) -> dict[str, Any]:
    """The `nightly` deployment of deployments/prefect.yaml."""
    import yaml

    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    return next(d for d in doc["deployments"] if d["name"] == "nightly")


def register(sub) -> None:
    from instructflow.cli import DEFAULT_CONFIG

    p = sub.add_parser("schedule", help="serve the nightly deployment (cron) from this process")
    p.add_argument(
        "-c",
        "--config",
        default=DEFAULT_CONFIG,
        help=f"the config each run uses (default: {DEFAULT_CONFIG})",
    )
    p.add_argument("--cron", help="cron expression (default: deployments/prefect.yaml)")
    p.add_argument("--timezone", help="IANA timezone, e.g. Europe/Berlin (default: the yaml's)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a config value for every run (repeatable)",
    )
    p.add_argument("--name", help="deployment name (default: nightly)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from instructflow.config import ConfigError, load_config

    try:
        load_config(args.config, args.set)  # a broken config fails now, not at 2 am
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    spec = nightly_spec()
    default = spec["schedules"][0]
    cron = args.cron or default["cron"]
    timezone = args.timezone or default.get("timezone") or "UTC"
    try:
        from prefect.schedules import Cron

        schedule = Cron(cron, timezone=timezone)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[-1]
        print(f"error: --cron {cron!r} / --timezone {timezone!r}: {first}", file=sys.stderr)
        return 2

    from prefect.client.schemas.objects import ConcurrencyLimitConfig

    from flows.finetune import finetune

    limit = spec.get("concurrency_limit") or {"limit": 1}
    if not os.environ.get("PREFECT_API_URL"):
        print(
            "note: PREFECT_API_URL is unset, so runs are only visible while this process lives; "
            "start `prefect server start` and export PREFECT_API_URL to keep history and the UI",
            file=sys.stderr,
        )
    finetune.serve(
        name=args.name or spec["name"],
        schedules=[schedule],
        global_limit=ConcurrencyLimitConfig(**limit),
        parameters={
            "config_path": str(Path(args.config).resolve()),
            "overrides": list(args.set),
            "until": None,
        },
        description=spec.get("description"),
        tags=spec.get("tags"),
    )
    return 0
