"""mlflow/server.sh: a real tracking server (sqlite, and PostgreSQL in CI) that runs log to."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "mlflow" / "server.sh"
PG_ENV = "INSTRUCTFLOW_TEST_POSTGRES_URI"

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path, log: Path, *args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
        "INSTRUCTFLOW_HOME": str(home),
        "MLFLOW": str(Path(sys.executable).with_name("mlflow")),
        "MLFLOW_WORKERS": "1",
    }
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), "--port", str(port), *args],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(proc)
    raise AssertionError(f"server did not come up: {log.read_text()[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except ProcessLookupError:  # the group is already gone (the test stopped it itself)
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def run_against(url: str, data: Path) -> str:
    """A real pipeline run (download only) tracked on the server; returns its MLflow run id."""
    import mlflow
    from flows.run import run_finetune

    try:
        summary = run_finetune(
            None,
            [f"data.source={data}", f"tracking.tracking_uri={url}", "tracking.experiment=team"],
            until="download",
        )
    finally:
        mlflow.set_tracking_uri(None)
    return summary["mlflow_run_id"]


def check_run_read_back(url: str, run_id: str, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    figures = json.loads(
        Path(client.download_artifacts(run_id, "download/figures.json", str(tmp_path))).read_text()
    )
    assert figures["files"] == 1
    assert run.data.params["data.source"].endswith("d.jsonl")
    # The artifact went through the server's proxy and comes back intact.
    local = client.download_artifacts(run_id, "download/source.json", str(tmp_path))
    assert json.loads(Path(local).read_text())["kind"] == "local"


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"instruction": "a", "input": "", "output": "b"}) + "\n")
    return path


def test_server_on_workspace_sqlite_store(home, data, tmp_path):
    proc, url = start_server(home, tmp_path / "server.log")
    try:
        run_id = run_against(url, data)
        check_run_read_back(url, run_id, tmp_path)
    finally:
        stop(proc)
    # Default backend = the workspace's own sqlite store: the run is in mlflow.db.
    from mlflow.tracking import MlflowClient

    local = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    assert local.get_run(run_id).data.tags["instructflow.digest.download"]
    assert (home / "mlartifacts").is_dir()
    assert "127.0.0.1" in (tmp_path / "server.log").read_text()


def test_server_on_postgresql(home, data, tmp_path):
    uri = os.environ.get(PG_ENV)
    if not uri:
        pytest.skip(f"{PG_ENV} unset: source .ci/services.sh to start a PostgreSQL (CI does)")
    artifacts = tmp_path / "objects"
    proc, url = start_server(
        home,
        tmp_path / "server.log",
        "--backend-store-uri",
        uri,
        "--artifacts-destination",
        str(artifacts),
    )
    try:
        run_id = run_against(url, data)
        check_run_read_back(url, run_id, tmp_path)
    finally:
        stop(proc)
    assert not (home / "mlflow.db").exists()
    assert list(artifacts.rglob("source.json"))
    # The run is really in PostgreSQL.
    import psycopg

    with psycopg.connect(uri) as conn, conn.cursor() as cur:
        cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,))
        assert cur.fetchone() == ("FINISHED",)


def test_compare_and_ui_on_two_real_runs(home, tmp_path, capsys):
    from flows.run import run_finetune
    from instructflow.cli import main

    a = run_finetune(None, ["data.demo_rows=30"], until="validate")["mlflow_run_id"]
    b = run_finetune(None, ["data.demo_rows=40"], until="validate")["mlflow_run_id"]
    capsys.readouterr()
    assert main(["compare", a, b]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "data.demo_rows" in ln)
    assert "30" in line and "40" in line
    rows = next(ln for ln in out.splitlines() if "validate/rows_in" in ln)
    assert "30" in rows and "40" in rows and "+10" in rows and "+33.3%" in rows
    assert "split.seed" not in out  # equal params are not listed
    assert main(["compare", a, "no-such-run"]) == 1
    assert "not found" in capsys.readouterr().err

    port = free_port()
    log = tmp_path / "ui.log"
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("instructflow")), "ui", "--port", str(port)],
        env={
            **{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
            "INSTRUCTFLOW_HOME": str(home),
            "PREFECT_API_URL": "http://x:1/api",
        },
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    got = None
    try:
        deadline = time.time() + 60
        while time.time() < deadline and (got is None or got.status_code != 200):
            time.sleep(0.5)
            try:
                got = httpx.get(f"{url}/api/2.0/mlflow/runs/get", params={"run_id": a}, timeout=2)
            except httpx.HTTPError:
                pass
        assert got is not None, log.read_text()[-2000:]
        assert got.json()["run"]["info"]["run_id"] == a
        # Stopped by PID (not its process group), it stops the MLflow UI it started.
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        deadline = time.time() + 20
        while time.time() < deadline and _listening(port):
            time.sleep(0.5)
        assert not _listening(port), "the MLflow UI outlived `instructflow ui`"
    finally:
        stop(proc)
    assert "Prefect UI: http://x:1" in log.read_text()


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
