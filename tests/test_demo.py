"""`make demo`, end to end through the CLI: instruction tuning visibly works.

The guard against a regression to "the model learned to stop" (the random base of old): on
held-out test rows the QLoRA-tuned model's case-sensitive exact match must beat the base's by
at least 0.50, the base must stay at or below 0.10, and every task must improve. It uses the
session's pre-trained builtin:tiny (built by the first test that needs it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from instructflow.builtin import world

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_demo_tuned_model_answers_held_out_questions_the_base_cannot(tmp_path):
    home, summary = tmp_path / "home", tmp_path / "summary.json"
    env = {**os.environ, "INSTRUCTFLOW_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = [sys.executable, "-m", "instructflow.cli", "run", "-c", "configs/demo.yaml", "--plain"]
    proc = subprocess.run(
        [*args, "--summary-json", str(summary)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(summary.read_text())
    assert {s["state"] for s in result["stages"].values()} == {"Completed"}
    assert result["helpers"]["base_model"]["state"] in ("Completed", "Cached")
    m = result["metrics"]
    tuned, base = m["evaluate/exact_match"], m["evaluate/base/exact_match"]
    assert base <= 0.10 and tuned - base >= 0.50, (base, tuned)
    for task in world.FACTS:
        assert m[f"evaluate/em/{task}"] > m[f"evaluate/base/em/{task}"], task
    assert m["evaluate/perplexity"] < m["evaluate/base/perplexity"]

    # The console shows base vs tuned, per task, and answers side by side.
    out = proc.stdout
    assert "evaluation on" in out and "exact match per meta.task" in out
    assert all(task in out for task in world.FACTS)
    assert "test prompts, answered by both models" in out
    assert "qlora" in out
    assert "Successfully registered" not in out + proc.stderr  # no third-party chatter
    # The demo's judge (the same tiny model) fails calibration: flagged, and the gate says so.
    assert m["evaluate/judge_trusted"] == 0.0 and "NOT EVIDENCE" in out
    assert "untrusted: calibration accuracy" in out

    # MLflow has the per-task figures and the tables.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.metrics["evaluate/em/capital"] == m["evaluate/em/capital"]
    assert run.data.params["train.method.name"] == "qlora"
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "evaluate")}
    assert {"evaluate/examples.json", "evaluate/groups.json"} <= logged
    assert "evaluate/judge_calibration.json" in logged
    reasons = run.data.tags["instructflow.gate.reasons"]
    assert "judge untrusted" in reasons and "rule skipped" in reasons


def test_the_demo_recipe_does_not_hang_on_one_lucky_base(tmp_path):
    """The demo's fine-tune on another pre-training of builtin:tiny: seed 2, the weakest of
    seeds 0-3 under the previous recipe (test exact match 0.53; bench/demo_seeds.py). The
    recipe must give every base at least 0.70 (README: 0.75-0.95 over seeds 0-3)."""
    from instructflow.builtin import model as builtin

    bundle, _ = builtin.ensure_pretrained(builtin.cached_tokenizer_dir(), recipe={"seed": 2})
    home, summary = tmp_path / "home", tmp_path / "summary.json"
    env = {**os.environ, "INSTRUCTFLOW_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = [sys.executable, "-m", "instructflow.cli", "run", "-c", "configs/demo.yaml", "--plain"]
    args += ["--set", f"model.name_or_path={bundle / 'model'}", "--set", "judge.backend=none"]
    args += ["--set", "register.enabled=false", "--summary-json", str(summary)]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(summary.read_text())["metrics"]
    assert m["evaluate/exact_match"] >= 0.70, m["evaluate/exact_match"]
    assert m["evaluate/base/exact_match"] <= 0.10
