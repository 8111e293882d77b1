"""`instructflow server status|start|stop`: the workspace's Prefect server (API + UI)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "server",
        help="the workspace's Prefect server (started on first run, reused after)",
        description="The workspace's Prefect server on 127.0.0.1: runs report to it and its UI "
        "shows them. `instructflow run` starts it on first use.",
    )
    p.add_argument(
        "action",
        choices=["status", "start", "stop"],
        nargs="?",
        default="status",
        help="status (default): is it running and where; start: start it now; stop: stop it",
    )
    p.add_argument(
        "--all",
        action="store_true",
        help="status / stop: every Prefect server instructflow started for this user, in any "
        "workspace (deleted ones included)",
    )
    p.add_argument(
        "--idle-s",
        type=float,
        default=None,
        metavar="SECONDS",
        help="start: stop the server after this long unused (no run, no client); 0: never "
        "(default: $INSTRUCTFLOW_PREFECT_IDLE_S, else 3600)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from instructflow import prefect_server as ps
    from instructflow import workspace

    home = workspace.home()
    if args.all:
        return _all(args.action, ps)
    if args.action == "start":
        if args.idle_s is not None:
            os.environ[ps.IDLE_ENV] = f"{args.idle_s:g}"
        url = ps.ensure(home)
        print(f"Prefect server running: API {url}, UI {ps.ui_url(url)}")
        return 0
    if args.action == "stop":
        print("stopped" if ps.stop(home) else "no Prefect server was running for this workspace")
        return 0
    info = ps.state(home)
    if info is None:
        print(f"no Prefect server running for {home} (`instructflow run` starts one)")
        return 1
    up = time.time() - info.get("started", time.time())
    idle = info.get("idle_s")
    stops = f"; stops after {idle:g} s unused" if idle else ""
    print(
        f"Prefect server pid {info['pid']}, up {up / 60:.0f} min: API {info['url']}, "
        f"UI {ps.ui_url(info['url'])}, log {info['log']}{stops}"
    )
    return 0


def _all(action: str, ps) -> int:
    if action == "start":
        print("error: --all goes with status or stop", file=sys.stderr)
        return 2
    servers = ps.stop_all() if action == "stop" else ps.registered()
    verb = "stopped" if action == "stop" else "running"
    for info in servers:
        gone = "" if Path(info["home"]).is_dir() else " (workspace deleted)"
        print(f"{verb}: pid {info['pid']} {info['url']} for {info['home']}{gone}")
    print(f"{len(servers)} Prefect server(s) {verb}")
    return 0
