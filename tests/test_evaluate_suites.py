"""The evaluate stage with every optional suite on, offline: BERTScore with a locally built
encoder, an lm-eval multiple-choice task from local files, and the MT-Bench-style suite graded
by a real HTTP judge endpoint; figures and tables land in MLflow for both models."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from evaluate_fixtures import canonical_rows, make_base, make_inputs, make_train
from test_judge import Stub
from test_semantic import _save_tiny_bert

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
    # The MT-Bench questions really went to the judge, with their earlier turns for two-turn
    # ones.
    graded = [r["body"]["messages"][1]["content"] for r in stub.requests]
    assert any("User: " in g and "Assistant: " in g for g in graded)

    tracking.setup(None, "suites")
    with mlflow.start_run() as run:
        tracking.log_stage(run.info.run_id, ref)
    client = MlflowClient()
    logged = client.get_run(run.info.run_id).data.metrics
    assert logged["evaluate/lm_eval/tiny_mc/acc"] == m["lm_eval.tiny_mc.acc"]
    assert logged["evaluate/base/bertscore_f1"] == m["bertscore_f1_base"]
    tables = {a.path for a in client.list_artifacts(run.info.run_id, "evaluate")}
    assert {"evaluate/mt_bench.json", "evaluate/lm_eval.json"} <= tables
