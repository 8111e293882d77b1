"""A judge API key in the environment must never reach MLflow, Prefect, artifacts or logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-instructflow-test-4f1d9a77c2e8b5"


class JudgeEndpoint(BaseHTTPRequestHandler):
    """A real OpenAI-compatible chat-completions endpoint that insists on the bearer key."""

    seen_keys: list[str] = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        auth = self.headers.get("Authorization", "")
        type(self).seen_keys.append(auth)
        if auth != f"Bearer {KEY}":
            self.send_response(401)
            self.end_headers()
            return
        prompt = body["messages"][-1]["content"]
        verdict = (
            {"winner": "A", "rationale": "ok"}
            if "Response A" in prompt
            else {"score": 7, "rationale": "ok"}
        )
        payload = json.dumps(
            {
                "id": "x",
                "object": "chat.completion",
                "model": body.get("model"),
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": json.dumps(verdict)},
                    }
                ],
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.mark.slow
def test_judge_key_never_reaches_tracking_artifacts_or_logs(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), JudgeEndpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    home = tmp_path / "home"
    summary = tmp_path / "summary.json"
    env = {**os.environ, "INSTRUCTFLOW_HOME": str(home), "INSTRUCTFLOW_TEST_JUDGE_KEY": KEY}
    env.pop("MLFLOW_TRACKING_URI", None)
    sets = [
        "data.demo_rows=80",
        "train.max_steps=3",
        "train.save_steps=2",
        "train.eval_steps=2",
        "evaluate.max_examples=4",
        "evaluate.max_new_tokens=8",
        "judge.backend=openai",
        f"judge.base_url=http://127.0.0.1:{server.server_port}/v1",
        "judge.model=stub-judge",
        "judge.api_key_env=INSTRUCTFLOW_TEST_JUDGE_KEY",
        "judge.max_examples=4",
        "register.enabled=false",
    ]
    args = [
        sys.executable,
        "-m",
        "instructflow.cli",
        "run",
        "--plain",
        "--summary-json",
        str(summary),
    ]
    for item in sets:
        args += ["--set", item]
    try:
        proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The key was really used (the endpoint refuses requests without it) ...
    assert JudgeEndpoint.seen_keys and set(JudgeEndpoint.seen_keys) == {f"Bearer {KEY}"}
    metrics = json.loads(summary.read_text())["metrics"]
    assert any("judge" in name for name in metrics), sorted(metrics)
    # ... and appears nowhere: MLflow db + artifacts, Prefect db + results, stage artifacts,
    # the judge cache, the console output.
    needle = KEY.encode()
    hits = [str(p) for p in home.rglob("*") if p.is_file() and needle in p.read_bytes()]
    assert hits == []
    assert KEY not in proc.stdout and KEY not in proc.stderr
    assert "INSTRUCTFLOW_TEST_JUDGE_KEY" in (home / "mlflow.db").read_bytes().decode("latin-1")
