"""`instructflow serve` under concurrency, as a real subprocess on 127.0.0.1 with the built-in
model: concurrent greedy requests are batched and each answer equals its one-at-a-time answer;
a full queue answers 429, an over-large body or prompt 413 (JSON errors); one access line per
request."""

from __future__ import annotations

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


def test_limits_answer_429_and_413_with_json_errors(server):
    url, log = server
    big = _ask(url, "x" * 5000)
    assert big.status_code == 413 and "max-request-bytes" in big.json()["error"]["message"]
    long_prompt = _ask(url, " ".join(["word"] * 400))
    assert long_prompt.status_code == 413
    assert "at most 200" in long_prompt.json()["error"]["message"]
    # 40 at once against a queue of 8 (and one batch of 8 running): some must wait their turn.
    with ThreadPoolExecutor(40) as pool:
        burst = list(pool.map(lambda i: _ask(url, PROMPTS[i % 8], max_tokens=12), range(40)))
    codes = [r.status_code for r in burst]
    assert set(codes) <= {200, 429} and codes.count(429) > 0 and codes.count(200) >= 8
    busy = next(r for r in burst if r.status_code == 429).json()["error"]
    assert busy["type"] == "rate_limit_error" and "--max-queue" in busy["message"]
    assert '" 429 ' in log.read_text() and '" 413 ' in log.read_text()
