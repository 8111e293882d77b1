"""`instructflow ui`: the MLflow UI on the workspace's store, bound to 127.0.0.1."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("ui", help="open the MLflow UI on the workspace's runs and models")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--tracking-uri", help="MLflow store (default: the workspace's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from instructflow import tracking, workspace

    uri = tracking.tracking_uri(args.tracking_uri)
    prefect_api = os.environ.get("PREFECT_API_URL")
    if prefect_api:
        print(f"Prefect UI: {prefect_api.rstrip('/').removesuffix('/api')}")
    if uri.startswith(("http://", "https://")):
        print(f"MLflow UI: {uri} (a tracking server is configured; nothing to start)")
        return 0
    print(f"MLflow UI: http://{args.host}:{args.port}  (store: {uri}; Ctrl-C stops it)")
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
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0
