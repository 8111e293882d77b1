"""Re-running failed work: only the failed stage and what follows run again; the rest is Cached.

The failure is one a user really meets: the judge's API key variable is not exported, so
evaluate stops (after train finished). Exporting it and re-running — with `instructflow run`
or `prefect flow-run retry` — executes evaluate and register only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEY = "IF_TEST_JUDGE_KEY"
EARLY = ["download", "validate", "augment", "split", "tokenize", "train"]

pytestmark = pytest.mark.slow


def tiny(extra: list[str] = ()) -> list[str]:
    sets = [
        "data.demo_rows=60",
        "tokenize.max_length=96",
        "train.method=lora",
        "train.max_steps=4",
        "train.per_device_batch_size=4",
        "train.save_steps=2",
        "train.eval_steps=2",
        "evaluate.max_examples=4",
        "evaluate.max_new_tokens=8",
        "evaluate.compare_base=false",
        "judge.backend=openai",
        "judge.base_url=http://127.0.0.1:9/v1",  # nothing listens: verdicts count as failed
        "judge.model=m",
        f"judge.api_key_env={KEY}",
        "judge.max_retries=0",
        "judge.max_examples=2",
        "register.model_name=rerun-test",
        "tracking.log_system_metrics=false",
        *extra,
    ]
    return [arg for s in sets for arg in ("--set", s)]


def cli_run(tmp_path: Path, name: str, extra: list[str] = ()) -> tuple[int, dict]:
    from instructflow.cli import main

    out = tmp_path / f"{name}.json"
    rc = main(["run", "--plain", "--summary-json", str(out), *tiny(extra)])
    return rc, json.loads(out.read_text())


def states(summary: dict) -> dict[str, str]:
    return {k: v["state"] for k, v in summary["stages"].items()}


def test_failed_run_reruns_only_failed_stage_and_later(home, tmp_path, monkeypatch):
    monkeypatch.delenv(KEY, raising=False)
    rc, first = cli_run(tmp_path, "first")
    assert rc == 1 and KEY in first["error"]
    s = states(first)
    assert [s[k] for k in EARLY] == ["Completed"] * len(EARLY)
    assert (s["evaluate"], s["register"]) == ("Failed", "Skipped")

    monkeypatch.setenv(KEY, "not-a-real-key")
    rc, second = cli_run(tmp_path, "second")
    assert rc == 0, second.get("error")
    s = states(second)
    assert [s[k] for k in EARLY] == ["Cached"] * len(EARLY)
    assert (s["evaluate"], s["register"]) == ("Completed", "Completed")
    assert (
        second["stages"]["train"]["artifact_digest"] == first["stages"]["train"]["artifact_digest"]
    )

    # The same through Prefect: a failed flow run retried with `prefect flow-run retry`.
    monkeypatch.delenv(KEY)
    rc, third = cli_run(tmp_path, "third", ["evaluate.max_new_tokens=6"])
    assert rc == 1 and states(third)["train"] == "Cached"
    flow_run_id = third["flow_run_id"]
    env = {
        **{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
        KEY: "not-a-real-key",
    }
    retry = subprocess.run(
        [
            str(Path(sys.executable).with_name("prefect")),
            "flow-run",
            "retry",
            flow_run_id,
            "--entrypoint",
            "flows/run.py:finetune",  # the README's: its cache records in the workspace
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert retry.returncode == 0, retry.stdout[-2000:] + retry.stderr[-2000:]

    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
        flow_run = client.read_flow_run(flow_run_id)
    assert flow_run.state.is_completed()
    latest: dict[str, str] = {}
    for tr in sorted(runs, key=lambda r: r.created):  # names are "<task>-<suffix>"
        latest[tr.name.rsplit("-", 1)[0]] = tr.state.name
    assert latest["train"] == "Cached" and latest["evaluate"] == "Completed", latest
    mlflow_client = MlflowClient()
    versions = mlflow_client.search_model_versions("name = 'rerun-test'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    newest = mlflow_client.get_run(max(versions, key=lambda v: int(v.version)).run_id)
    assert newest.data.tags["instructflow.flow_run_id"] == flow_run_id
