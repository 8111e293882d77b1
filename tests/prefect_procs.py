"""Processes for tests that drive Prefect from outside: a real `prefect server start` on
127.0.0.1 with its own PREFECT_HOME, and the helpers to wait for and stop what they start."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group `proc` leads (started with start_new_session), then SIGKILL."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def wait_for(check, timeout: float, what: str, procs=(), every: float = 1.0):
    """Poll `check` until it returns something truthy; fail early when one of `procs`
    ((Popen, log path) pairs) exits, and show their logs on failure."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p, log in procs:
            if p.poll() is not None:
                raise AssertionError(f"{what}: process exited: {log.read_text()[-3000:]}")
        try:
            value = check()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        time.sleep(every)
    logs = "\n".join(log.read_text()[-2000:] for _, log in procs)
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


@contextlib.contextmanager
def prefect_server(tmp_path: Path):
    """`prefect server start` on 127.0.0.1 with its own PREFECT_HOME; yields (api_url, env)."""
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-server"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    log = tmp_path / "prefect-server.log"
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_for(
            lambda: httpx.get(api + "/health", timeout=2).status_code == 200,
            90,
            "prefect server",
            [(proc, log)],
        )
        yield api, {**env, "PREFECT_API_URL": api}
    finally:
        stop(proc)
