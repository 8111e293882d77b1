"""`instructflow runs [--reconcile]`: runs of this workspace still recorded as running."""

from __future__ import annotations

import argparse
import time


def register(sub) -> None:
    p = sub.add_parser(
        "runs",
        help="runs recorded as running here; --reconcile closes those whose process is gone",
    )
    p.add_argument(
        "--reconcile",
        action="store_true",
        help="mark runs whose process was killed FAILED (MLflow) and Crashed (Prefect)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from instructflow import prefect_server, runs

    if not os.environ.get("PREFECT_API_URL"):
        url = prefect_server.running_url()
        if url:
            os.environ["PREFECT_API_URL"] = url
    if args.reconcile:
        results = runs.reconcile()
        for r in results:
            what = r.get("error") or f"MLflow {r.get('mlflow')}, Prefect {r.get('prefect')}"
            print(f"{r['mlflow_run_id']}: {what}")
        print(f"{sum('error' not in r for r in results)} stale run(s) closed")
        return 1 if any("error" in r for r in results) else 0
    owners = runs.owners()
    for o in owners:
        age = (time.time() - o.record.get("started", time.time())) / 60
        state = "running" if o.alive else "stale (process gone; --reconcile closes it)"
        print(f"{o.record['mlflow_run_id']}  pid {o.record['pid']}  {age:.0f} min  {state}")
    if not owners:
        print("no runs recorded as running")
    return 0
