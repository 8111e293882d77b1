"""`instructflow notify --webhook URL`: a failed or crashed pipeline run reaches a webhook
(a real Prefect automation on the test server, a real HTTP receiver on 127.0.0.1)."""

from __future__ import annotations

import http.server
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture
def receiver():
    """A webhook receiver: yields (url, queue of the JSON bodies it was sent)."""
    got: queue.Queue = queue.Queue()

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            size = int(self.headers.get("content-length", 0))
            got.put(json.loads(self.rfile.read(size)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hooks/T0K3N", got
    finally:
        server.shutdown()
        server.server_close()


def cli(home: Path, *args: str, **popen) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cmd = [sys.executable, "-m", "instructflow.cli", "--home", str(home), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, **popen)


def output(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


def test_a_failed_and_a_crashed_run_post_to_the_webhook(home, tmp_path, receiver):
    url, got = receiver
    pipe = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}
    code, out = output(cli(home, "notify", "--webhook", url, **pipe))
    assert code == 0, out
    assert "posts to http://127.0.0.1:" in out and "T0K3N" not in out  # the token stays hidden
    code, out = output(cli(home, "notify", **pipe))
    assert code == 0 and "(enabled)" in out, out
    try:
        # Failed: a data file in no known format stops validate.
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"question": "q"}\n')
        code, out = output(cli(home, "run", "--plain", "--set", f"data.source={bad}", **pipe))
        assert code != 0
        sent = got.get(timeout=120)
        assert re.fullmatch(r"instructflow: flow run [\w-]+ Failed", sent["subject"]), sent
        assert "validate failed: bad.jsonl: unknown format" in sent["text"]
        assert "/runs/flow-run/" in sent["text"]  # a link to the run in the Prefect UI

        # Crashed: SIGTERM while it trains.
        sets = ["data.demo_rows=60", "train.method=lora", "train.max_steps=500"]
        sets += ["train.per_device_batch_size=2", "judge.backend=none"]
        args = [a for s in sets for a in ("--set", s)]
        run = cli(home, "run", "--plain", *args, **pipe)
        for line in run.stdout:
            if re.match(r"train\s+Running\s+\d+/", line):
                run.send_signal(signal.SIGTERM)
                break
        code, _ = output(run)
        assert code != 0
        sent = got.get(timeout=120)
        assert sent["subject"].endswith(" Crashed"), sent
        assert "aborted by an interrupt signal" in sent["text"]
        assert got.empty()  # one post per run
    finally:
        code, out = output(cli(home, "notify", "--remove", **pipe))
    assert code == 0 and "removed" in out.splitlines(), out
    code, out = output(cli(home, "notify", **pipe))
    assert code == 1 and "no notification installed" in out
