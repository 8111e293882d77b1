"""Cross-run caching through the real flow (Prefect engine + MLflow sqlite store), up to tokenize.

An unchanged re-run is all Cached; each knob re-runs exactly the stages downstream of it; a
corrupted artifact is recomputed and never reused; every run in MLflow is complete.
"""

from __future__ import annotations

import json

import pytest

from flows.run import run_finetune
from flows.stages import STAGES
from instructflow import demo_data, progress

pytestmark = pytest.mark.slow
DATA_STAGES = STAGES[: STAGES.index("tokenize") + 1]


def states(summary: dict) -> dict[str, str]:
    return {name: summary["stages"][name]["state"] for name in DATA_STAGES}


def expect(summary: dict, completed: set[str]) -> None:
    want = {n: "Completed" if n in completed else "Cached" for n in DATA_STAGES}
    assert states(summary) == want


def digest(summary: dict, stage: str) -> str:
    return summary["stages"][stage]["artifact_digest"]


def write_data(path, rows: int, seed: int = 0) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in demo_data.generate(rows, seed):
            fh.write(json.dumps(row) + "\n")


def other_tokenizer_dir(tmp_path):
    """The builtin tokenizer with another chat template: a different tokenizer identity."""
    from instructflow.builtin.model import build_tokenizer

    tok = build_tokenizer()
    tok.chat_template = tok.chat_template + "{# another revision #}"
    path = tmp_path / "other-model"
    tok.save_pretrained(str(path))
    return path


def test_each_knob_reruns_exactly_the_stages_downstream_of_it(home, tmp_path):
    import mlflow

    data = tmp_path / "data.jsonl"
    write_data(data, 80)
    base = [f"data.source={data}", "tokenize.max_length=96", "tracking.log_system_metrics=false"]

    first = run_finetune(None, base, until="tokenize")
    expect(first, set(DATA_STAGES))
    assert first["stages"]["train"]["state"] == "Skipped"

    again = run_finetune(None, base, until="tokenize")
    expect(again, set())
    assert all(digest(again, s) == digest(first, s) for s in DATA_STAGES)

    seed = run_finetune(None, [*base, "split.seed=7"], until="tokenize")
    expect(seed, {"split", "tokenize"})
    assert digest(seed, "split") != digest(first, "split")

    length = run_finetune(None, [*base, "tokenize.max_length=64"], until="tokenize")
    expect(length, {"tokenize"})
    assert digest(length, "tokenize") != digest(first, "tokenize")

    other = other_tokenizer_dir(tmp_path)
    retok = run_finetune(None, [*base, f"model.name_or_path={other}"], until="tokenize")
    expect(retok, {"tokenize"})  # same vocab: same ids, but it had to be checked

    # Corrupt the cached split artifact: split recomputes (same content, same digest),
    # and tokenize, keyed on that digest, is still a valid hit.
    split_dir = home / "artifacts" / "split" / digest(first, "split")
    (split_dir / "train.jsonl").write_text("{}\n")
    warnings: list[dict] = []

    def listen(event: str, payload: dict) -> None:
        if event == "warning":
            warnings.append(payload)

    progress.subscribe(listen)
    try:
        repaired = run_finetune(None, base, until="tokenize")
    finally:
        progress.unsubscribe(listen)
    expect(repaired, {"split"})
    assert [w["stage"] for w in warnings] == ["split"]
    assert "failed its digest check; recomputing" in warnings[0]["message"]
    assert digest(repaired, "split") == digest(first, "split")
    assert digest(repaired, "tokenize") == digest(first, "tokenize")
    assert (split_dir / "train.jsonl").read_text() != "{}\n"

    write_data(data, 80, seed=1)  # a data file edit
    edited = run_finetune(None, base, until="tokenize")
    expect(edited, set(DATA_STAGES))

    # MLflow: every run is complete, including the stages that were Cached in it.
    client = mlflow.tracking.MlflowClient()
    cached_run = client.get_run(again["mlflow_run_id"])
    assert cached_run.data.params["split.seed"] == "42"
    assert client.get_run(seed["mlflow_run_id"]).data.params["split.seed"] == "7"
    # The data stages' counts are bookkeeping (<stage>/figures.json, not charts): a Cached
    # stage logs the same file into its new run.
    for stage, key in (
        ("download", "bytes"),
        ("validate", "rows_out"),
        ("augment", "rows_out"),
        ("split", "rows_train"),
        ("tokenize", "tokens"),
    ):
        logged = [
            mlflow.artifacts.load_dict(f"runs:/{run_id}/{stage}/figures.json")
            for run_id in (first["mlflow_run_id"], again["mlflow_run_id"])
        ]
        assert key in logged[0] and logged[0] == logged[1], stage
    contexts = {
        tag.value
        for ds in cached_run.inputs.dataset_inputs
        for tag in ds.tags
        if tag.key == "mlflow.data.context"
    }
    assert contexts == {"train", "validation", "test"}
    assert cached_run.data.tags["instructflow.digest.tokenize"] == digest(first, "tokenize")


def test_download_is_cached_across_flow_runs_and_recomputed_when_corrupt(home, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "a", "input": "", "output": "b"}) + "\n")
    overrides = [f"data.source={data}"]
    first = run_finetune(None, overrides, until="download")
    second = run_finetune(None, overrides, until="download")
    assert first["stages"]["download"]["state"] == "Completed"
    assert second["stages"]["download"]["state"] == "Cached"
    assert (
        first["stages"]["download"]["artifact_digest"]
        == second["stages"]["download"]["artifact_digest"]
    )
    # Corrupt the cached artifact: the next run must not trust it.
    digest = second["stages"]["download"]["artifact_digest"]
    (home / "artifacts" / "download" / digest / "data" / "d.jsonl").write_text("garbage")
    third = run_finetune(None, overrides, until="download")
    assert third["stages"]["download"]["state"] == "Completed"
    assert third["stages"]["download"]["artifact_digest"] == digest
    # Editing the data file changes the key.
    data.write_text(json.dumps({"instruction": "a", "input": "", "output": "c"}) + "\n")
    fourth = run_finetune(None, overrides, until="download")
    assert fourth["stages"]["download"]["state"] == "Completed"
    assert fourth["stages"]["download"]["artifact_digest"] != digest
