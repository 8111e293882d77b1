"""`instructflow sweep`: one real pipeline run per method as MLflow child runs of the sweep's
run, data stages Cached after the first method, a failed method shown as failed while the
others still run, and the method table (markdown, MLflow table, plot) on the parent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from instructflow import sweep
from instructflow.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_method_knobs_come_from_sweep_then_train_then_defaults(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(
        "train:\n  method: {name: lora, r: 4}\n"
        "sweep:\n  methods: [{name: ia3, learning_rate: 0.05}, prompt_tuning, lora]\n"
    )
    cfg = load_config(str(cfg_file), [])
    assert sweep.default_names(cfg) == ["ia3", "prompt_tuning", "lora"]
    ia3, lora, full = sweep.method_overrides(cfg, ["ia3", "lora", "full"])
    assert ia3["learning_rate"] == 0.05
    assert lora["r"] == 4  # a bare name: the method as train.method configures it
    assert full == {"name": "full", "learning_rate": None}
    with pytest.raises(ValueError, match="unknown training method 'lorra'"):
        sweep.method_overrides(cfg, ["lorra"])
    no_sweep = load_config(None, [])
    assert len(sweep.default_names(no_sweep)) == 8


def test_table_marks_failures_and_an_untrusted_judge():
    rows = [
        {"method": "lora", "status": "ok", "trainable_parameters": 1234, "exact_match": 0.5,
         "judge_note": "untrusted"},
        {"method": "adapter", "status": "failed", "error": "train failed: boom"},
    ]  # fmt: skip
    table = sweep.markdown_table(rows)
    header, rule, lora, adapter = table.splitlines()[:4]
    assert header.count("|") == len(sweep.COLUMNS) + 1
    assert "| lora | ok | 1,234 |" in lora and "| 0.50 |" in lora and "untrusted" in lora
    assert "| adapter | failed |" in adapter
    assert "adapter failed: train failed: boom" in table


@pytest.mark.slow
def test_sweep_runs_each_method_as_a_child_run_and_logs_the_table(home, tmp_path):
    from mlflow.tracking import MlflowClient

    summary_file = tmp_path / "sweep.json"
    methods = "[{name: adapter, target_modules: [no_such_block]}, {name: prompt_tuning}]"
    cmd = [
        sys.executable, "-m", "instructflow.cli", "sweep", "-c", "configs/demo.yaml",
        "--set", f"sweep.methods={methods}",
        "--set", "train.max_steps=6", "--set", "train.save_steps=3",
        "--set", "train.eval_steps=3", "--set", "train.logging_steps=2",
        "--set", "evaluate.max_examples=6",
        "--set", "judge.backend=none", "--set", "tracking.experiment=sweep-test",
        "--summary-json", str(summary_file),
    ]  # fmt: skip
    env = {**os.environ, "INSTRUCTFLOW_HOME": str(home)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    out = json.loads(summary_file.read_text())
    base, bad, good = out["rows"]
    assert base["status"] == "reference" and base["exact_match"] is not None

    # The broken method fails in one line and the sweep goes on to the next.
    assert bad["method"] == "adapter" and bad["status"] == "failed"
    assert "no block named ['no_such_block']" in bad["error"]
    assert good["method"] == "prompt_tuning" and good["status"] == "ok"
    # Data stages ran once (for the first method) and were Cached for the second.
    assert set(sweep.DATA_STAGES) <= set(good["cached_stages"])
    assert "train" not in good["cached_stages"]
    for key, _, fmt in sweep.COLUMNS:
        if fmt != "{}" and key != "judge_win_rate":
            assert isinstance(good[key], int | float), key
    assert 0 < good["trainable_percent"] < 1
    assert "| prompt_tuning | ok |" in proc.stdout and "| adapter | failed |" in proc.stdout

    client = MlflowClient()
    parent = client.get_run(out["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["instructflow.kind"] == "sweep"
    assert parent.data.metrics["prompt_tuning/exact_match"] == good["exact_match"]
    files = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/method_table.json", "sweep/method_table.md"} <= files
    assert "sweep/quality_vs_trainable.png" in files
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    by_name = {r.info.run_name: r for r in children}
    assert set(by_name) == {"adapter", "prompt_tuning"}
    assert by_name["prompt_tuning"].info.status == "FINISHED"
    assert by_name["adapter"].info.status == "FAILED"
    assert by_name["prompt_tuning"].data.params["train.method.name"] == "prompt_tuning"
