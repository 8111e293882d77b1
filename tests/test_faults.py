"""Faults an unattended nightly run meets: a dead tracking server, a full disk."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(home: Path, *args: str, env: dict[str, str] | None = None, timeout: int = 300):
    full_env = {**os.environ, "INSTRUCTFLOW_HOME": str(home), **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, "-m", "instructflow.cli", "run", "--plain", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_unreachable_tracking_server_fails_fast_with_one_line(tmp_path):
    uri = f"http://127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    proc = cli(tmp_path / "home", "--until", "download", "--set", f"tracking.tracking_uri={uri}")
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    errors = _error_lines(proc.stderr)
    assert len(errors) == 1 and "unreachable" in errors[0] and uri in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert elapsed < 120  # the ephemeral Prefect API start dominates; no MLflow retry storm


def test_unreachable_tracking_server_can_fall_back_to_local_store(tmp_path):
    uri = f"http://127.0.0.1:{_closed_port()}"
    summary = tmp_path / "s.json"
    proc = cli(
        tmp_path / "home",
        "--until",
        "download",
        "--summary-json",
        str(summary),
        "--set",
        f"tracking.tracking_uri={uri}",
        "--set",
        "tracking.on_unreachable=local",
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "home" / "mlflow.db").is_file()
    assert '"download"' in summary.read_text()


def test_disk_floor_refuses_to_start_a_stage(tmp_path):
    proc = cli(
        tmp_path / "home", "--until", "download", "--set", "tracking.min_free_disk_mb=999999999"
    )
    assert proc.returncode != 0
    errors = _error_lines(proc.stderr)
    assert len(errors) == 1 and "MB free" in errors[0] and "download" in errors[0], proc.stderr
    assert not (tmp_path / "home" / "artifacts" / "download").exists()
