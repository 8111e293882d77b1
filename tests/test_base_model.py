"""builtin:tiny: a deterministic tokenizer, a pre-training that is byte-identical for a seed,
and a pre-trained base that knows the demo's held-out facts in raw form (but not as
instructions)."""

from __future__ import annotations

import pytest
import torch
from demo_rows import demo_config_splits

from instructflow.artifacts import hash_tree
from instructflow.builtin import model as builtin
from instructflow.builtin import world
from instructflow.builtin.model import EOS
from instructflow.config import ModelConfig
from instructflow.loading import load_base_model, load_tokenizer, model_info
from tasks.base_model import prepare_base_model, prepare_tokenizer


def test_builtin_tokenizer_is_deterministic_and_lossless(home):
    tok_ref = prepare_tokenizer(ModelConfig())
    assert prepare_tokenizer(ModelConfig()).digest == tok_ref.digest
    tok = load_tokenizer(tok_ref)
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token_id != tok.eos_token_id
    assert "<|im_end|>" in tok.get_vocab() and tok.chat_template
    text = "Sort the numbers: 3, 1, 2 — 你好\n  indented"
    assert tok.decode(tok(text).input_ids) == text  # byte-level: nothing is unknown
    # A word is one id whether it follows a space (statements) or a newline (answers).
    mid = tok("The capital of Japan is Tokyo", add_special_tokens=False).input_ids
    start = tok("### Response:\nTokyo", add_special_tokens=False).input_ids
    assert mid[-1] == start[-1] == tok.convert_tokens_to_ids("Tokyo")


def test_pretraining_is_byte_identical_for_a_seed(tmp_path, monkeypatch):
    """Two builds of the same (shortened) recipe in fresh caches give the same bytes; another
    seed gives other bytes. The full recipe runs the same code for more steps."""
    tok = builtin.build_tokenizer()
    short = {"steps": 12, "warmup_steps": 2}

    def build(cache: str, **recipe):
        monkeypatch.setenv("INSTRUCTFLOW_CACHE", str(tmp_path / cache))
        bundle, cached = builtin.ensure_pretrained(tok, {**short, **recipe})
        assert not cached
        return hash_tree(bundle / "model")

    first = build("a")
    assert build("b") == first
    assert build("c", seed=1) != first
    # A second call with the same recipe loads the cache instead of training again.
    monkeypatch.setenv("INSTRUCTFLOW_CACHE", str(tmp_path / "a"))
    assert builtin.ensure_pretrained(tok, short)[1] is True


def test_the_pretrained_base_knows_the_held_out_facts_only_in_raw_form(home):
    tok_ref = prepare_tokenizer(ModelConfig())
    base = prepare_base_model(ModelConfig(), tok_ref)
    info = model_info(base)
    assert info["kind"] == "builtin" and info["pretrain"]["parameters"] < 2_000_000
    model, tok = load_base_model(base), load_tokenizer(tok_ref)
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] == len(tok)

    answers = {(r, a): b for r, facts in world.FACTS.items() for a, b in facts}
    answers.update({("opposite", b): a for a, b in world.OPPOSITES})
    held_out: dict[str, list[tuple[str, str]]] = {}
    test_rows = demo_config_splits()["test"]
    for row in test_rows:
        task, subject = row["meta"]["task"], row["meta"]["subject"]
        held_out.setdefault(task, []).append((subject, answers[(task, subject)]))
    assert set(held_out) == set(world.FACTS) and all(len(v) >= 15 for v in held_out.values())
    # Raw form ("The capital of Sudan is" -> " Khartoum"): the base learned every relation.
    known = builtin.probe(model, tok, held_out)
    assert all(share >= 0.9 for share in known.values()), known

    # The same facts asked as an Alpaca instruction: the base does not answer them.
    from instructflow import generation, templates

    rows = test_rows[:40]
    prompts = [templates.generation_prompt(r, "alpaca", tok) for r in rows]
    with torch.no_grad():
        outs = generation.generate(model, tok, prompts, max_new_tokens=8, stop_tokens=[EOS])
    right = sum(o.strip() == templates.reference(r) for o, r in zip(outs, rows, strict=True))
    assert right <= 0.1 * len(rows), list(zip(outs, rows, strict=True))[:5]


def test_keep_layers_makes_a_student_from_the_models_own_layers(home):
    """model.keep_layers: evenly spaced layers with their weights, cached per user, loaded
    and decoded (KV cache included) like any base."""
    import torch

    from instructflow import generation, layer_pruning, loading
    from tasks.base_model import ModelError

    assert layer_pruning.kept_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert layer_pruning.kept_layers(4, 2) == [0, 3] and layer_pruning.kept_layers(4, 4) == [
        0,
        1,
        2,
        3,
    ]
    tok_ref = prepare_tokenizer(ModelConfig())
    full = loading.load_base_model(prepare_base_model(ModelConfig(), tok_ref))
    cfg = ModelConfig(keep_layers=2)
    ref = prepare_base_model(cfg, tok_ref, shown_as="student_base")
    info = loading.model_info(ref)
    assert info["kind"] == "pruned" and info["layers_kept"] == [0, 3]
    assert info["source"]["kind"] == "builtin" and not ref.file("weights").exists()
    student = loading.load_base_model(ref)
    assert student.config.num_hidden_layers == 2
    for new, old in ((0, 0), (1, 3)):
        a, b = student.model.layers[new].state_dict(), full.model.layers[old].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(student.lm_head.weight, full.lm_head.weight)
    # The same computation as the full model run through only those layers.
    full.model.layers = torch.nn.ModuleList([full.model.layers[0], full.model.layers[3]])
    full.config.num_hidden_layers = 2
    ids = torch.tensor([[5, 17, 300, 41, 9]])
    with torch.no_grad():
        assert torch.allclose(
            student(ids, use_cache=False).logits, full(ids, use_cache=False).logits
        )
    tok = loading.load_tokenizer(tok_ref)
    cached = generation.generate(student, tok, ["The capital of Japan is"], max_new_tokens=6)
    assert isinstance(cached[0], str)  # the KV cache indexes the kept layers 0..1
    assert prepare_base_model(cfg, tok_ref).digest == ref.digest  # content-addressed
    with pytest.raises(ModelError, match="has 4 decoder layers"):
        prepare_base_model(ModelConfig(keep_layers=5), tok_ref)
