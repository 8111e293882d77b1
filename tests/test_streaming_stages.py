"""The data stages stream their rows in pieces (bounded memory on millions of rows): what
they write never depends on where the pieces are cut, and equals the in-memory functions'
results on real rows."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from instructflow import formats
from instructflow.config import AugmentConfig, DataConfig, SplitConfig, ValidateConfig
from instructflow.rows import read_jsonl
from tasks import validate as validate_module
from tasks.augment import augment, augment_rows
from tasks.download import download
from tasks.split import SPLITS, read_split, split, split_rows
from tasks.validate import validate


def _alpaca(shared_datasets, n: int) -> list[dict]:
    path = shared_datasets / "stanford_alpaca_subsets" / "random_9k.json"
    return json.loads(path.read_text(encoding="utf-8"))[:n]


def _pieces(path, name, size):
    records, rejects = [], []
    for piece in formats.iter_parsed(path, name, size):
        records += [(r.row, r.value) for r in piece.records]
        rejects += [(r.row, r.reason, r.detail) for r in piece.rejects]
    return records, rejects


def test_jsonl_and_parquet_pieces_hold_what_read_file_reads(tmp_path):
    lines = [json.dumps({"instruction": f"q{k}", "output": f"a{k}"}).encode() for k in range(10)]
    lines[3] = b'{"instruction": "broken'
    lines[6] = b"\xff\xfe not utf-8"
    lines[8] = b"   "
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    whole = formats.read_file(path, "rows.jsonl")
    want = ([(r.row, r.value) for r in whole.records],
            [(r.row, r.reason, r.detail) for r in whole.rejects])  # fmt: skip
    assert len(want[0]) == 7 and len(want[1]) == 2
    for size in (1, 3, 100):
        assert _pieces(path, "rows.jsonl", size) == want

    table = pa.table({"instruction": [f"q{k}" for k in range(7)], "output": ["a"] * 7})
    pq.write_table(table, tmp_path / "rows.parquet", row_group_size=2)
    whole = formats.read_file(tmp_path / "rows.parquet", "rows.parquet")
    pieces = _pieces(tmp_path / "rows.parquet", "rows.parquet", 2)
    assert pieces[0] == [(r.row, r.value) for r in whole.records] and len(pieces[0]) == 7


def test_a_jsonl_file_without_a_good_line_fails_in_one_line_after_streaming(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"{nope\n[1,\n")
    with pytest.raises(formats.DataError, match="bad.jsonl: invalid JSON Lines, no line parses"):
        _pieces(path, "bad.jsonl", 1)


def test_validate_writes_the_same_artifact_whatever_the_piece_size(
    home, tmp_path, shared_datasets, monkeypatch
):
    rows = _alpaca(shared_datasets, 1500)
    bad = [{"instruction": "", "output": "x"}, {"instruction": 3}, {"output": "no instruction"}]
    lines = [json.dumps(r) for r in rows + bad + rows[:40]]
    lines.insert(700, "{not json")
    (tmp_path / "alpaca.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    raw = download(DataConfig(source=str(tmp_path / "alpaca.jsonl")))
    for lsh_min_rows in (None, 2):  # the exact near-duplicate search and MinHash + LSH
        cfg = ValidateConfig(lsh_min_rows=lsh_min_rows)
        whole = validate(raw, cfg)
        monkeypatch.setattr(validate_module, "PIECE_ROWS", 97)
        pieces = validate(raw, cfg)
        monkeypatch.undo()
        assert pieces.digest == whole.digest
        report = json.loads(whole.file("report.json").read_text())
        assert report["rejects_by_reason"]["duplicate"] >= 40
        assert report["rejects_by_reason"]["invalid_json"] == 1
        rejects = read_jsonl(whole.file("rejects.jsonl"))
        assert len(rejects) == report["rejected"] and report["rows_in"] == len(lines)
        clean = read_jsonl(whole.file("clean.jsonl"))
        assert len(clean) == report["rows_out"] and not (tmp_path / ".scratch").exists()


def _canonical_rows(shared_datasets, n: int) -> list[dict]:
    out = []
    for k, r in enumerate(_alpaca(shared_datasets, n)):
        prompt = f"{r['instruction']}\n{r['input']}".strip()
        out.append({
            "id": f"a:{k}", "group": f"g{k % (n - 40)}", "augmented_from": None,
            "instruction": r["instruction"], "input": r["input"], "output": r["output"],
            "messages": [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": r["output"]}],
            "meta": {"kind": str(k % 3)},
        })  # fmt: skip
    return out


@pytest.mark.parametrize("lsh_min_rows", [None, 2])
def test_the_split_stage_streams_what_split_rows_returns(home, tmp_path, shared_datasets,
                                                         lsh_min_rows):  # fmt: skip
    rows = augment_rows(_canonical_rows(shared_datasets, 1200), AugmentConfig(fraction=0.2))
    rng = random.Random(0)
    for k in rng.sample(range(len(rows)), 60):  # near copies in other groups: contamination
        copy = json.loads(json.dumps(rows[k]))
        copy["messages"][0]["content"] = copy["messages"][0]["content"].upper()
        rows.append({**copy, "id": f"copy:{k}", "group": f"copy{k}"})
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ref = augment(_ref(tmp_path, "rows.jsonl"), AugmentConfig(enabled=False))
    cfg = SplitConfig(lsh_min_rows=lsh_min_rows, seed=5, stratify_by="meta.kind")
    parts, report = split_rows(rows, cfg)
    streamed = split(ref, cfg)
    assert json.loads(streamed.file("report.json").read_text()) == report
    assert report["decontaminated"] > 0 and report["augmented_dropped_from_eval"] > 0
    assert report["stratified"] and sum(report["strata"]["train"].values()) == len(parts["train"])
    for name in SPLITS:
        assert [r["id"] for r in read_split(streamed, name)] == [r["id"] for r in parts[name]]


def _ref(folder, name):
    """A stand-in 'validate' artifact whose clean.jsonl is folder/name."""
    from instructflow.artifacts import write_artifact

    return write_artifact(
        "validate", lambda tmp: (tmp / "clean.jsonl").write_bytes((folder / name).read_bytes())
    )


def test_the_augment_stage_streams_what_augment_rows_returns(home, tmp_path, shared_datasets):
    rows = _canonical_rows(shared_datasets, 800)
    rows[5]["messages"].insert(0, {"role": "user", "content": "first turn"})  # not augmented
    (tmp_path / "clean.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = AugmentConfig(fraction=0.3, seed=2)
    out = augment(_ref(tmp_path, "clean.jsonl"), cfg)
    want = augment_rows(rows, cfg)
    assert read_jsonl(out.file("rows.jsonl")) == want
    assert out.meta["figures"]["augmented"] == len(want) - len(rows) > 200


def test_a_logged_dataset_counts_every_row_but_reads_only_the_first(home, monkeypatch):
    import mlflow
    from instructflow import tracking
    from instructflow.artifacts import write_artifact

    monkeypatch.setattr(tracking, "SCHEMA_ROWS", 5)
    rows = [{"id": str(k), "messages": [{"role": "user", "content": "x"}]} for k in range(25)]
    ref = write_artifact(
        "validate",
        lambda tmp: (tmp / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows)),
    )
    with mlflow.start_run() as run:
        tracking._log_dataset(ref, {"file": "rows.jsonl", "name": "rows", "context": "train"})
    (logged,) = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    assert json.loads(logged.dataset.profile)["num_rows"] == 25
    assert {c["name"] for c in json.loads(logged.dataset.schema)["mlflow_colspec"]} == {
        "id",
        "messages",
    }
