"""Perplexity scores exactly the tokens training trains on, and a token that straddles the
prompt/answer boundary is trained (it carries answer text), for a SentencePiece-style
(Metaspace + BOS) tokenizer and the built-in byte-level one, under every template."""

from __future__ import annotations

import json

import numpy as np
import pytest
from datasets import load_from_disk
from evaluate_fixtures import make_splits

from instructflow import templates as T
from instructflow.artifacts import write_artifact
from instructflow.config import TokenizeConfig
from instructflow.scoring import scored_examples
from tasks.tokenize import IGNORE, boundary_labels, tokenize


def test_boundary_rule_trains_any_token_holding_answer_text():
    # text: "ab\n" (prompt, 3 chars) + "The" (answer) + "!" (prompt); tokens by offsets
    pieces = [(3, False), (3, True), (1, False)]
    offsets = [(0, 2), (2, 4), (4, 6), (6, 7), (7, 7)]  # "ab", "\nT", "he", "!", empty special
    assert boundary_labels(pieces, offsets).tolist() == [False, True, True, False, False]


def metaspace_chat_tokenizer(corpus: list[str]):
    """SentencePiece-style: Metaspace pre-tokenisation, a BOS on every call, ChatML specials,
    merges learned from the rendered training texts (so newlines merge with answer words)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from instructflow.builtin.model import CHATML_TEMPLATE, IM_END, IM_START

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Metaspace()
    specials = ["<unk>", "<s>", "</s>", IM_START, IM_END]
    raw.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=3000, special_tokens=specials))
    raw.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", raw.token_to_id("<s>"))]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=[IM_START, IM_END],
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


@pytest.fixture
def rows(home, shared_datasets, tmp_path):
    from instructflow.config import DataConfig, ValidateConfig
    from instructflow.rows import read_jsonl
    from tasks.download import download
    from tasks.validate import validate

    alpaca = json.loads((shared_datasets / "stanford_alpaca_subsets/random_9k.json").read_text())
    sub = tmp_path / "alpaca.json"
    sub.write_text(json.dumps(alpaca[:150]))
    out = []
    for path in (sub, shared_datasets / "sharegpt_fastchat_dummy/dummy_conversation.json"):
        out += read_jsonl(
            validate(download(DataConfig(source=str(path))), ValidateConfig()).file("clean.jsonl")
        )[:150]
    assert any(len(r["messages"]) > 2 for r in out)
    return out


@pytest.mark.parametrize("template", T.TEMPLATES)
@pytest.mark.parametrize("kind", ["metaspace", "bytelevel"])
def test_scored_ids_are_the_training_ids_and_cover_the_answer(rows, kind, template):
    if kind == "metaspace":
        no_eos = type("Tok", (), {"eos_token": "</s>"})()
        corpus = [T.text(r, t, no_eos) for r in rows for t in ("alpaca", "chatml")]
        tok = metaspace_chat_tokenizer(corpus * 3)
    else:
        from instructflow.builtin.model import build_tokenizer

        tok = build_tokenizer()
    tok_ref = write_artifact("tokenizer", lambda tmp: tok.save_pretrained(str(tmp)) and None)
    tokenized = tokenize(
        make_splits(rows), tok_ref, TokenizeConfig(template=template, max_length=4096)
    )
    report = json.loads(tokenized.file("report.json").read_text())["splits"]["test"]
    assert report["rows"] == len(rows)
    if kind == "metaspace":
        assert report["method"] == "offsets"  # segments tokenise differently alone

    # What evaluate scores is the Arrow test split, row for row: the training ids and labels.
    test = load_from_disk(str(tokenized.file("test")))
    scored = scored_examples(tokenized, None)
    assert scored == list(zip(test["input_ids"], test["labels"], strict=True))

    # Every character of each final answer lies in a trained token, and some answers start
    # inside a token that begins in the prompt (the boundary case) for Metaspace.
    backend = tok.backend_tokenizer
    straddled = 0
    for row, (ids, labels) in zip(rows, scored, strict=True):
        text = T.text(row, template, tok)
        enc = backend.encode(text, add_special_tokens=T.add_special_tokens(template))
        assert enc.ids == ids
        answer = T.reference(row)
        start = len(T.generation_prompt(row, template, tok))
        assert text[start : start + len(answer)] == answer
        spans = np.asarray(enc.offsets)
        trained = np.asarray(labels) != IGNORE
        covered = np.zeros(len(text), dtype=bool)
        for (a, b), t in zip(spans, trained, strict=True):
            covered[a:b] |= t
        assert covered[start : start + len(answer)].all(), (row["id"], answer[:30])
        first = np.flatnonzero((spans[:, 1] > start) & (spans[:, 0] < start + len(answer)))[0]
        straddled += spans[first, 0] < start
    if kind == "metaspace":
        assert straddled > 0
