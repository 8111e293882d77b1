"""`instructflow ui`: the MLflow UI on the workspace's store and the workspace's Prefect UI,
bound to 127.0.0.1. Stopping it (Ctrl-C or SIGTERM) stops the MLflow UI it started, with all
its worker processes; the Prefect server keeps serving runs (`instructflow server stop`)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "ui", help="the MLflow UI (runs, models) and the Prefect UI (flow runs) of the workspace"
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=5000, help="MLflow UI port (default: 5000)")
    p.add_argument("--tracking-uri", help="MLflow store (default: the workspace's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from instructflow import prefect_server, tracking, workspace

    uri = tracking.tracking_uri(args.tracking_uri)
    prefect_api = os.environ.get("PREFECT_API_URL") or prefect_server.ensure()
    print(f"Prefect UI: {prefect_server.ui_url(prefect_api)}  (flow runs, task runs, logs)")
    if uri.startswith(("http://", "https://")):
        print(f"MLflow UI: {uri} (a tracking server is configured; nothing to start)")
        for name, url in _experiment_links(uri, uri):
            print(f"  {name}: {url}")
        return 0
    print(f"MLflow UI: http://{args.host}:{args.port}  (store: {uri}; Ctrl-C stops it)")
    for name, url in _experiment_links(uri, f"http://{args.host}:{args.port}"):
        print(f"  {name}: {url}")
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [
        str(mlflow_bin) if mlflow_bin.exists() else "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--artifacts-destination",
        str(workspace.mlflow_artifact_root()),
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--workers",
        "1",
    ]
    # Its own process group: MLflow's UI runs worker processes, and they must stop with it.
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (the CLI turns it into the same)
        return 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _experiment_links(uri: str, base: str) -> list[tuple[str, str]]:
    """Each experiment's runs page in the "Model training" view with its key columns: MLflow
    3's own start page is its GenAI overview (instructflow.mlflow_view)."""
    from instructflow import mlflow_view

    if uri.startswith("sqlite:///"):
        # Read straight from the store: an MLflow client here would start MLflow's background
        # threads in this process, which then outlive Ctrl-C.
        import sqlite3

        db = Path(uri.removeprefix("sqlite:///"))
        if not db.is_file():
            return []  # no runs yet
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
                rows = con.execute(
                    "SELECT experiment_id, name FROM experiments"
                    " WHERE lifecycle_stage = 'active' ORDER BY experiment_id"
                ).fetchall()
        except sqlite3.Error:  # a store MLflow cannot read is the UI's to report
            return []
        experiments = [(str(i), name) for i, name in rows]
    else:
        from mlflow.tracking import MlflowClient

        try:
            experiments = [
                (e.experiment_id, e.name) for e in MlflowClient(uri).search_experiments()
            ]
        except Exception:
            return []
    return [
        (name, mlflow_view.experiment_url(base, exp_id))
        for exp_id, name in experiments
        if name != "Default"
    ]
