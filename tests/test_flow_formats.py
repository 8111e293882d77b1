"""The flow up to tokenize on every real dataset format in ../shared/datasets.

Large files are cut to their first rows (a temp copy: the shared data stays read-only) to keep
the suite short; each format goes download -> validate -> augment -> split -> tokenize.
"""

from __future__ import annotations

import json

import pytest

from flows.run import run_finetune
from instructflow.artifacts import ArtifactRef
from tasks.split import read_split

pytestmark = pytest.mark.slow
ROWS = 150

CASES = {
    # name: (path under shared/datasets, template, multi_turn expected)
    "llms_from_scratch_ch07": ("llms_from_scratch_ch07/instruction-data.json", "alpaca", False),
    "stanford_alpaca": ("stanford_alpaca_subsets/random_9k.json", "alpaca", False),
    "self_instruct": ("self_instruct/seed_tasks.jsonl", "alpaca", False),
    "sharegpt_fastchat": ("sharegpt_fastchat_dummy/dummy_conversation.json", "chatml", True),
    "llamafactory_alpaca": ("llamafactory_demo/alpaca_en_demo.json", "chat_template", False),
    "llamafactory_v1_messages": ("llamafactory_demo/v1_sft_demo.jsonl", "chatml", False),
}


def first_rows(src, dest_dir, n: int):
    """A copy of the first n records of a JSON array or JSONL file."""
    dest = dest_dir / src.name
    if src.suffix == ".jsonl":
        lines = src.read_text(encoding="utf-8").splitlines(keepends=True)[:n]
        dest.write_text("".join(lines), encoding="utf-8")
    else:
        dest.write_text(json.dumps(json.loads(src.read_text(encoding="utf-8"))[:n]))
    return dest


def ref(home, stage: str, summary: dict) -> ArtifactRef:
    digest = summary["stages"][stage]["artifact_digest"]
    return ArtifactRef(stage=stage, path=str(home / "artifacts" / stage / digest), digest=digest)


@pytest.mark.parametrize("case", sorted(CASES))
def test_flow_up_to_tokenize_on_each_format(case, home, shared_datasets, tmp_path):
    from datasets import load_from_disk

    from instructflow import templates
    from instructflow.builtin.model import build_tokenizer

    rel, template, multi_turn = CASES[case]
    data = first_rows(shared_datasets / rel, tmp_path, ROWS)
    overrides = [
        f"data.source={data}",
        f"tokenize.template={template}",
        "tokenize.max_length=1024",
        "tracking.log_system_metrics=false",
    ]
    summary = run_finetune(None, overrides, until="tokenize")
    states = {s: summary["stages"][s]["state"] for s in summary["stages"]}
    assert states == {
        **{s: "Completed" for s in ("download", "validate", "augment", "split", "tokenize")},
        **{s: "Skipped" for s in ("train", "evaluate", "register")},
    }
    metrics = summary["metrics"]
    assert metrics["validate/rows_out"] >= ROWS * 0.5, metrics
    assert metrics["split/rows_test"] >= 1 and metrics["tokenize/rows_train"] >= 1

    train = read_split(ref(home, "split", summary), "train")
    assert any(len(r["messages"]) > 2 for r in train) == multi_turn
    tok = build_tokenizer()
    ds = load_from_disk(str(ref(home, "tokenize", summary).file("train")))
    assert len(ds) == metrics["tokenize/rows_train"]
    # The first training example ends with its trained end-of-turn token.
    eot = tok.convert_tokens_to_ids(templates.end_of_turn_token(template, tok))
    labels = ds[0]["labels"]
    assert [t for t in labels if t != -100][-1] == eot
