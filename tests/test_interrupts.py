"""Ctrl-C and SIGTERM on a real run: the training step finishes, a checkpoint is saved, the
Prefect flow run and the MLflow run end in a terminal state, one line says where, exit 130;
the re-run resumes from that checkpoint."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
SETS = [
    "data.demo_rows=80",
    "train.method=lora",
    "train.max_steps=300",
    "train.per_device_batch_size=2",
    "train.save_steps=1000",  # no scheduled checkpoint: the interrupt's is the only one
    "train.eval_steps=1000",
    "train.logging_steps=1",  # curves from the first step: the resumed run shows them whole
    "evaluate.max_examples=4",
    "evaluate.max_new_tokens=4",
    "judge.backend=none",
    "register.enabled=false",
    "tracking.log_system_metrics=false",
]


def _start(home: Path, summary: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "instructflow.cli", "--home", str(home), "run", "--plain"]
    args += ["--summary-json", str(summary)]
    for item in SETS:
        args += ["--set", item]
    env = {**os.environ, "INSTRUCTFLOW_PROGRESS_EVERY_S": "0.5"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for_training(proc: subprocess.Popen, min_step: int) -> None:
    for line in proc.stdout:
        m = re.match(r"train\s+Running\s+(\d+)/\d+", line)
        if m and int(m.group(1)) >= min_step:
            return
    raise AssertionError(f"the run ended before training reached step {min_step}")


def _prefect_states(flow_run_id: str) -> tuple[str, list[str]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        flow = client.read_flow_run(flow_run_id)
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow.id]))
        )
    return flow.state.type.value, [t.state.type.value for t in runs if t.state]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_training_checkpoints_ends_every_run_and_the_rerun_resumes(tmp_path, signum):
    from mlflow.tracking import MlflowClient

    home = tmp_path / "home"
    proc = _start(home, tmp_path / "first.json")
    _wait_for_training(proc, min_step=3)
    sent = time.monotonic()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert time.monotonic() - sent < 30  # stops within seconds, not minutes
    lines = [ln for ln in err.splitlines() if ln.strip()]
    match = re.search(r"interrupted during train \(checkpoint at step (\d+); run again", err)
    assert match, err[-2000:]
    assert "Traceback" not in err and len(lines) <= 3, err[-2000:]
    step = int(match.group(1))

    first = json.loads((tmp_path / "first.json").read_text())
    assert first["stages"]["train"]["state"] == "Interrupted"
    run = MlflowClient(f"sqlite:///{home / 'mlflow.db'}").get_run(first["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.info.end_time
    flow_state, task_states = _prefect_states(first["flow_run_id"])
    assert flow_state in ("CRASHED", "CANCELLED", "FAILED"), flow_state
    assert "RUNNING" not in task_states, task_states
    if signum != signal.SIGINT:
        return

    # The same run again resumes from the checkpoint the interrupt saved.
    again = _start(home, tmp_path / "again.json")
    again.communicate(timeout=600)
    assert again.returncode == 0
    second = json.loads((tmp_path / "again.json").read_text())
    train_dir = home / "artifacts" / "train" / second["stages"]["train"]["artifact_digest"]
    info = json.loads((train_dir / "train.json").read_text())
    assert info["metrics"]["resumed_from_step"] == step

    # The resumed run's MLflow curves are whole: the killed run's steps, then the rest.
    store = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    for name in ("train/loss", "train/useful_tokens_per_s"):
        before = {m.step: m.value for m in store.get_metric_history(first["mlflow_run_id"], name)}
        after = {m.step: m.value for m in store.get_metric_history(second["mlflow_run_id"], name)}
        kept = {s: v for s, v in before.items() if s <= step}
        assert kept, (name, before)
        assert {s: after.get(s) for s in kept} == pytest.approx(kept), name
        assert max(after) > step, (name, after)
    assert [s for s, _ in info["step_metrics"]["loss"]][0] == min(kept)
