"""`instructflow serve` as a real subprocess on 127.0.0.1, for the tests that talk to it."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(home: Path, model: str, *args: str, log: Path | None = None) -> Iterator[str]:
    """Start `instructflow serve --model MODEL ARGS` on a free port, wait for /health, yield
    its base URL (http://127.0.0.1:PORT), stop it afterwards. Output goes to `log` if given."""
    with serve_process(home, model, *args, log=log) as (url, _):
        yield url


@contextlib.contextmanager
def serve_process(
    home: Path, model: str, *args: str, log: Path | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    """serving(), yielding (base URL, the server's process) for tests that signal it."""
    port = free_port()
    out = open(log, "w+") if log else None  # noqa: SIM115 (closed below)
    cmd = [sys.executable, "-m", "instructflow.cli", "serve", "--model", model]
    env = {**os.environ, "INSTRUCTFLOW_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)  # the home's own store
    proc = subprocess.Popen(
        [*cmd, "--port", str(port), *args],
        env=env,
        stdout=out or subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text() if log else proc.stdout.read()
                pytest.fail(f"serve did not come up: {tail[-2000:]}")
            time.sleep(0.3)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if out:
            out.close()
