"""The Prefect UI tells what a run produced: each stage's figures, evaluate's base-vs-tuned
table, the gate's decision and reasons, and a run summary, as artifacts of the flow run."""

from __future__ import annotations

import pytest

from flows.run import run_finetune

pytestmark = pytest.mark.slow
SETS = [
    "data.demo_rows=60",
    "tokenize.max_length=96",
    "train.method=lora",
    "train.max_steps=4",
    "train.per_device_batch_size=4",
    "train.save_steps=2",
    "train.eval_steps=2",
    "evaluate.max_examples=4",
    "evaluate.max_new_tokens=8",
    "judge.backend=none",
    "register.model_name=prefect-report-test",
    "tracking.log_system_metrics=false",
]


def artifacts(flow_run_id: str) -> dict[str, str]:
    """{key: markdown} of the flow run's artifacts, read back from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a.data for a in found}


def test_each_stage_publishes_its_figures_and_the_gate_its_decision(home):
    first = run_finetune(None, SETS)
    published = artifacts(first["flow_run_id"])
    for stage in ("download", "validate", "augment", "split", "tokenize", "train", "evaluate"):
        text = published[f"instructflow-{stage}"]
        assert text.startswith(f"### {stage}: Completed in "), text[:200]
        assert first["stages"][stage]["summary"] in text
        assert first["mlflow_run_id"] in text  # the link to the MLflow run
    # evaluate: base and fine-tuned side by side, the numbers the run logged.
    evaluate = published["instructflow-evaluate"]
    assert "| metric | base | fine-tuned |" in evaluate
    em, em_base = (first["metrics"][f"evaluate/{k}exact_match"] for k in ("", "base/"))
    assert f"| exact_match | {em_base:.4g} | {em:.4g} |" in evaluate
    register = published["instructflow-register"]
    assert "**Gate**: promoted to champion" in register
    assert "the first version becomes champion" in register
    summary = published["instructflow-run"]
    assert "| train | Completed |" in summary and "| register | Completed |" in summary

    # A night with nothing new: every stage Cached, the figures still there, nothing promoted.
    again = run_finetune(None, SETS)
    published = artifacts(again["flow_run_id"])
    assert published["instructflow-train"].startswith("### train: Cached in ")
    assert f"| exact_match | {em_base:.4g} | {em:.4g} |" in published["instructflow-evaluate"]
    assert "**Gate**: not promoted" in published["instructflow-register"]
    assert "unchanged (already registered)" in published["instructflow-register"]


def test_figures_without_signal_are_flagged_where_they_are_shown(home):
    """An untrusted judge's figures and a BLEU on one-word references are labelled, not bare."""
    import json

    from instructflow.artifacts import write_artifact
    from instructflow.prefect_report import stage_markdown

    def write(tmp):
        judge = {"usable": False, "status": "judge untrusted: calibration accuracy 0.40"}
        (tmp / "report.json").write_text(json.dumps({"judge": judge}))
        return {
            "metrics": {"bleu": 0.0, "bleu_base": 0.8, "judge_score": 5.6, "win_rate": 0.5},
            "figures": {"ties": 16, "test_examples": 80},
            "tags": {"instructflow.bleu_note": "no signal: references of 1 word"},
            "summary": "EM 0.86",
        }

    text = stage_markdown("evaluate", "Completed", 7.1, write_artifact("evaluate", write), "-")
    assert "**Judge untrusted, its scores not used**: judge untrusted: calibration" in text
    assert "| bleu (no signal) | 0.8 | 0 |" in text
    assert "| judge_score (untrusted judge) | 5.6 |" in text
    assert "| win_rate (untrusted judge) | 0.5 |" in text
    assert "| ties (untrusted judge) | 16 |" in text
    assert "| test_examples | 80 |" in text
