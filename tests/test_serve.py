"""`instructflow serve` as a real subprocess on loopback, serving a tiny real fine-tuned model,
with the judge's openai backend run against it end to end; and the streamed text's hold-back
rule with the built-in tokenizer."""

from __future__ import annotations

import json

import httpx
import pytest
from evaluate_fixtures import make_base, make_train
from serving import serving

from instructflow import judge
from instructflow.builtin import model as builtin
from instructflow.config import JudgeConfig
from instructflow.generation import cut_at_stop
from instructflow.llm import ReplyCache
from instructflow.loading import load_tokenizer
from instructflow.streaming import TextStream


@pytest.fixture
def served(home):
    tok_ref, base = make_base()
    train = make_train(base, tok_ref, template="alpaca")
    with serving(home, train.path, "--max-tokens", "24") as url:
        yield url, train


def test_serve_answers_openai_requests_and_the_judge_runs_against_it(served, home):
    url, train = served
    models = httpx.get(f"{url}/v1/models").json()
    assert models["data"][0]["id"] == train.path
    body = {"model": "any", "messages": [{"role": "user", "content": "Reverse the word: cat"}]}
    first = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
    again = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
    choice = first["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == again["choices"][0]["message"]["content"]  # greedy
    assert choice["finish_reason"] in ("stop", "length")
    assert 0 < first["usage"]["completion_tokens"] <= 24
    bad = httpx.post(f"{url}/v1/chat/completions", json={"messages": []}, timeout=10)
    assert bad.status_code == 400 and "messages" in bad.json()["error"]["message"]

    # The judge against the real server: a tiny model cannot write JSON verdicts, so every
    # verdict is retried once and counted as failed; the replies it got are the server's own.
    cfg = JudgeConfig(
        backend="openai", base_url=f"{url}/v1", model="tiny", mode="both", max_concurrency=2
    )
    items = [judge.Item("Reverse the word: cat", "", "tac"), judge.Item("Add 2 and 3", "", "5")]
    res = judge.run_judge(cfg, items, ["tac", "5"], ["cat", "6"])
    n_verdicts = 2 * 2 + 2  # single (fine-tuned, base) + pairwise per item
    parsed = sum(
        v is not None for v in res.columns["judge_score"] + res.columns["judge_score_base"]
    )
    parsed += sum(o != "failed" for o in res.columns["pairwise"])
    failed = res.metrics["judge_failed_single"] + res.metrics["judge_failed_pairs"]
    assert parsed + failed == n_verdicts
    assert res.metrics["judge_failure_rate"] == failed / n_verdicts
    assert not res.usable  # a tiny model is no judge: it fails calibration
    cached = [json.loads(p.read_text()) for p in (home / "judge_cache").rglob("*.json")]
    assert len(cached) >= 2 * 4  # 4 prompts per item reached the server
    # A cached reply is exactly what the server answers for the same request (temperature 0).
    from instructflow import judge_prompts as P

    messages = [
        {"role": "system", "content": P.SYSTEM},
        {"role": "user", "content": P.single("Reverse the word: cat", "", "tac", "tac")},
    ]
    direct = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "tiny", "messages": messages, **judge.JUDGE_PARAMS},
        timeout=60,
    ).json()["choices"][0]["message"]["content"]
    key = ReplyCache("tiny").key(messages, cfg.seed, judge.JUDGE_PARAMS)
    assert ReplyCache("tiny").get(key) == direct


def _stream_tokens(tok, text: str, ends: list[str]) -> tuple[list[str], str, str]:
    """(delta per token, what finish() adds, the final answer) for `text` streamed one token at
    a time; the final answer is what generate makes of the same tokens."""
    ids = tok(text, add_special_tokens=False).input_ids
    stream = TextStream(tok, ends)
    deltas = [stream.push([i]) for i in ids]
    final = cut_at_stop(tok.decode(ids, skip_special_tokens=False), ends)
    return deltas, stream.finish(final), final


def test_streamed_text_holds_back_what_the_next_tokens_may_change():
    tok = load_tokenizer(builtin.cached_tokenizer_dir())
    ends = ["is big", "<|im_end|>"]
    # The stop string spans "is", " ", "big": held back (with the space before it) until it
    # completes, and then never sent; a leading space is never sent (the answer is stripped).
    deltas, rest, final = _stream_tokens(tok, " Tokyo is big deal", ends)
    assert deltas == ["", "Tokyo", "", "", "", "", "", "", ""] and rest == ""
    assert final == "Tokyo"
    # The same start goes out as soon as it cannot become the stop string ("is bl").
    deltas, rest, final = _stream_tokens(tok, "Tokyo is blue", ends)
    assert deltas == ["Tokyo", "", "", "", " is bl", "ue"] and rest == ""
    # A character split over byte tokens goes out whole, once its last byte arrives.
    deltas, rest, final = _stream_tokens(tok, "é你好 ok", ends)
    assert deltas == ["é", "", "", "你", "", "", "好", "", " ok"] and rest == ""
    # Inside one token too: "Paris" may go on as "Paris big"; the end-of-turn token settles
    # it, and nothing of that token is sent.
    deltas, rest, final = _stream_tokens(tok, "Paris<|im_end|>", ends)
    assert deltas == ["Par", "is"] and rest == "" and final == "Paris"
