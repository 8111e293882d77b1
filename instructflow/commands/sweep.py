"""`instructflow sweep -c CONFIG --methods lora,ia3,...`: one pipeline run per training
method (data stages Cached after the first), and the measured method table."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def register(sub) -> None:
    from instructflow.cli import DEFAULT_CONFIG

    p = sub.add_parser(
        "sweep", help="train + evaluate once per method; print and log the method table"
    )
    p.add_argument(
        "-c", "--config", default=DEFAULT_CONFIG, metavar="CONFIG", help="YAML config or preset"
    )
    p.add_argument(
        "--methods",
        metavar="A,B,...",
        help="methods to compare (default: sweep.methods of the config, else all of them)",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="config override"
    )
    p.add_argument(
        "--until",
        default="evaluate",
        choices=("train", "evaluate", "register"),
        help="last stage of each run (default: evaluate; register adds every method to the "
        "registry)",
    )
    p.add_argument("--summary-json", metavar="PATH", help="also write the table rows as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from instructflow import cli, runs, sweep, tracking
    from instructflow.config import ConfigError, load_config

    console = cli.make_console()
    config_path = cli.resolve_config(args.config)
    try:
        cfg = load_config(config_path, args.set)
        names = (
            [n.strip() for n in args.methods.split(",") if n.strip()]
            if args.methods
            else sweep.default_names(cfg)
        )
        knobs = sweep.method_overrides(cfg, names)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not cli.use_workspace_prefect_server(console, hide=cli.key_env_names(cfg)):
        return 1

    from mlflow.tracking import MlflowClient

    import mlflow

    tcfg = cfg.tracking
    exp_id = tracking.setup(tcfg.tracking_uri, tcfg.experiment, tcfg.on_unreachable)
    client = MlflowClient()
    stem = Path(config_path).stem if config_path else "defaults"
    parent = client.create_run(
        exp_id,
        run_name=f"sweep-{stem}-{time.strftime('%Y%m%d-%H%M%S')}",
        tags={"instructflow.kind": "sweep", "instructflow.config_file": config_path or ""},
    ).info.run_id
    runs.record_start(parent, None, mlflow.get_tracking_uri())
    client.log_param(parent, "sweep.methods", ",".join(names))
    rows, status, code = [], "FINISHED", 0
    try:
        for i, method in enumerate(knobs, 1):
            name = method["name"]
            console.print(f"[bold]sweep {i}/{len(knobs)}: {name}[/]")
            summary, wall = sweep.run_method(
                config_path,
                args.set,
                method,
                parent,
                args.until,
                echo=lambda line, n=name: console.print(f"  {n} | {line}", markup=False),
            )
            rows.append(sweep.method_row(name, summary, wall))
    except KeyboardInterrupt:
        status, code = "KILLED", 130
    base = sweep.base_row(rows)
    table_rows = ([base] if base else []) + rows
    table = sweep.markdown_table(table_rows)
    try:
        sweep.log_parent(parent, table_rows, table)
    finally:
        if rows and all(r["status"] == "failed" for r in rows):
            status, code = "FAILED", code or 1
        client.set_terminated(parent, status)
        runs.record_end(parent)
    console.print()
    console.print(table, markup=False, highlight=False)
    console.print(f"MLflow sweep run [bold]{parent}[/] (one child run per method)")
    if args.summary_json:
        Path(args.summary_json).write_text(
            json.dumps({"mlflow_run_id": parent, "rows": table_rows}, indent=2, default=str)
        )
    if code == 130:
        print("error: sweep interrupted (run it again: finished runs are Cached)", file=sys.stderr)
    return code
