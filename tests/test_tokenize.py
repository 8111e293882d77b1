"""tokenize: segment-wise batched tokenisation equals whole-text tokenisation; labels; Arrow."""

from __future__ import annotations

import json
import re

import pytest

from instructflow import templates as T
from instructflow.artifacts import write_artifact
from instructflow.config import DataConfig, SplitConfig, TokenizeConfig, ValidateConfig
from instructflow.rows import read_jsonl
from tasks.tokenize import IGNORE, encode_rows, tokenize


@pytest.fixture(scope="module")
def tok():
    from instructflow.builtin.model import build_tokenizer

    return build_tokenizer()


def clean_rows(path, n: int | None = None) -> list[dict]:
    """Real files through the real download + validate stages (needs the `home` fixture)."""
    from tasks.download import download
    from tasks.validate import validate

    ref = validate(download(DataConfig(source=str(path))), ValidateConfig())
    return read_jsonl(ref.file("clean.jsonl"))[:n]


@pytest.fixture
def real_rows(home, shared_datasets, tmp_path):
    """Single-turn Alpaca rows and multi-turn ShareGPT rows, canonicalised by validate."""
    alpaca = json.loads((shared_datasets / "stanford_alpaca_subsets/random_9k.json").read_text())
    sub = tmp_path / "alpaca.json"
    sub.write_text(json.dumps(alpaca[:400]))
    chats = clean_rows(shared_datasets / "sharegpt_fastchat_dummy/dummy_conversation.json")
    assert any(len(r["messages"]) > 2 for r in chats)
    return clean_rows(sub) + chats


@pytest.mark.parametrize("template", T.TEMPLATES)
def test_segment_ids_equal_whole_text_tokenisation_on_real_data(real_rows, tok, template):
    cfg = TokenizeConfig(template=template, max_length=4096)
    table, counts = encode_rows(real_rows, tok, cfg)
    assert counts["method"] == "segments" and counts["rows"] == len(real_rows)
    texts = [T.text(r, template, tok) for r in real_rows]
    whole = tok(texts, add_special_tokens=T.add_special_tokens(template))["input_ids"]
    assert table.column("input_ids").to_pylist() == whole
    assert table.column("length").to_pylist() == [len(w) for w in whole]


@pytest.mark.parametrize("template", T.TEMPLATES)
def test_labels_mask_the_prompt_and_train_the_answer_and_end_token(real_rows, tok, template):
    row = real_rows[0]
    table, _ = encode_rows([row], tok, TokenizeConfig(template=template))
    ids, labels = table.column("input_ids")[0].as_py(), table.column("labels")[0].as_py()
    prompt = tok(T.generation_prompt(row, template, tok), add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt)] == prompt
    assert set(labels[: len(prompt)]) == {IGNORE}
    trained = [t for t in labels if t != IGNORE]
    eot = tok.convert_tokens_to_ids(T.end_of_turn_token(template, tok))
    assert trained[-1] == eot
    assert tok.decode(trained[:-1]).strip() == T.reference(row)
    on_inputs, _ = encode_rows([row], tok, TokenizeConfig(template=template, train_on_inputs=True))
    assert on_inputs.column("labels")[0].as_py() == ids


def test_multi_turn_chatml_trains_every_assistant_turn(real_rows, tok):
    row = next(r for r in real_rows if len(r["messages"]) >= 4)
    table, _ = encode_rows([row], tok, TokenizeConfig(template="chatml"))
    labels = table.column("labels")[0].as_py()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    n_assistant = sum(m["role"] == "assistant" for m in row["messages"])
    assert sum(t == im_end for t in labels) == n_assistant


def test_truncation_policy_drop_or_truncate_with_counts(tok):
    rows = [
        {"id": f"r{i}", "instruction": "Repeat.", "input": "", "output": "word " * n}
        for i, n in enumerate([2, 5, 200, 400])
    ]
    dropped, c1 = encode_rows(rows, tok, TokenizeConfig(max_length=64, truncation="drop"))
    assert (c1["rows"], c1["dropped_too_long"], c1["truncated"]) == (2, 2, 0)
    cut, c2 = encode_rows(rows, tok, TokenizeConfig(max_length=64, truncation="truncate"))
    assert (c2["rows"], c2["dropped_too_long"], c2["truncated"]) == (4, 0, 2)
    assert max(cut.column("length").to_pylist()) == 64
    assert dropped.column("input_ids").to_pylist() == cut.column("input_ids").to_pylist()[:2]
    # A prompt longer than max_length leaves nothing to train on: dropped and counted.
    long_prompt = [{"id": "p", "instruction": "x " * 200, "input": "", "output": "ok"}]
    _, c3 = encode_rows(long_prompt, tok, TokenizeConfig(max_length=64, truncation="truncate"))
    assert (c3["rows"], c3["dropped_no_target"]) == (0, 1)


