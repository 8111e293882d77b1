"""The server's batcher with the built-in model: a row that breaks its shared decode loop
fails alone; the other requests in the loop get the answers they get alone, and a streamed
one hears each of its tokens once."""

from __future__ import annotations

import logging
import threading

import pytest

from instructflow.batcher import END, Batcher


@pytest.fixture(scope="module")
def chat():
    from instructflow.server import load_chat_model

    return load_chat_model("builtin:tiny", max_tokens=8)


def test_a_row_that_breaks_the_batch_fails_alone(chat, caplog):
    questions = [f"Name the capital city of {c}." for c in ("Sudan", "Japan", "Peru", "Chad")]
    prepared = [chat.prepare({"messages": [{"role": "user", "content": q}]}) for q in questions]
    alone = [chat.reply(chat.run([p], s)[0])["choices"][0]["message"] for p, s in prepared]
    streamed_alone: list[int] = []
    chat.run([prepared[3][0]], prepared[3][1], on_token=lambda i, t: streamed_alone.append(t))

    heard: list = []
    two, broken_queued = threading.Event(), threading.Event()

    def sink(token) -> None:
        heard.append(token)
        if len(heard) == 2:  # the loop waits here until the broken request is queued
            two.set()
            broken_queued.wait(60)

    batcher = Batcher(chat, max_batch=8, max_queue=8)
    with chat.lock:  # every request is queued before the loop starts
        futures = [batcher.submit(p, s) for p, s in prepared[:3]]
        futures.append(batcher.submit(*prepared[3], sink=sink))
    assert two.wait(60)
    # A token id past the vocabulary, joining the running loop: its embedding lookup fails
    # the whole loop, after the streamed request has sent two tokens.
    broken = batcher.submit([len(chat.tok) + 10_000], prepared[0][1])
    broken_queued.set()
    with caplog.at_level(logging.WARNING, logger="instructflow.serve.access"):
        with pytest.raises(IndexError):
            broken.result(timeout=120)
        replies = [f.result(timeout=120)[0] for f in futures]
    assert [r["choices"][0]["message"] for r in replies] == alone
    assert heard[:-1] == streamed_alone and heard[-1] is END  # no token twice, none lost
    assert any("answering its 5 unfinished ones one at a time" in r.message for r in caplog.records)
