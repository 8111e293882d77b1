"""instructflow.fast_bpe: tiktoken twins of byte-level BPE tokenizers, and the tokenize stage's
use of them (same ids as the tokenizer itself, or a fallback to it)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from instructflow import fast_bpe
from instructflow import templates as T
from instructflow.config import TokenizeConfig
from tasks.tokenize import encode_rows

TEXTS = [
    "Sort the numbers: 3, 1, 2.",
    "",
    "  leading spaces and trailing   ",
    "Unicode: naïve café, 数字, emoji 🙂 and tabs\tnew\nlines\n\n",
    "ends with the special <|endoftext|> and <|im_start|>user in the middle",
    "don't we'll it's I'm they've 12345 3.14",
]


@pytest.fixture(scope="module")
def tok():
    from instructflow.builtin.model import build_tokenizer

    return build_tokenizer()


def hf_ids(tok, texts):
    return [e.ids for e in tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]


def split(flat, lengths):
    starts = np.concatenate([[0], np.cumsum(lengths)])
    return [flat[a:b].tolist() for a, b in zip(starts[:-1], starts[1:], strict=True)]


def llama3_style_tokenizer(corpus):
    """A Split-regex + regex-free ByteLevel BPE (the Llama 3 / Qwen 2 layout), trained here."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    pattern = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
        r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", pad_token="<|end|>")


def test_builtin_tokenizer_has_a_twin_with_identical_ids(tok, shared_datasets):
    fast = fast_bpe.for_backend(tok.backend_tokenizer)
    assert fast is not None
    assert fast_bpe.for_backend(tok.backend_tokenizer) is fast  # built once per backend
    rows = json.loads((shared_datasets / "stanford_alpaca_subsets/random_9k.json").read_text())
    texts = TEXTS + [r[k] for r in rows[:1500] for k in ("instruction", "input", "output")]
    flat, lengths = fast.encode(texts, threads=3)
    assert flat.dtype == np.int32 and len(lengths) == len(texts)
    assert split(flat, lengths) == hf_ids(tok, texts)


def test_split_regex_byte_level_tokenizer_is_mirrored(shared_datasets):
    rows = json.loads((shared_datasets / "stanford_alpaca_subsets/random_9k.json").read_text())
    corpus = [r["instruction"] + "\n" + r["output"] for r in rows[:2000]]
    tok = llama3_style_tokenizer(corpus)
    fast = fast_bpe.for_backend(tok.backend_tokenizer)
    assert fast is not None
    texts = TEXTS + [r["output"] for r in rows[2000:2600]]
    assert split(*fast.encode(texts)) == hf_ids(tok, texts)


def test_tokenizers_tiktoken_cannot_mirror_get_none():
    from test_tokenize import metaspace_tokenizer

    assert fast_bpe.for_backend(metaspace_tokenizer().backend_tokenizer) is None


def test_text_with_the_chunk_separator_is_refused(tok):
    fast = fast_bpe.for_backend(tok.backend_tokenizer)
    with pytest.raises(ValueError, match="separator"):
        fast.encode(["fine", "not " + fast_bpe.SEPARATOR])


# Rows whose own text spells a special token are encoded by the tokenizer's backend with
# special tokens split (special_text): the twin's equality is checked on the others.
ROW_TEXTS = [t for t in TEXTS if "<|" not in t]


def rows_of(texts):
    return [
        {"id": str(i), "instruction": t or "x", "input": "", "output": t[::-1] or "y"}
        for i, t in enumerate(texts)
    ]


def test_tokenize_uses_the_twin_and_matches_the_tokenizer_engine(tok):
    rows = rows_of(ROW_TEXTS * 3)
    auto, counts = encode_rows(rows, tok, TokenizeConfig(template="alpaca"))
    plain, plain_counts = encode_rows(
        rows, tok, TokenizeConfig(template="alpaca", engine="tokenizers")
    )
    assert counts["engine"] == "tiktoken" and plain_counts["engine"] == "tokenizers"
    assert auto.equals(plain)
    whole = tok([T.text(r, "alpaca", tok) for r in rows], add_special_tokens=False)["input_ids"]
    assert auto.column("input_ids").to_pylist() == whole


def test_a_twin_that_disagrees_on_the_sample_is_not_used(tok, monkeypatch):
    fast = fast_bpe.for_backend(tok.backend_tokenizer)
    real = fast.encode

    def off_by_one(texts, threads=None):
        flat, lengths = real(texts, threads)
        flat = flat.copy()
        flat[-1] = (flat[-1] + 1) % 900  # the last distinct text: always in the sample
        return flat, lengths

    monkeypatch.setattr(fast, "encode", off_by_one)
    rows = rows_of(ROW_TEXTS)
    table, counts = encode_rows(rows, tok, TokenizeConfig(template="alpaca"))
    assert counts["engine"] == "tokenizers"
    whole = tok([T.text(r, "alpaca", tok) for r in rows], add_special_tokens=False)["input_ids"]
    assert table.column("input_ids").to_pylist() == whole


def test_a_row_spelling_a_special_token_is_encoded_as_text_without_the_twin(tok):
    rows = rows_of(TEXTS)
    table, counts = encode_rows(rows, tok, TokenizeConfig(template="alpaca"))
    assert counts["engine"] == "tokenizers"
    special_ids = {tok.convert_tokens_to_ids(s) for s in ("<|endoftext|>", "<|im_start|>")}
    spelled = table.column("input_ids").to_pylist()[
        TEXTS.index(next(t for t in TEXTS if "<|" in t))
    ]
    assert not special_ids & set(spelled[1:-1])
    plain = tok([T.text(r, "alpaca", tok) for r in rows], add_special_tokens=False)["input_ids"]
    unspelled = [i for i, t in enumerate(TEXTS) if "<|" not in t]
    assert [table.column("input_ids").to_pylist()[i] for i in unspelled] == [
        plain[i] for i in unspelled
    ]
