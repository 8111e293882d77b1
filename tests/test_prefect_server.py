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


def test_servers_of_deleted_workspaces_stop_and_stop_all_finds_every_one(tmp_path):
    """Every server started is recorded per user: one whose workspace folder was deleted is
    stopped when another server starts, and `server stop --all` stops the rest."""
    import shutil

    from instructflow.prefect_server import _alive

    cache = tmp_path / "cache"  # its own per-user records: the session's server is not in them

    def cli(home: Path, *args: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL",)}
        env["INSTRUCTFLOW_CACHE"] = str(cache)
        cmd = [sys.executable, "-m", "instructflow.cli", "--home", str(home), "server", *args]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    homes = [tmp_path / name for name in ("deleted", "kept", "third")]
    pids = []
    try:
        for home in homes[:2]:
            assert cli(home, "start").returncode == 0
            pids.append(json.loads((home / "prefect" / "server.json").read_text())["pid"])
        shutil.rmtree(homes[0])
        listed = cli(homes[1], "status", "--all")
        assert listed.returncode == 0 and "2 Prefect server(s) running" in listed.stdout
        assert f"pid {pids[0]} " in listed.stdout and "(workspace deleted)" in listed.stdout

        assert cli(homes[2], "start").returncode == 0  # starting one stops the orphan
        pids.append(json.loads((homes[2] / "prefect" / "server.json").read_text())["pid"])
        assert not _alive(pids[0]) and _alive(pids[1]) and _alive(pids[2])

        stopped = cli(homes[1], "stop", "--all")
        assert stopped.returncode == 0 and "2 Prefect server(s) stopped" in stopped.stdout
        assert not any(_alive(p) for p in pids)
        assert not list((cache / "prefect-servers").glob("*.json"))
        assert not (homes[1] / "prefect" / "server.json").exists()
        assert cli(homes[1], "status").returncode == 1  # none running for the workspace
    finally:
        for pid in pids:
            if _alive(pid):
                os.killpg(pid, 9)


def test_a_server_stops_once_unused_or_when_its_workspace_is_deleted(tmp_path):
    """Nothing keeps a server up but a live run or a client: unused past
    INSTRUCTFLOW_PREFECT_IDLE_S it stops (its records cleaned), and deleting the workspace stops
    one that never idles out."""
    import shutil
    import time

    import httpx

    from instructflow import runs
    from instructflow.prefect_server import _alive
    from instructflow.prefect_watch import busy

    cache = tmp_path / "cache"

    def start(home: Path, idle_s: float) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        env["INSTRUCTFLOW_CACHE"] = str(cache)
        cmd = [sys.executable, "-m", "instructflow.cli", "--home", str(home), "server", "start"]
        return subprocess.Popen([*cmd, "--idle-s", str(idle_s)], cwd=ROOT, env=env)

    def gone_within(pid: int, seconds: float) -> float:
        began = time.time()
        while _alive(pid) and time.time() - began < seconds:
            time.sleep(0.5)
        return time.time() - began if not _alive(pid) else float("inf")

    idle, deleted = tmp_path / "idle", tmp_path / "deleted"
    pids = []
    try:
        starting = [start(idle, 6), start(deleted, 0)]  # together: each takes 10-20 s
        assert [p.wait(timeout=600) for p in starting] == [0, 0]
        info, forever = (
            json.loads((h / "prefect" / "server.json").read_text()) for h in (idle, deleted)
        )
        pids += [info["pid"], forever["pid"]]
        assert (info["idle_s"], forever["idle_s"]) == (6, 0)

        # 0 never idles out, but deleting its workspace stops it within seconds.
        shutil.rmtree(deleted)
        assert gone_within(forever["pid"], 30) < 30

        # What keeps one up: a client's requests (open or closed within the last minute: a
        # worker's or the UI's short polls), a run of the workspace in progress.
        with httpx.Client() as client:
            assert client.get(f"{info['url']}/health").status_code == 200
            assert "client connection(s)" in busy(idle, info["port"])
        os.environ["INSTRUCTFLOW_HOME"], saved = str(idle), os.environ["INSTRUCTFLOW_HOME"]
        try:
            owner = runs.record_start(None, "flow-run-id", "sqlite:///unused.db")
        finally:
            os.environ["INSTRUCTFLOW_HOME"] = saved
        time.sleep(8)
        assert busy(idle, info["port"]) == "1 run(s) in progress" and _alive(info["pid"])
        owner.unlink()

        # Unused: it stops by itself, a minute or so after the last request.
        assert gone_within(info["pid"], 120) < 120
        assert not (idle / "prefect" / "server.json").exists()
        assert not list((cache / "prefect-servers").glob("*.json"))
        log = (idle / "prefect" / "server.log").read_text()
        assert "idle for 6 s (no run, no client): stopping the server" in log
    finally:
        for pid in pids:
            if _alive(pid):
                os.killpg(pid, 9)
