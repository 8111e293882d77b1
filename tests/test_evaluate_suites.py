"""The evaluate stage with every optional suite on, offline: BERTScore with a locally built
encoder, an lm-eval multiple-choice task from local files, and the MT-Bench-style suite graded
by a real HTTP judge endpoint; figures and tables land in MLflow for both models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from evaluate_fixtures import canonical_rows, make_base, make_inputs, make_train
from rich.console import Console
from test_judge import Stub
from test_semantic import _save_tiny_bert

from instructflow import report
from instructflow.config import EvaluateConfig, JudgeConfig, TokenizeConfig

LM_EVAL_DATA = Path(__file__).parent / "data" / "lm_eval"
pytestmark = pytest.mark.slow


def local_task_dir(tmp_path: Path) -> Path:
    """tiny_mc with its data file by absolute path (datasets resolves relative paths against
    the working directory, not the YAML's folder)."""
    cfg = yaml.safe_load((LM_EVAL_DATA / "tiny_mc.yaml").read_text())
    data = LM_EVAL_DATA / cfg["dataset_kwargs"]["data_files"]["test"]
    cfg["dataset_kwargs"]["data_files"]["test"] = str(data.resolve())
    out = tmp_path / "tasks"
    out.mkdir()
    (out / "tiny_mc.yaml").write_text(yaml.safe_dump(cfg))
    return out


def test_bertscore_lm_eval_and_mt_bench_land_in_mlflow(home, tmp_path):
    from mlflow.tracking import MlflowClient

    import mlflow
    from instructflow import tracking
    from tasks.evaluate import evaluate

    encoder = _save_tiny_bert(tmp_path / "encoder")
    stub = Stub()
    try:
        tok_ref, base = make_base()
        cfg = EvaluateConfig(
            max_new_tokens=6,
            semantic_model=str(encoder),
            lm_eval_tasks=["tiny_mc"],
            lm_eval_include_path=str(local_task_dir(tmp_path)),
            mt_bench="builtin",
        )
        judge_cfg = JudgeConfig(
            backend="openai", base_url=stub.url, model="stub", mode="single",
            calibration_examples=2,
        )  # fmt: skip
        ref = evaluate(
            *make_inputs(canonical_rows(4), tok_ref),
            make_train(base, tok_ref),
            base,
            TokenizeConfig(max_length=128),
            cfg,
            judge_cfg,
        )
    finally:
        stub.close()
    m = ref.figures
    for suffix in ("", "_base"):
        assert 0.0 <= m[f"bertscore_f1{suffix}"] <= 1.0
        assert 0.0 <= m[f"lm_eval.tiny_mc.acc{suffix}"] <= 1.0
        # The stub grades 3 unless the answer says "good": known figures for every category.
        assert m[f"mt_bench.overall{suffix}"] == 3.0
        assert m[f"mt_bench.math{suffix}"] == 3.0 and m[f"mt_bench.failures{suffix}"] == 0
        # Both turns graded (MT-Bench's turn 1 and turn 2 scores).
        assert m[f"mt_bench.turn1{suffix}"] == m[f"mt_bench.turn2{suffix}"] == 3.0
    # The MT-Bench questions really went to the judge, with their earlier turns for two-turn
    # ones, and those without a reference under the reference-free rubric.
    graded = [r["body"]["messages"][1]["content"] for r in stub.requests]
    assert any("User: " in g and "Assistant: " in g for g in graded)
    no_ref = [g for g in graded if "There is no reference answer" in g]
    assert no_ref and not any("### Reference answer:" in g for g in no_ref)
    table = json.loads(ref.file("mt_bench.json").read_text())
    # 8 questions, 2 of them with two turns, for both models; 3 turns have no reference.
    assert len(table["turn"]) == 2 * 10 and table["turn"].count(2) == 2 * 2
    assert table["rubric"].count("no reference") == 2 * 3
    assert all(s == 3.0 for s in table["score"])

    # BERTScore says next to the figure how it differs from the bert-score package, and how
    # many empty answers it scored 0 (which that package cannot score at all).
    report_json = json.loads(ref.file("report.json").read_text())
    assert "unlike in the bert-score package" in report_json["bertscore_note"]
    examples = json.loads(ref.file("examples.json").read_text())
    for suffix, column in (("", "finetuned_output"), ("_base", "base_output")):
        empty = sum(not a.strip() for a in examples[column])
        assert ref.figures[f"bertscore_empty{suffix}"] == empty
    console = Console(record=True, width=200)
    for renderable in report.tables(report_json):
        console.print(renderable)
    shown = " ".join(console.export_text().split())
    assert "BERTScore F1: special tokens are not matched, unlike in the bert-score" in shown
    assert "MT-Bench-style 3.0/10 (base 3.0) (turn1 3.0, turn2 3.0)" in shown

    tracking.setup(None, "suites")
    with mlflow.start_run() as run:
        tracking.log_stage(run.info.run_id, ref)
    client = MlflowClient()
    logged = client.get_run(run.info.run_id).data.metrics
    assert logged["evaluate/lm_eval/tiny_mc/acc"] == m["lm_eval.tiny_mc.acc"]
    assert logged["evaluate/base/bertscore_f1"] == m["bertscore_f1_base"]
    tables = {a.path for a in client.list_artifacts(run.info.run_id, "evaluate")}
    assert {"evaluate/mt_bench.json", "evaluate/lm_eval.json"} <= tables
