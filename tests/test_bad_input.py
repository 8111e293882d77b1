"""The bad-input corpus (tests/data/bad/): one-line errors naming the file, or rejects with
reasons, and never a lost row. Big cases (10 MB field, 100K duplicates) are generated in tmp."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from instructflow.config import DataConfig, ValidateConfig
from instructflow.formats import DataError
from tasks.download import download
from tasks.validate import validate

BAD = Path(__file__).parent / "data" / "bad"
ROOT = Path(__file__).resolve().parents[1]


def run(path: Path, **knobs):
    ref = validate(download(DataConfig(source=str(path))), ValidateConfig(**knobs))
    clean = [json.loads(x) for x in ref.file("clean.jsonl").read_text("utf-8").splitlines()]
    rejects = [json.loads(x) for x in ref.file("rejects.jsonl").read_text("utf-8").splitlines()]
    report = json.loads(ref.file("report.json").read_text("utf-8"))
    assert report["rows_in"] == len(clean) + len(rejects)
    return ref, clean, rejects


FATAL = [
    ("truncated.json", r"invalid JSON at line \d+ column \d+"),
    ("top_level_object.json", r"top level is a JSON object \(keys: data\)"),
    ("top_level_number.json", r"top level is a JSON number"),
    ("empty.json", r"no rows \(the file is empty\)"),
    ("whitespace.jsonl", r"no rows \(the file is only whitespace\)"),
    ("binary.json", r"binary data, not text \(NUL byte at byte \d+\)"),
    ("invalid_utf8.json", r"not valid UTF-8 at byte \d+"),
    ("html_page.json", r"looks like HTML"),
    ("all_placeholders.json", r"no valid rows \(5 rejected: placeholder_output 5\)"),
    (
        "unknown_format.jsonl",
        r"unknown format \(fields seen: instruction, context, response, category\); "
        r"set validate.format=mapping with validate.field_mapping",
    ),
]


@pytest.mark.parametrize("name,pattern", FATAL, ids=[f for f, _ in FATAL])
def test_unusable_files_fail_with_one_line_naming_the_file(home, name, pattern):
    with pytest.raises(DataError) as err:
        run(BAD / name)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{name}: ")
    assert len(message) < 300
    assert re.search(pattern, message), message


def _count_source_rows(path: Path) -> int:
    if path.suffix == ".jsonl":
        return sum(1 for line in path.read_bytes().splitlines() if line.strip())
    if path.suffix == ".csv":
        import csv

        return sum(1 for _ in csv.DictReader(path.open(newline="", encoding="utf-8")))
    raw = path.read_bytes()
    text = raw.decode("utf-16") if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else raw.decode()
    return len(json.loads(text))


# file -> (rows kept, {(row, reason), ...}); kept + rejected == rows in the file.
ROW_LEVEL = {
    "one_bad_line.jsonl": (5, {(3, "invalid_json")}),
    "invalid_utf8_line.jsonl": (3, {(2, "undecodable")}),
    "wrong_types.json": (4, {(5, "wrong_type"), (6, "wrong_type"), (7, "wrong_type")}),
    "missing_fields.json": (4, {(5, "missing_field"), (6, "missing_field"), (7, "not_an_object")}),
    "non_object_row.json": (3, {(4, "not_an_object")}),
    "lone_surrogate.json": (3, {(4, "undecodable")}),
    "utf16_bom.json": (5, set()),
    "crlf.jsonl": (4, set()),
    "crlf.csv": (4, set()),
    "html_markdown.json": (3, set()),
}


@pytest.mark.parametrize("name", sorted(ROW_LEVEL))
def test_row_level_problems_become_rejects_and_good_rows_stay(home, name):
    kept, expected = ROW_LEVEL[name]
    _, clean, rejects = run(BAD / name)
    assert len(clean) == kept
    assert {(r["row"], r["reason"]) for r in rejects} == expected
    assert len(clean) + len(rejects) == _count_source_rows(BAD / name)
    for r in rejects:
        assert r["file"] == name and r["detail"]


def test_wrong_type_and_missing_field_details_name_the_field(home):
    _, _, rejects = run(BAD / "wrong_types.json")
    details = {r["row"]: r["detail"] for r in rejects}
    assert details[5] == "'output' is a number, expected a string"
    assert details[6] == "'instruction' is a list, expected a string"
    assert details[7] == "'input' is a null, expected a string"
    _, _, rejects = run(BAD / "missing_fields.json")
    assert {r["row"]: r["detail"] for r in rejects}[5] == "'output'"
    _, _, rejects = run(BAD / "one_bad_line.jsonl")
    assert rejects[0]["detail"].startswith("line 3 column ")


def test_text_is_kept_verbatim_across_encodings_and_markup(home):
    _, clean, _ = run(BAD / "html_markdown.json")
    source = json.loads((BAD / "html_markdown.json").read_text())
    assert [r["output"] for r in clean] == [r["output"] for r in source]
    assert (
        clean[0]["messages"][0]["content"] == f"{source[0]['instruction']}\n\n{source[0]['input']}"
    )
    _, clean, _ = run(BAD / "utf16_bom.json")
    assert clean[-1]["output"] == "café"
    _, clean, _ = run(BAD / "crlf.csv")
    assert clean[-1]["output"] == "line one\r\nline two, with a comma"
    _, clean, _ = run(BAD / "crlf.jsonl")
    assert not any("\r" in r["output"] for r in clean)


def test_parquet_source(home, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("one", "two", "two")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    _, clean, rejects = run(tmp_path / "d.parquet")
    assert [r["output"] for r in clean] == ["one", "two"]
    assert [(r["row"], r["reason"]) for r in rejects] == [(3, "duplicate")]
    (tmp_path / "broken.parquet").write_bytes(b"PAR1" + b"\x00" * 64)
    with pytest.raises(DataError, match=r"^broken.parquet: not a readable Parquet file"):
        run(tmp_path / "broken.parquet")


def test_ten_megabyte_field_is_rejected_too_long_without_bloating_rejects(home, tmp_path):
    path = tmp_path / "huge.json"
    rows = [
        {"instruction": f"Name the number {i}.", "input": "", "output": f"It is {i}."}
        for i in range(5)
    ]
    rows.insert(2, {"instruction": "Repeat x.", "input": "", "output": "x" * 10_000_000})
    path.write_text(json.dumps(rows))
    ref, clean, rejects = run(path)
    assert len(clean) == 5
    assert [(r["row"], r["reason"]) for r in rejects] == [(3, "too_long")]
    assert "10000009 chars > validate.max_chars=20000" in rejects[0]["detail"]
    assert ref.file("rejects.jsonl").stat().st_size < 10_000
    assert rejects[0]["data"]["output"].endswith("…[+9998000 chars]")


def test_hundred_thousand_duplicate_rows_are_fast_and_keep_one(home, tmp_path):
    path = tmp_path / "dups.jsonl"
    line = json.dumps({"instruction": "Say hello.", "input": "", "output": "Hello!"}) + "\n"
    # Case and whitespace differences are still duplicates.
    variant = json.dumps({"instruction": "say   HELLO.", "input": "", "output": "hello!"}) + "\n"
    path.write_text(line * 50_000 + variant * 50_000)
    raw = download(DataConfig(source=str(path)))
    t0 = time.perf_counter()
    ref = validate(raw, ValidateConfig())
    seconds = time.perf_counter() - t0
    report = json.loads(ref.file("report.json").read_text())
    assert report["rows_in"] == 100_000
    assert report["rows_out"] == 1
    assert report["rejects_by_reason"] == {"duplicate": 99_999}
    assert seconds < 60, seconds  # measured ~5 s here


def test_reject_fraction_limit_names_the_file(home, tmp_path):
    rows = [{"instruction": f"Q{i}?", "input": "", "output": "<nooutput>"} for i in range(6)]
    rows += [{"instruction": f"Question {i}?", "input": "", "output": f"A{i}"} for i in range(4)]
    path = tmp_path / "mostly_bad.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"^mostly_bad.json: 6 of 10 rows invalid \(60% > "):
        run(path)
    _, clean, rejects = run(path, max_reject_fraction=0.7)
    assert len(clean) == 4 and len(rejects) == 6


def _cli(home: Path, source: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "INSTRUCTFLOW_HOME": str(home)}
    for var in [v for v in env if v.startswith(("PREFECT_", "MLFLOW_"))]:
        if var != "PREFECT_API_URL":  # the session's server; else the CLI starts one that stays
            env.pop(var)  # the CLI sets up its own workspace
    cmd = [sys.executable, "-m", "instructflow.cli", "--home", str(home), "run", "--plain"]
    cmd += ["--until", "validate", "--set", f"data.source={source}"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_reports_one_error_line_and_no_traceback(tmp_path):
    # One CLI case only (a process start costs seconds); the in-process flow test below
    # covers the other messages.
    name = "binary.json"
    proc = _cli(tmp_path / "home", BAD / name)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert name in errors[0] and "validate failed" in errors[0]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_flow_runs_validate_caches_it_and_fails_in_one_line(home, tmp_path):
    from flows.run import run_finetune
    from instructflow.pipeline import StageFailed

    good = [f"data.source={BAD / 'crlf.jsonl'}"]
    first = run_finetune(None, good, until="validate")
    assert first["stages"]["validate"]["state"] == "Completed"
    assert first["metrics"]["validate/rows_out"] == 4
    assert first["metrics"]["validate/rows_in"] == 4
    again = run_finetune(None, good, until="validate")
    assert again["stages"]["validate"]["state"] == "Cached"
    knob = run_finetune(None, [*good, "validate.max_chars=5000"], until="validate")
    assert knob["stages"]["download"]["state"] == "Cached"
    assert knob["stages"]["validate"]["state"] == "Completed"
    with pytest.raises(StageFailed) as err:
        run_finetune(None, [f"data.source={BAD / 'unknown_format.jsonl'}"], until="validate")
    assert err.value.reason.startswith("unknown_format.jsonl: unknown format (fields seen:")
    assert "\n" not in str(err.value)


def _unusable_source(kind: str, tmp_path: Path) -> str:
    if kind == "folder without data":
        (tmp_path / "folder").mkdir()
        (tmp_path / "folder" / "notes.txt").write_text("not data")
        return str(tmp_path / "folder")
    if kind == "fifo":
        os.mkfifo(tmp_path / "pipe.json")  # reading it would block forever
        return str(tmp_path / "pipe.json")
    if kind == "closed port":
        import socket

        with socket.socket() as s:  # a port nobody listens on once this closes
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return f"http://127.0.0.1:{port}/data.json"
    return "/dev/zero"


UNUSABLE = {
    "folder without data": "folder holds no .json/.jsonl/.csv/.parquet files",
    "device": "not a regular file or folder (a device, FIFO or socket)",
    "fifo": "not a regular file or folder (a device, FIFO or socket)",
    "closed port": "cannot connect to 127.0.0.1 (Connection refused)",
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(UNUSABLE))
def test_an_unusable_source_is_refused_at_once_before_anything_is_written(tmp_path, kind):
    from instructflow.sources import SourceError, source_kind

    source = _unusable_source(kind, tmp_path)
    t0 = time.monotonic()
    with pytest.raises(SourceError, match=re.escape(UNUSABLE[kind])):
        source_kind(source)
    assert time.monotonic() - t0 < 1
    home = tmp_path / "home"
    t0 = time.monotonic()
    proc = _cli(home, Path(source) if "://" not in source else source)
    assert time.monotonic() - t0 < 20  # a process start; the check itself is instant
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {source}: {UNUSABLE[kind]}"], proc.stderr[-2000:]
    assert not [p for p in home.rglob("*") if p.is_file()]
