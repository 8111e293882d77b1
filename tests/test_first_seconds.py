"""kill -9 of a workspace's first run in its first seconds (while the MLflow store or the
Prefect server is being made) leaves the workspace usable: the next run completes, its flow
run is not left Running, and one Prefect server serves the workspace."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _cmd(home: Path, marker: str, summary: Path) -> list[str]:
    cmd = [sys.executable, "-m", "instructflow.cli", "--home", str(home), "run", "--plain"]
    cmd += ["--until", "validate", "--summary-json", str(summary)]
    # The marker names this test's flow runs among the session server's.
    return [*cmd, "--set", "data.demo_rows=40", "--set", f"tracking.experiment={marker}"]


def _env(prefect_api: bool) -> dict[str, str]:
    env = {**os.environ}
    for var in [v for v in env if v.startswith(("PREFECT_", "MLFLOW_"))]:
        if not (prefect_api and var == "PREFECT_API_URL"):
            env.pop(var)
    return env


def _kill_when(proc: subprocess.Popen, seen, after_s: float, timeout_s: float = 120) -> None:
    """SIGKILL the run's whole process group `after_s` after `seen()` first holds."""
    deadline = time.monotonic() + timeout_s
    while not seen():
        assert proc.poll() is None, "the run ended before the kill point"
        assert time.monotonic() < deadline, "the kill point never came"
        time.sleep(0.01)
    time.sleep(after_s)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _running_flow_runs(marker: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )

    running = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["RUNNING"])))
    with get_client(sync_client=True) as client:
        flows = client.read_flow_runs(flow_run_filter=running)
    return [str(f.id) for f in flows if marker in json.dumps(f.parameters)]


def _store_file(home: Path):
    """A test of whether the MLflow store (or its temporary build) exists yet."""

    def seen() -> bool:
        return any(not p.name.endswith(".lock") for p in home.glob("*mlflow.db*"))

    return seen


@pytest.mark.parametrize("after_s", [0.0, 0.7, 2.0])
def test_a_kill_while_the_mlflow_store_is_made_leaves_the_workspace_usable(tmp_path, after_s):
    home, marker = tmp_path / "home", f"first-seconds-{uuid.uuid4().hex[:8]}"
    killed = subprocess.Popen(
        _cmd(home, marker, tmp_path / "killed.json"),
        cwd=ROOT,
        env=_env(prefect_api=True),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    _kill_when(killed, _store_file(home), after_s)
    again = subprocess.run(
        _cmd(home, marker, tmp_path / "again.json"), cwd=ROOT, env=_env(prefect_api=True),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    summary = json.loads((tmp_path / "again.json").read_text())
    assert summary["stages"]["validate"]["state"] == "Completed"
    assert _running_flow_runs(marker) == []  # the killed run's flow run was closed
    assert not list((home / "runs").glob("*.json"))

    from mlflow.tracking import MlflowClient

    store = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    experiment = store.get_experiment_by_name(marker)
    assert [r.info.status for r in store.search_runs([experiment.experiment_id])] in (
        ["FINISHED"],
        ["FINISHED", "FAILED"],  # killed after its MLflow run started: closed FAILED
    )


def _half_made_mlflow_store(folder: Path) -> str:
    """A sqlite MLflow store killed mid-migration, as before the fix, that MLflow then fails
    on. Where the kill lands depends on the machine's speed: earlier and later kills are
    tried (each on a fresh store) until one leaves the store broken."""
    use = "from mlflow.tracking import MlflowClient; MlflowClient('{}').search_experiments()"
    for attempt, after_s in enumerate((0.3, 0.8, 1.5, 0.1, 2.5, 0.5, 4.0, 0.2)):
        db = folder / f"try{attempt}" / "mlflow.db"
        db.parent.mkdir()
        uri = f"sqlite:///{db}"
        make = (
            "from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as S;"
            f"S('{uri}', '{db.parent.as_uri()}')"
        )
        proc = subprocess.Popen([sys.executable, "-c", make], start_new_session=True)
        try:
            _kill_when(proc, db.exists, after_s)
        except (AssertionError, ProcessLookupError):  # the store was done before the kill
            continue
        # What every later run met (in another process: MLflow keeps its engines per URI).
        cmd = [sys.executable, "-c", use.format(uri)]
        broken = subprocess.run(cmd, capture_output=True, text=True)
        if broken.returncode != 0 and "OperationalError" in broken.stderr:
            return uri
    raise AssertionError("no kill point left the MLflow store half-made")


def test_a_store_mlflow_left_half_made_is_rebuilt(tmp_path):
    from mlflow.tracking import MlflowClient

    from instructflow import workspace

    uri = _half_made_mlflow_store(tmp_path)
    workspace.ensure_mlflow_store(uri)
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("after"))
    assert client.get_run(run.info.run_id).info.status == "RUNNING"


def _prefect_servers(folder: Path) -> list[int]:
    """Pids of `prefect server start` processes whose PREFECT_HOME is `folder` (not their
    supervisors, instructflow.prefect_watch, whose command line ends with the server's)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        watch = b"instructflow.prefect_watch" in cmdline
        if b"server\0start" in cmdline and not watch and f"PREFECT_HOME={folder}".encode() in env:
            pids.append(int(proc.name))
    return pids


def test_a_kill_while_the_prefect_server_comes_up_leaves_one_server(tmp_path):
    home, marker = tmp_path / "home", f"first-seconds-{uuid.uuid4().hex[:8]}"
    killed = subprocess.Popen(
        _cmd(home, marker, tmp_path / "killed.json"),
        cwd=ROOT,
        env=_env(prefect_api=False),  # the workspace's own server, made by this first run
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        # Launched (its own session: the kill spares it) and migrating its new database.
        _kill_when(killed, (home / "prefect" / "server.log").exists, 0.5)
        again = subprocess.run(
            _cmd(home, marker, tmp_path / "again.json"), cwd=ROOT, env=_env(prefect_api=False),
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert again.returncode == 0, again.stderr[-2000:]
        assert len(_prefect_servers(home / "prefect")) == 1
    finally:
        for pid in _prefect_servers(home / "prefect"):
            os.killpg(os.getpgid(pid), signal.SIGTERM)  # its supervisor's group
