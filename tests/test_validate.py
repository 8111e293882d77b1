"""validate on the real datasets in ../shared/datasets: each format, rejects and their reasons."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from instructflow.config import DataConfig, ValidateConfig
from instructflow.formats import DataError
from tasks.download import download
from tasks.validate import near_duplicates, validate

CANONICAL_KEYS = [
    "id",
    "file",
    "row",
    "messages",
    "instruction",
    "input",
    "output",
    "group",
    "augmented_from",
    "meta",
]


def run_validate(source: Path, **knobs):
    ref = validate(download(DataConfig(source=str(source))), ValidateConfig(**knobs))
    clean = [json.loads(line) for line in ref.file("clean.jsonl").open(encoding="utf-8")]
    rejects = [json.loads(line) for line in ref.file("rejects.jsonl").open(encoding="utf-8")]
    report = json.loads(ref.file("report.json").read_text(encoding="utf-8"))
    # The invariant: every row in is either kept or rejected with a reason.
    assert report["rows_in"] == len(clean) + len(rejects) == report["rows_out"] + report["rejected"]
    assert all(r["reason"] and r["file"] and r["row"] >= 1 for r in rejects)
    for row in clean:
        assert list(row) == CANONICAL_KEYS
        assert row["messages"][-1]["role"] == "assistant"
        assert row["messages"][-1]["content"] == row["output"]
        assert {m["role"] for m in row["messages"]} <= {"system", "user", "assistant"}
        assert row["id"].startswith(f"{row['file']}:{row['row']}")
    return ref, clean, rejects, report


def _source_rows(path: Path) -> list:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.open(encoding="utf-8") if line.strip()]
    return json.loads(path.read_text(encoding="utf-8"))


def test_alpaca_ch07_outputs_report_and_meta(home, shared_datasets):
    path = shared_datasets / "llms_from_scratch_ch07" / "instruction-data.json"
    ref, clean, rejects, report = run_validate(path)
    source = _source_rows(path)
    assert report["rows_in"] == len(source)
    assert report["files"]["instruction-data.json"]["format"] == "alpaca"
    first = clean[0]
    assert first["id"] == "instruction-data.json:1"
    assert first["instruction"] == source[0]["instruction"]
    assert first["messages"][0] == {
        "role": "user",
        "content": f"{source[0]['instruction']}\n\n{source[0]['input']}",
    }
    # Rows sharing instruction+input (20 groups in this file) share a group id.
    by_prompt = {}
    for row in clean:
        by_prompt.setdefault((row["instruction"], row["input"]), set()).add(row["group"])
    assert all(len(groups) == 1 for groups in by_prompt.values())
    assert len({r["group"] for r in clean}) < len(clean)
    meta = ref.meta
    assert ref.figures["rows_in"] == len(source)
    assert ref.figures["rows_out"] == len(clean)
    assert f"{len(clean)} rows kept" in meta["summary"]
    assert ref.file("length_hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["lengths"]["output_chars"]["max"] == max(len(r["output"]) for r in clean)


def test_stanford_alpaca_placeholders_empty_outputs_and_noinput(home, shared_datasets):
    path = shared_datasets / "stanford_alpaca_subsets" / "random_9k.json"
    _, clean, rejects, report = run_validate(path)
    source = _source_rows(path)
    reasons = report["rejects_by_reason"]
    squashed = [r["output"].lower().replace(" ", "") for r in source]
    nooutput = sum(1 for o in squashed if o == "<nooutput>")
    assert nooutput == 12  # documented in SOURCE.md
    assert reasons["placeholder_output"] >= nooutput
    assert reasons["empty_output"] == sum(1 for r in source if not r["output"].strip())
    placeholder_rows = {r["row"] for r in rejects if r["reason"] == "placeholder_output"}
    outputs = [source[n - 1]["output"].lower().replace(" ", "") for n in placeholder_rows]
    assert all("<nooutput" in o or o.strip(".") == "n/a" for o in outputs)
    # '<noinput>' as INPUT means "no input": those rows are kept, with an empty input.
    noinput = [
        i + 1
        for i, r in enumerate(source)
        if r["input"].lower().replace(" ", "").strip("<>.") == "noinput"
    ]
    kept = {r["row"]: r for r in clean}
    assert noinput and all(kept[n]["input"] == "" for n in noinput if n in kept)
    assert sum(n in kept for n in noinput) >= len(noinput) - 2


def test_twelve_thousand_alpaca_rows_take_seconds(home, shared_datasets, tmp_path):
    folder = tmp_path / "alpaca"
    folder.mkdir()
    for name in ("random_9k.json", "cherry_alpaca_5_percent.json"):
        src = shared_datasets / "stanford_alpaca_subsets" / name
        (folder / name).write_bytes(src.read_bytes())
    raw = download(DataConfig(source=str(folder)))
    t0 = time.perf_counter()
    ref = validate(raw, ValidateConfig())
    seconds = time.perf_counter() - t0
    report = json.loads(ref.file("report.json").read_text())
    assert report["rows_in"] == 9229 + 3111
    # 552 rows appear in both files (SOURCE.md): the second copies are exact duplicates.
    assert report["rejects_by_reason"]["duplicate"] >= 552
    print(f"validate: {report['rows_in']} rows in {seconds:.1f}s")
    assert seconds < 45  # measured ~6 s here; the bound leaves room for a busy CI box


def test_self_instruct_one_row_per_instance(home, shared_datasets, tmp_path):
    path = shared_datasets / "self_instruct" / "seed_tasks.jsonl"
    _, clean, _, report = run_validate(path)
    source = _source_rows(path)
    assert report["files"]["seed_tasks.jsonl"]["format"] == "self_instruct"
    assert report["rows_in"] == sum(len(r["instances"]) for r in source)
    row = clean[0]
    assert row["instruction"] == source[0]["instruction"]
    assert row["output"] == source[0]["instances"][0]["output"]
    assert row["meta"]["name"] == source[0]["name"]
    # Several instances per task: one row each, ids numbered within the source line.
    multi = tmp_path / "multi.jsonl"
    multi.write_text(
        json.dumps(
            {
                "instruction": "Add the numbers.",
                "instances": [
                    {"input": "1 2", "output": "3"},
                    {"input": "2 5", "output": "7"},
                    {"input": "4 4", "output": 8},
                ],
            }
        )
        + "\n"
    )
    _, clean, rejects, _ = run_validate(multi, max_reject_fraction=0.5)
    assert [r["id"] for r in clean] == ["multi.jsonl:1.1", "multi.jsonl:1.2"]
    assert [(r["id"], r["reason"]) for r in rejects] == [("multi.jsonl:1.3", "wrong_type")]


def test_sharegpt_multi_turn_and_near_duplicates(home, shared_datasets):
    path = shared_datasets / "sharegpt_fastchat_dummy" / "dummy_conversation.json"
    _, clean, rejects, report = run_validate(path)
    source = _source_rows(path)
    assert report["files"]["dummy_conversation.json"]["format"] == "sharegpt"
    assert report["rows_in"] == len(source)
    first = clean[0]
    turns = source[0]["conversations"]
    assert [m["content"] for m in first["messages"]] == [t["value"] for t in turns]
    assert first["instruction"] == turns[0]["value"] and first["output"] == turns[-1]["value"]
    assert first["input"] == ""
    near = [r for r in rejects if r["reason"] == "near_duplicate"]
    assert near and all(r["detail"].startswith("same as dummy_conversation.json:") for r in near)
    assert {r["reason"] for r in rejects} <= {"duplicate", "near_duplicate"}


def test_alpaca_en_demo_fourteen_exact_duplicates(home, shared_datasets):
    path = shared_datasets / "llamafactory_demo" / "alpaca_en_demo.json"
    _, clean, rejects, report = run_validate(path)
    assert report["rejects_by_reason"].get("duplicate") == 14  # SOURCE.md: 14 full-row dups
    source = _source_rows(path)
    for r in (r for r in rejects if r["reason"] == "duplicate"):
        first_row = int(r["detail"].rsplit(":", 1)[1])
        assert first_row < r["row"]
        assert source[first_row - 1] == source[r["row"] - 1]


def test_openai_messages_with_content_parts_and_extra_fields(home, shared_datasets):
    v1 = shared_datasets / "llamafactory_demo" / "v1_sft_demo.jsonl"
    _, clean, _, report = run_validate(v1)
    assert report["files"]["v1_sft_demo.jsonl"]["format"] == "openai"
    source = _source_rows(v1)
    assert clean[0]["messages"][0] == {
        "role": "user",
        "content": source[0]["messages"][0]["content"][0]["value"],
    }
    kto = shared_datasets / "llamafactory_demo" / "kto_en_demo.json"
    _, clean, _, report = run_validate(kto)
    assert report["files"]["kto_en_demo.json"]["format"] == "openai"
    assert all(isinstance(r["meta"]["label"], bool) for r in clean)
    assert max(len(r["messages"]) for r in clean) > 2


def test_tool_calling_turns_are_rejected_as_unsupported_role(home, shared_datasets):
    path = shared_datasets / "llamafactory_demo" / "glaive_toolcall_en_demo.json"
    with pytest.raises(DataError, match=r"glaive_toolcall_en_demo.json: \d+ of 300 rows invalid"):
        run_validate(path)
    _, clean, rejects, _ = run_validate(path, max_reject_fraction=0.9)
    source = _source_rows(path)
    tool_rows = {
        i + 1
        for i, r in enumerate(source)
        if any(t["from"] in ("function_call", "observation") for t in r["conversations"])
    }
    assert tool_rows == {r["row"] for r in rejects if r["reason"] == "unsupported_role"}
    assert not tool_rows & {r["row"] for r in clean}


def test_prompt_only_conversations_fail_with_file_named(home, shared_datasets):
    path = shared_datasets / "llamafactory_demo" / "dpo_en_demo.json"
    with pytest.raises(DataError, match=r"^dpo_en_demo.json: no valid rows .*no_assistant_turn"):
        run_validate(path)


def test_field_mapping_for_dolly_style_rows(home):
    path = Path(__file__).parent / "data" / "bad" / "unknown_format.jsonl"
    mapping = {"instruction": "instruction", "input": "context", "output": "response"}
    _, clean, rejects, _ = run_validate(
        path, format="mapping", field_mapping={**mapping, "task": "category"}
    )
    source = _source_rows(path)
    assert len(clean) == len(source) and not rejects
    assert clean[0]["input"] == source[0]["context"]
    assert clean[0]["output"] == source[0]["response"]
    assert clean[0]["meta"]["task"] == "closed_qa"
    assert clean[1]["messages"][0]["content"] == source[1]["instruction"]  # empty context
    with pytest.raises(DataError, match="must map output"):
        run_validate(path, format="mapping", field_mapping={"instruction": "instruction"})


def _brute_force(texts: list[str], threshold: float) -> dict[int, int]:
    from sklearn.feature_extraction.text import TfidfVectorizer

    X = TfidfVectorizer(analyzer="char_wb", ngram_range=(5, 5), sublinear_tf=True).fit_transform(
        texts
    )
    sim = (X @ X.T).toarray()
    kept, match = np.ones(len(texts), bool), {}
    for j in range(len(texts)):
        for i in range(j):
            if kept[i] and sim[i, j] >= threshold - 1e-6:
                kept[j] = False
                match[j] = i
                break
    return match


def test_near_duplicates_match_brute_force_cosine():
    # Rare words (most 5-grams in few rows) and very common ones (in every row), so both the
    # sparse rare-part product and the common-part bound are exercised.
    rng = np.random.default_rng(0)
    rare = ["".join(rng.choice(list("abcdefghijklmnop"), size=6)) for _ in range(300)]
    common = "the and of to in is".split()
    texts = []
    for k in range(400):
        words = list(rng.choice(rare, size=rng.integers(2, 8))) + list(rng.choice(common, size=8))
        texts.append(" ".join(words))
        if k % 4 == 0:
            texts.append(" ".join(words[:-1]))  # a near copy
        if k % 50 == 0:
            texts.append(" ".join(common))  # only common n-grams
    for threshold in (0.7, 0.9, 0.95):
        fast = near_duplicates(texts, threshold, block=97)
        assert fast == _brute_force(texts, threshold)
    assert len(near_duplicates(texts, 0.9)) >= 100
