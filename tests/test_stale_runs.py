"""kill -9 of a whole run: the next run closes what it left "Running" (MLflow FAILED with a
reason, Prefect Crashed) and still resumes training from the last checkpoint."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
SETS = [
    "data.demo_rows=80",
    "train.method=lora",
    "train.max_steps=300",
    "train.per_device_batch_size=2",
    "train.save_steps=5",
    "train.eval_steps=1000",
    "evaluate.max_examples=4",
    "evaluate.max_new_tokens=4",
    "judge.backend=none",
    "register.enabled=false",
    "tracking.log_system_metrics=false",
]


def _cmd(home: Path, summary: Path) -> list[str]:
    cmd = [sys.executable, "-m", "instructflow.cli", "--home", str(home), "run", "--plain"]
    cmd += ["--summary-json", str(summary)]
    for item in SETS:
        cmd += ["--set", item]
    return cmd


def _env() -> dict[str, str]:
    env = {**os.environ, "INSTRUCTFLOW_PROGRESS_EVERY_S": "0.5"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def test_kill_9_leaves_nothing_running_after_the_next_run_which_resumes(tmp_path):
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )

    home = tmp_path / "home"
    proc = subprocess.Popen(
        _cmd(home, tmp_path / "killed.json"),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    for line in proc.stdout:
        m = re.match(r"train\s+Running\s+(\d+)/\d+", line)
        if m and int(m.group(1)) >= 12:
            break
    os.killpg(proc.pid, signal.SIGKILL)  # the whole run, no chance to clean up
    proc.wait(timeout=30)
    records = list((home / "runs").glob("*.json"))
    assert len(records) == 1
    killed = json.loads(records[0].read_text())

    store = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    assert store.get_run(killed["mlflow_run_id"]).info.status == "RUNNING"  # left behind

    again = subprocess.run(
        _cmd(home, tmp_path / "again.json"), cwd=ROOT, env=_env(), capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert "closed 1 earlier run(s) left running by a killed process" in again.stdout
    dead = store.get_run(killed["mlflow_run_id"])
    assert dead.info.status == "FAILED" and dead.info.end_time
    assert dead.data.tags["instructflow.end_reason"] == "process killed (no exit recorded)"
    running = store.search_runs(
        [e.experiment_id for e in store.search_experiments()], "attributes.status = 'RUNNING'"
    )
    assert running == []
    with get_client(sync_client=True) as client:
        flow = client.read_flow_run(killed["flow_run_id"])
        assert flow.state.type.value == "CRASHED"
        assert "process killed" in (flow.state.message or "")
        still = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["RUNNING"]))
            )
        )
        assert killed["flow_run_id"] not in {str(f.id) for f in still}
    assert not list((home / "runs").glob("*.json"))

    second = json.loads((tmp_path / "again.json").read_text())
    train_dir = home / "artifacts" / "train" / second["stages"]["train"]["artifact_digest"]
    info = json.loads((train_dir / "train.json").read_text())
    assert info["metrics"]["resumed_from_step"] >= 10
