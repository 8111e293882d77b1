"""The builtin tiny model and tokenizer: deterministic, offline, consistent special tokens."""

from __future__ import annotations

import torch

from instructflow.config import ModelConfig
from tasks.base_model import load_base_model, load_tokenizer, prepare_base_model, prepare_tokenizer


def test_builtin_tokenizer_and_model_are_deterministic_and_consistent(home):
    tok_ref = prepare_tokenizer(ModelConfig())
    assert prepare_tokenizer(ModelConfig()).digest == tok_ref.digest
    tok = load_tokenizer(tok_ref)
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token_id != tok.eos_token_id
    assert "<|im_end|>" in tok.get_vocab() and tok.chat_template
    text = "Sort the numbers: 3, 1, 2 — 你好"
    assert tok.decode(tok(text).input_ids) == text  # byte-level: nothing is unknown

    base = prepare_base_model(ModelConfig(), tok_ref)
    assert prepare_base_model(ModelConfig(), tok_ref).digest == base.digest
    model = load_base_model(base)
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    ids = torch.tensor([tok("hello").input_ids])
    assert model(input_ids=ids).logits.shape[-1] == len(tok)
