"""A chat-completions request body, checked field by field before anything is computed.

Every request is untrusted: a field of the wrong type, text that is not valid Unicode (a lone
surrogate, which JSON allows and no tokenizer encodes) or a number out of range is a
RequestError, which the server answers 400 with the field named. Unknown fields are ignored,
as OpenAI clients send many.
"""

from __future__ import annotations

import json
import re
from typing import Any

ROLES = ("system", "user", "assistant")
MAX_MESSAGES = 1000
MAX_STOP = 16
_SURROGATE = re.compile("[\ud800-\udfff]")


class RequestError(ValueError):
    """Bad input: answered 400 with this message."""

    code: str | None = None


class PromptTooLong(RequestError):
    code = "context_length_exceeded"


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except RecursionError:  # "[[[[...": the C parser recurses per level
        raise RequestError("the request body is nested too deeply") from None
    except ValueError:  # not UTF-8, not JSON, or an integer of more than 4,300 digits
        raise RequestError("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


def text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise RequestError(f"{where} must be a string, not {_kind(value)}")
    bad = _SURROGATE.search(value)
    if bad:
        raise RequestError(
            f"{where}: a lone surrogate (U+{ord(bad.group()):04X}) at character {bad.start()} "
            "is not valid Unicode"
        )
    return value


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", type(None): "null", bool: "a boolean"}.get(
        type(value), "a number" if isinstance(value, int | float) else type(value).__name__
    )


def _content(value: Any, where: str) -> str:
    """A message's content: a string, or OpenAI content parts of type text."""
    if not isinstance(value, list):
        return text(value, where)
    pieces = []
    for j, part in enumerate(value):
        at = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise RequestError(f"{at} must be an object, not {_kind(part)}")
        if part.get("type", "text") != "text":
            raise RequestError(f"{at}: type {part.get('type')!r} is not supported (text only)")
        pieces.append(text(part.get("text"), f"{at}.text"))
    return "".join(pieces)


def messages(body: dict[str, Any]) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError("'messages' must be a non-empty list")
    if len(msgs) > MAX_MESSAGES:
        raise RequestError(f"'messages' holds {len(msgs)} messages; at most {MAX_MESSAGES}")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(f"messages[{i}]: role must be system, user or assistant")
        content = _content(m.get("content"), f"messages[{i}].content")
        out.append({"role": m["role"], "content": content})
    if out[-1]["role"] == "assistant":
        raise RequestError("the last message must not be from the assistant")
    return out


def number(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise RequestError(f"'{name}' must be a number in [{lo}, {hi}]")
    return value


def integer(body: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    value = number(body, name, default, lo, hi)
    if value != int(value):
        raise RequestError(f"'{name}' must be a whole number")
    return int(value)


def options(body: dict[str, Any]) -> dict[str, Any]:
    """The generation fields, checked: stream, max tokens, stop, temperature, top_p, seed."""
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise RequestError("'stream' must be true or false")
    for name in ("model", "user"):
        if body.get(name) is not None:
            text(body[name], f"'{name}'")
    if integer(body, "n", 1, 1, 1_000_000) != 1:
        raise RequestError("'n' must be 1 (one choice per request)")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise RequestError("'stop' must be a string or a list of strings")
    if len(stop) > MAX_STOP:
        raise RequestError(f"'stop' holds {len(stop)} strings; at most {MAX_STOP}")
    temperature = number(body, "temperature", 0.0, 0.0, 2.0)
    return {
        "stream": bool(stream),
        "max_tokens": integer(body, key, 2**31, 1, 2**62),
        "stop": [text(s, "'stop'") for s in stop],
        "temperature": temperature,
        "top_p": number(body, "top_p", 1.0, 1e-6, 1.0),
        # Greedy ignores the seed: leaving it out lets greedy requests share a batch.
        "seed": integer(body, "seed", 0, 0, 2**63 - 1) if temperature > 0 else 0,
    }