def metaspace_tokenizer():
    """A SentencePiece-style tokenizer (Metaspace, prepends "▁" per call) that adds a BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"])
    corpus = ["Below is an instruction that describes a task. Write a response.", "### Response:"]
    raw.train_from_iterator(corpus * 50 + ["Sort the numbers 3, 1, 2 in order"] * 10, trainer)
    raw.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", raw.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_tokenizers_where_segments_differ_fall_back_to_whole_text_offsets():
    tok = metaspace_tokenizer()
    rows = [
        {"id": "a", "instruction": "Sort the numbers.", "input": "3, 1, 2", "output": "1, 2, 3"},
        {"id": "b", "instruction": "Say it.", "input": "", "output": "Sort"},
    ]
    table, counts = encode_rows(rows, tok, TokenizeConfig(template="alpaca"))
    assert counts["method"] == "offsets"
    texts = [T.text(r, "alpaca", tok) for r in rows]
    whole = tok(texts)["input_ids"]  # with the tokenizer's own BOS
    assert whole[0][0] == tok.bos_token_id
    assert table.column("input_ids").to_pylist() == whole
    labels = table.column("labels")[1].as_py()
    assert labels[0] == IGNORE and labels[-1] == tok.eos_token_id
    assert tok.decode([t for t in labels if t != IGNORE], skip_special_tokens=True) == "Sort"


def demo_split(n: int):
    """A split artifact of n demo rows (canonical form)."""
    from instructflow import demo_data
    from tasks.split import split

    rows = [
        {"id": f"d:{i}", "instruction": r["instruction"], "input": r["input"],
         "output": r["output"], "group": f"g{i}", "augmented_from": None, "meta": {}}
        for i, r in enumerate(demo_data.generate(n, 0))
    ]  # fmt: skip

    def write(tmp):
        (tmp / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    return split(write_artifact("augment", write), SplitConfig())


def test_stage_writes_arrow_splits_report_and_histogram_deterministically(home):
    from datasets import load_from_disk

    from instructflow.config import ModelConfig
    from tasks.base_model import prepare_tokenizer
    from tasks.split import SPLITS, read_split

    splits, tokenizer = demo_split(120), prepare_tokenizer(ModelConfig())
    cfg = TokenizeConfig(template="chatml", max_length=64)
    ref = tokenize(splits, tokenizer, cfg)
    for name in SPLITS:
        ds = load_from_disk(str(ref.file(name)))
        assert ds.column_names == ["input_ids", "labels", "length"]
        assert str(ds.features["input_ids"].feature.dtype) == "int32"
        assert len(ds) == len(read_split(splits, name))
        row = ds[0]
        assert len(row["input_ids"]) == len(row["labels"]) == row["length"] <= 64
    report = json.loads(ref.file("report.json").read_text())
    metrics = ref.figures
    assert report["method"] == ["segments"] and metrics["rows"] == 120
    for key in ("tokens", "dropped_too_long", "truncated", "mean_length", "p50_length",
                "p95_length", "max_length", "trainable_fraction"):  # fmt: skip
        assert key in metrics
    assert 0 < metrics["trainable_fraction"] < 1
    assert ref.file("token_hist.png").read_bytes()[:4] == b"\x89PNG"
    assert {"report.json", "token_hist.png"} <= set(ref.meta["log_files"])
    # Same inputs -> byte-identical artifact (content-addressed: same digest).
    assert tokenize(splits, tokenizer, cfg).digest == ref.digest
    assert tokenize(splits, tokenizer, cfg.model_copy(update={"max_length": 65})).digest != (
        ref.digest
    )


def test_nothing_left_to_train_fails_in_one_line(home):
    from instructflow.config import ModelConfig
    from tasks.base_model import prepare_tokenizer

    with pytest.raises(ValueError, match="no training examples left.*tokenize.max_length=8"):
        tokenize(demo_split(40), prepare_tokenizer(ModelConfig()), TokenizeConfig(max_length=8))


def test_threaded_batch_gives_the_same_ids_and_restores_the_setting(tok, monkeypatch):
    import os

    import tasks.tokenize as tk

    texts = [f"Sort {i}, {i * 7 % 5} and {i * 3}." for i in range(300)]
    single = tk.encode_batch(tok.backend_tokenizer, texts)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert tk.encode_batch(tok.backend_tokenizer, texts) == single
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"


def test_small_batches_save_one_shard_each_with_the_one_batch_rows_and_figures(home, tmp_path):
    from pathlib import Path

    from datasets import load_from_disk

    from instructflow.arrow_io import save_table
    from instructflow.config import ModelConfig
    from instructflow.loading import load_tokenizer
    from tasks.base_model import prepare_tokenizer
    from tasks.split import SPLITS, read_split

    splits, tokenizer = demo_split(60), prepare_tokenizer(ModelConfig())
    whole_cfg = TokenizeConfig(template="chatml", max_length=64)
    small_cfg = whole_cfg.model_copy(update={"batch_rows": 7})
    whole, small = tokenize(splits, tokenizer, whole_cfg), tokenize(splits, tokenizer, small_cfg)
    n_train = len(read_split(splits, "train"))
    shards = sorted(p.name for p in small.file("train").glob("*.arrow"))
    n = -(-n_train // 7)
    assert n > 3 and shards == [f"data-{i:05d}-of-{n:05d}.arrow" for i in range(n)]
    for name in SPLITS:
        got, want = load_from_disk(str(small.file(name))), load_from_disk(str(whole.file(name)))
        for col in ("input_ids", "labels", "length"):
            assert got[col] == want[col]
    assert small.file("report.json").read_text() == whole.file("report.json").read_text()
    assert small.figures == whole.figures
    # No scratch left behind, and equal data gives the same bytes again.
    assert not [p for p in Path(small.path).rglob("*") if p.name.startswith(".")]
    assert tokenize(splits, tokenizer, small_cfg).digest == small.digest
    # A split of one batch is saved exactly as save_table saves the whole split's table.
    rows = read_split(splits, "validation")
    assert len(rows) <= 7
    save_table(encode_rows(rows, load_tokenizer(tokenizer), small_cfg)[0], tmp_path / "one")
    one = {f.name: f.read_bytes() for f in (tmp_path / "one").iterdir()}
    assert {f.name: f.read_bytes() for f in small.file("validation").iterdir()} == one


def test_rows_longer_than_the_limit_are_explained_with_the_lengths_and_the_override(home):
    from instructflow.config import ModelConfig
    from tasks.base_model import prepare_tokenizer

    splits, tokenizer = demo_split(120), prepare_tokenizer(ModelConfig())
    cfg = TokenizeConfig(template="chatml", max_length=24)  # demo rows run 14-34 tokens
    ref = tokenize(splits, tokenizer, cfg)
    m = ref.figures
    dropped = m["dropped_too_long"]
    assert 0 < dropped < 120 and m["rows"] == 120 - dropped
    # Where each split's drops were recorded before, they still are.
    report = json.loads(ref.file("report.json").read_text())
    assert sum(s["dropped_too_long"] for s in report["splits"].values()) == dropped
    (note,) = ref.meta["warnings"]
    assert ref.meta["summary"] == f"{m['rows']} examples, {m['tokens']} tokens; {note}"
    assert note.startswith(
        f"{dropped} of 120 rows ({100 * dropped / 120:.1f} %) dropped: longer than "
        f"tokenize.max_length=24 tokens (the data's token lengths: "
        f"p95 {m['input_p95_length']:.0f}, p99 {m['input_p99_length']:.0f}, "
        f"max {m['input_max_length']}); --set tokenize.max_length="
    )
    assert note.endswith(
        " keeps all of them (or --set tokenize.truncation=truncate cuts them instead of "
        "dropping them)"
    )
    suggested = int(re.search(r"--set tokenize.max_length=(\d+) keeps", note).group(1))
    assert m["input_max_length"] <= suggested < m["input_max_length"] + 8
    # The override it names does keep every row, and then there is nothing to say.
    again = tokenize(splits, tokenizer, cfg.model_copy(update={"max_length": suggested}))
    assert again.figures["rows"] == 120 and again.meta["warnings"] == []


def test_the_cli_warns_about_length_drops_when_tokenize_runs_and_when_cached(home):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from flows.run import run_finetune
    from instructflow import cli, progress

    sets = ["data.demo_rows=60", "tokenize.max_length=80"]  # demo rows run ~40-100 tokens
    finished: list[dict] = []

    def listen(event: str, payload: dict) -> None:
        if event == "stage_finished" and payload.get("stage") == "tokenize":
            finished.append(dict(payload))

    # The run that tokenizes (in-process: a CLI start is 5-10 s more), then the CLI's rerun,
    # where tokenize is Cached and the warning must still be printed.
    progress.subscribe(listen)
    try:
        first = run_finetune(cli.resolve_config(cli.DEFAULT_CONFIG), sets, "tokenize")
    finally:
        progress.unsubscribe(listen)
    assert first["stages"]["tokenize"]["state"] == "Completed"
    (note,) = finished[0]["warnings"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cmd = [sys.executable, "-m", "instructflow.cli", "--home", str(home), "run", "--plain"]
    cmd += ["--until", "tokenize", *(a for item in sets for a in ("--set", item))]
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert any(re.match(r"tokenize\s+Cached\s", ln) for ln in lines), out.stdout
    assert [ln for ln in lines if ln.startswith("warning: tokenize: ")] == [
        f"warning: tokenize: {note}"
    ]
    assert re.match(
        r"\d+ of \d+ rows \(\d+\.\d %\) dropped: longer than tokenize\.max_length=80 tokens "
        r"\(the data's token lengths: p95 \d+, p99 \d+, max \d+\); "
        r"--set tokenize\.max_length=\d+ keeps ",
        note,
    ), note
