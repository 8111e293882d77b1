"""Token streaming for `instructflow serve`: the text of a reply as its tokens arrive, in
deltas that add up to exactly the non-streamed answer, and the SSE events that carry them."""

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

log = logging.getLogger(__name__)

# Sent to a job's sink after its future is settled: the stream reads the outcome there.
END = None


def certain_text(text: str, ends: Sequence[str]) -> str:
    """What the final answer surely starts with, given `text`, the decoding of a reply's tokens
    so far: the final answer is the whole decoding cut at its first end string and stripped
    (generation.generate), so hold back a partial UTF-8 character (decoded as U+FFFD), what
    follows the first end string, a tail that may grow into one, and whitespace at either end."""
    text = text.rstrip("\ufffd")
    cut = min((i for i in (text.find(e) for e in ends if e) if i >= 0), default=len(text))
    return text[: min(cut, _open_end(text, ends))].strip()


def _open_end(text: str, ends: Sequence[str]) -> int:
    """Where the earliest tail of `text` that is a beginning of an end string starts."""
    start = len(text)
    for end in ends:
        for k in range(min(len(end) - 1, len(text)), 0, -1):
            if text.endswith(end[:k]):
                start = min(start, len(text) - k)
                break
    return start


class TextStream:
    """The text of one reply as its tokens arrive, in deltas that add up to the final answer."""

    def __init__(self, tokenizer, ends: Sequence[str]):
        self.tok, self.ends = tokenizer, [e for e in ends if e]
        self.ids: list[int] = []
        self.sent = ""

    def push(self, ids: Sequence[int]) -> str:
        """The newly certain text after `ids` ("" when nothing is certain yet)."""
        self.ids += ids
        # The whole row, as generate decodes it: a tokenizer may join pieces across tokens.
        text = certain_text(self.tok.decode(self.ids, skip_special_tokens=False), self.ends)
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def finish(self, final: str) -> str:
        """What remains to send of `final`, the non-streamed answer (the truth)."""
        if not final.startswith(self.sent):
            log.warning("streamed text %r is not a prefix of the answer %r", self.sent, final)
        delta, self.sent = final[len(self.sent) :], final
        return delta


def usage_note(reply: dict[str, Any], batch: int) -> str:
    usage = reply["usage"]
    return f" prompt={usage['prompt_tokens']} completion={usage['completion_tokens']} batch={batch}"


async def sse_events(
    model_id: str,
    text: TextStream,
    tokens: asyncio.Queue,
    future: Future,
    done: Callable[[str], None],
):
    """SSE events of one streamed reply: a role chunk, a chunk per newly certain piece of text
    (the tokens that arrived since the last one), the rest of the final answer and the finish
    reason, then [DONE]. `tokens`: the asyncio.Queue its sink fills; `done(note)` writes the
    access line when the stream ends, however it ends."""
    base = {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model_id,
    }

    def event(delta: dict[str, str], finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return f"data: {json.dumps(base | {'choices': [choice]})}\n\n"

    note = " stream ended early"  # the client went away
    try:
        yield event({"role": "assistant", "content": ""})
        ended = False
        while not ended:
            items = [await tokens.get()]
            while not tokens.empty():  # what arrived while the client read: one chunk
                items.append(tokens.get_nowait())
            ended = items[-1] is END
            piece = text.push([t for t in items if t is not END])
            if piece:
                yield event({"content": piece})
        if future.exception() is not None:
            note = f" error={type(future.exception()).__name__}"
            failure = {"message": str(future.exception()), "type": "server_error"}
            yield f"data: {json.dumps({'error': failure})}\n\n"
        else:
            reply, batch = future.result()
            choice = reply["choices"][0]
            rest = text.finish(choice["message"]["content"])
            if rest:
                yield event({"content": rest})
            yield event({}, choice["finish_reason"])
            note = usage_note(reply, batch)
        yield "data: [DONE]\n\n"
    finally:
        done(note)
