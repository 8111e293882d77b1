"""Prompt templates: the exact Alpaca prompt, ChatML, the tokenizer's own chat template."""

from __future__ import annotations

import pytest

from instructflow import templates as T


@pytest.fixture(scope="module")
def tok():
    from instructflow.builtin.model import build_tokenizer

    return build_tokenizer()


def row(messages, **alpaca):
    return {"id": "r:1", "messages": messages, "group": "g", "meta": {}, **alpaca}


SINGLE = row(
    [
        {"role": "user", "content": "Sort these.\n\n3, 1, 2"},
        {"role": "assistant", "content": "1, 2, 3"},
    ],
    instruction="Sort these.",
    input="3, 1, 2",
    output="1, 2, 3",
)
MULTI = row(
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "5"},
    ],
    instruction="Hi there",
    input="",
    output="5",
)


def test_alpaca_is_the_standard_prompt_with_and_without_input(tok):
    eos = tok.eos_token
    assert T.text(SINGLE, "alpaca", tok) == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSort these.\n\n### Input:\n3, 1, 2\n\n### Response:\n1, 2, 3" + eos
    )
    no_input = row(
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}],
        instruction="Say hi.",
        input="",
        output="hi",
    )
    assert T.generation_prompt(no_input, "alpaca", tok) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n"
    )
    assert T.segments(no_input, "alpaca", tok)[-2:] == [("hi", True), (eos, True)]
    assert T.end_of_turn_token("alpaca", tok) == eos
    assert eos in T.stop_strings("alpaca", tok)


def test_alpaca_multi_turn_puts_earlier_turns_in_the_input(tok):
    prompt = T.generation_prompt(MULTI, "alpaca", tok)
    assert prompt.startswith("Be brief.\n\n### Instruction:\nWhat is 2 plus 3?")
    assert "### Input:\nUser: Hi there\nAssistant: Hello!\n\n### Response:\n" in prompt
    trained = [t for t, f in T.segments(MULTI, "alpaca", tok) if f]
    assert trained == ["5", tok.eos_token]  # only the final answer is trained


def test_chatml_trains_every_assistant_turn_and_its_end_token(tok):
    segs = T.segments(MULTI, "chatml", tok)
    assert [t for t, f in segs if f] == ["Hello!", "<|im_end|>", "5", "<|im_end|>"]
    assert T.text(MULTI, "chatml", tok) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWhat is 2 plus 3?"
        "<|im_end|>\n<|im_start|>assistant\n5<|im_end|>"
    )
    assert T.generation_prompt(MULTI, "chatml", tok).endswith(
        "What is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert T.reference(MULTI) == "5"
    assert T.end_of_turn_token("chatml", tok) == "<|im_end|>"
    assert T.stop_strings("chatml", tok)[:2] == ["<|im_end|>", "<|im_start|>"]


def test_chat_template_matches_the_tokenizers_own_rendering(tok):
    msgs = MULTI["messages"]
    assert T.text(MULTI, "chat_template", tok) == tok.apply_chat_template(msgs, tokenize=False)
    assert T.generation_prompt(MULTI, "chat_template", tok) == tok.apply_chat_template(
        msgs[:-1], tokenize=False, add_generation_prompt=True
    )
    trained = [t for t, f in T.segments(MULTI, "chat_template", tok) if f]
    assert trained == ["Hello!<|im_end|>", "5<|im_end|>"]
    assert T.end_of_turn_token("chat_template", tok) == "<|im_end|>"
    assert not T.add_special_tokens("chat_template") and T.add_special_tokens("alpaca")


def test_bad_template_and_bad_rows_fail_in_one_line(tok):
    with pytest.raises(T.TemplateError, match="unknown template"):
        T.segments(SINGLE, "vicuna", tok)
    bad = row([{"role": "user", "content": "hi"}])
    with pytest.raises(T.TemplateError, match="r:1: the last message must be from the assistant"):
        T.segments(bad, "chatml", tok)
