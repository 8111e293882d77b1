"""The workspace's own Prefect server: started by the first run, reused by the next (no
per-run API start), showing the flow runs and their stage logs; `instructflow server`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")
    }
    cmd = [sys.executable, "-m", "instructflow.cli", "--home", str(home), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_runs_share_the_workspace_server_which_shows_them_and_their_logs(tmp_path):
    home = tmp_path / "home"
    run = ["run", "--plain", "--until", "validate", "--set", "data.demo_rows=20"]
    first = _cli(home, *run, "--summary-json", str(tmp_path / "a.json"))
    assert first.returncode == 0, first.stderr[-2000:]
    assert "starting the workspace's Prefect server" in first.stdout
    state = json.loads((home / "prefect" / "server.json").read_text())
    try:
        second = _cli(home, *run, "--summary-json", str(tmp_path / "b.json"))
        assert second.returncode == 0, second.stderr[-2000:]
        assert "starting the workspace's Prefect server" not in second.stdout
        assert json.loads((home / "prefect" / "server.json").read_text())["pid"] == state["pid"]
        status = _cli(home, "server", "status")
        assert status.returncode == 0 and state["url"] in status.stdout

        # The server holds both flow runs, completed, with the stage lines in their logs.
        import httpx

        for name in ("a.json", "b.json"):
            flow_run_id = json.loads((tmp_path / name).read_text())["flow_run_id"]
            flow = httpx.get(f"{state['url']}/flow_runs/{flow_run_id}", timeout=10).json()
            assert flow["state"]["type"] == "COMPLETED"
            logs = httpx.post(
                f"{state['url']}/logs/filter",
                json={"logs": {"flow_run_id": {"any_": [flow_run_id]}}},
                timeout=10,
            ).json()
            messages = " ".join(entry["message"] for entry in logs)
            assert "download:" in messages and "validate:" in messages, messages[:500]
    finally:
        stopped = _cli(home, "server", "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    from instructflow.prefect_server import _alive

    assert not _alive(state["pid"])
    assert _cli(home, "server", "status").returncode == 1
