"""`instructflow serve` under concurrency, as a real subprocess on 127.0.0.1 with the built-in
model: concurrent greedy requests are batched and each answer equals its one-at-a-time answer;
streamed answers arrive in pieces that add up to the same answer, batched with plain ones; a
full queue answers 429, an over-large body 413 and an over-long prompt 400 (JSON errors); one
access line per request."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serving import serving

pytestmark = pytest.mark.slow

PROMPTS = [
    "Name the capital city of Sudan.",
    "Give the antonym of the word sad.",
    "Give the plural of this noun: city",
    "Write the word tiger in upper case.",
    "Name the capital city of Japan.",
    "Give the antonym of the word big.",
    "Give the plural of this noun: box",
    "Write the word apple in upper case.",
]


@pytest.fixture
def server(home, tmp_path):
    limits = ["--max-tokens", "12", "--max-batch", "8", "--max-queue", "8"]
    limits += ["--max-request-bytes", "4000", "--max-prompt-tokens", "200"]
    log = tmp_path / "serve.log"
    with serving(home, "builtin:tiny", *limits, log=log) as url:
        yield url, log


def _ask(url: str, prompt: str, **extra) -> httpx.Response:
    body = {"model": "tiny", "messages": [{"role": "user", "content": prompt}], **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def _ask_streamed(url: str, prompt: str, **extra) -> list[dict]:
    """The SSE events of a streamed request, parsed, up to the closing [DONE]."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": prompt}], **extra}
    body["stream"] = True
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        data = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def _pieces(events: list[dict]) -> tuple[list[str], str]:
    """(the content deltas, the finish reason) of a well-formed chunk stream: a role chunk
    first, a finish chunk last."""
    choices = [e["choices"][0] for e in events]
    assert choices[0]["delta"] == {"role": "assistant", "content": ""}
    assert choices[-1]["delta"] == {} and choices[-1]["finish_reason"] in ("stop", "length")
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    return [c["delta"]["content"] for c in choices[1:-1]], choices[-1]["finish_reason"]


def _answer(resp: httpx.Response) -> tuple[str, str]:
    choice = resp.json()["choices"][0]
    return choice["message"]["content"], choice["finish_reason"]


def test_streamed_answers_arrive_in_pieces_that_add_up_to_the_plain_answer(server):
    url, log = server
    several_tokens = 0
    for prompt in PROMPTS[:4]:
        plain = _ask(url, prompt)
        pieces, finish = _pieces(_ask_streamed(url, prompt))
        assert ("".join(pieces), finish) == _answer(plain)
        assert all(pieces)  # no empty content chunks
        if plain.json()["usage"]["completion_tokens"] >= 6:
            # Sent as generated: tokens that arrive while the client reads share a chunk, so
            # only "more than one" is certain, not one chunk per token.
            assert len(pieces) > 1, pieces
            several_tokens += 1
    assert several_tokens > 0
    # Sampling streams too, and its seeded answer is the plain one.
    sampled = {"temperature": 0.9, "seed": 7}
    pieces, finish = _pieces(_ask_streamed(url, PROMPTS[3], **sampled))
    assert ("".join(pieces), finish) == _answer(_ask(url, PROMPTS[3], **sampled))
    # A bad streamed request is refused before any stream starts, with a JSON error.
    bad = _ask(url, "hi", stream=True, stop=5)
    assert bad.status_code == 400 and "stop" in bad.json()["error"]["message"]
    lines = [x for x in log.read_text().splitlines() if '"POST /v1/chat/completions"' in x]
    assert len(lines) == 2 * 4 + 2 + 1  # one per request, streamed ones included
    streamed = lines[1:8:2]
    assert all(" prompt=" in x and " completion=" in x and x.endswith(" batch=1") for x in streamed)


def test_streamed_and_plain_requests_at_once_answer_as_if_alone(server):
    url, log = server
    alone = [_answer(_ask(url, p)) for p in PROMPTS]

    def ask(i: int) -> tuple[str, str]:
        if i % 2:
            return _answer(_ask(url, PROMPTS[i]))
        pieces, finish = _pieces(_ask_streamed(url, PROMPTS[i]))
        return "".join(pieces), finish

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(ask, range(len(PROMPTS))))
    assert together == alone
    lines = [x for x in log.read_text().splitlines() if '"POST /v1/chat/completions"' in x]
    assert len(lines) == 2 * len(PROMPTS)
    assert max(int(x.rsplit("batch=", 1)[1]) for x in lines[len(PROMPTS) :]) > 1


def test_concurrent_requests_are_batched_and_answer_as_if_alone(server):
    url, log = server
    alone = [_ask(url, p).json()["choices"][0]["message"]["content"] for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: _ask(url, p), PROMPTS))
    assert [r.status_code for r in together] == [200] * len(PROMPTS)
    assert [r.json()["choices"][0]["message"]["content"] for r in together] == alone
    lines = [x for x in log.read_text().splitlines() if '"POST /v1/chat/completions"' in x]
    assert len(lines) == 2 * len(PROMPTS)
    batches = [int(x.rsplit("batch=", 1)[1]) for x in lines]
    assert batches[: len(PROMPTS)] == [1] * len(PROMPTS) and max(batches) > 1


def test_limits_answer_429_413_and_400_with_json_errors(server):
    url, log = server
    big = _ask(url, "x" * 5000)
    assert big.status_code == 413 and "max-request-bytes" in big.json()["error"]["message"]
    long_prompt = _ask(url, " ".join(["word"] * 400))
    assert long_prompt.status_code == 400
    assert "at most 200" in long_prompt.json()["error"]["message"]
    assert long_prompt.json()["error"]["code"] == "context_length_exceeded"
    # 40 at once against a queue of 8 (and one batch of 8 running): some must wait their turn.
    with ThreadPoolExecutor(40) as pool:
        burst = list(pool.map(lambda i: _ask(url, PROMPTS[i % 8], max_tokens=12), range(40)))
    codes = [r.status_code for r in burst]
    assert set(codes) <= {200, 429} and codes.count(429) > 0 and codes.count(200) >= 8
    busy = next(r for r in burst if r.status_code == 429).json()["error"]
    assert busy["type"] == "rate_limit_error" and "--max-queue" in busy["message"]
    assert '" 429 ' in log.read_text() and '" 413 ' in log.read_text()
