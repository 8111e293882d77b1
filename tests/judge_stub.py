"""Scripted LLM judges: real OpenAI-compatible /v1/chat/completions servers on 127.0.0.1 that
read the judge's prompt (instructflow.judge_prompts) and answer by a fixed rule, so what the
calibration and the gate should make of each judge is known.

`FakeJudge(rule)`:
- oracle: knows the right answer: an answer equal to the reference scores 9 (else 2) and wins
  a comparison; with neither (or both) answers equal to it, a tie.
- length: the longer answer wins; a grade grows with the answer's length.
- shorter: the shorter answer wins; a grade shrinks with the answer's length.
- closest: the answer whose length is closest to the reference's wins.
- position: always "A"; every grade 5.
- random: a verdict drawn from a generator seeded by the prompt (repeatable).
- tie: always "tie"; every grade 5.
An empty answer is shown to the judge as "(empty)"; the rules measure it as "".
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from llm_stub import send_chat_reply

RULES = ("oracle", "length", "shorter", "closest", "position", "random", "tie")


def _section(prompt: str, header: str) -> str | None:
    """The text under `### <header>:` up to the next section or the reply instruction."""
    marker = f"### {header}:\n"
    if marker not in prompt:
        return None
    text = prompt.split(marker, 1)[1]
    for end in ("\n### ", "\n\nReply with exactly"):
        text = text.split(end, 1)[0]
    text = text.strip()
    return "" if text == "(empty)" else text


def read_prompt(prompt: str) -> dict:
    """The parts of a judge prompt: instruction, reference (None for the reference-free
    rubric), and response (single) or a / b (pairwise)."""
    return {
        "instruction": _section(prompt, "Instruction"),
        "reference": _section(prompt, "Reference answer"),
        "response": _section(prompt, "Response to grade"),
        "a": _section(prompt, "Response A"),
        "b": _section(prompt, "Response B"),
    }


class JudgeEndpoint:
    """The HTTP side; subclasses answer in `reply(messages)`. `requests` records each request
    (its Authorization header and JSON body)."""

    def __init__(self, delay: float = 0.0):
        self.requests: list[dict] = []
        self.delay = delay
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                endpoint.requests.append({"auth": self.headers.get("Authorization"), "body": body})
                time.sleep(endpoint.delay)
                send_chat_reply(self, endpoint.reply(body["messages"]))

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reply(self, messages: list[dict]) -> str:
        raise NotImplementedError

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class FakeJudge(JudgeEndpoint):
    def __init__(self, rule: str):
        assert rule in RULES, rule
        self.rule = rule
        super().__init__()

    def reply(self, messages: list[dict]) -> str:
        prompt = messages[1]["content"]
        parts = read_prompt(prompt)
        rng = random.Random(hashlib.sha256(prompt.encode()).hexdigest())
        if parts["response"] is not None:
            verdict = {"score": self._grade(parts["response"], parts["reference"], rng)}
        else:
            verdict = {"winner": self._pick(parts["a"], parts["b"], parts["reference"], rng)}
        return json.dumps(verdict | {"rationale": f"rule: {self.rule}"})

    def _grade(self, response: str, reference: str | None, rng: random.Random) -> int:
        if self.rule == "oracle":
            return 9 if response == reference else 2
        if self.rule in ("length", "shorter"):
            size = min(9, len(response).bit_length())  # 0 chars -> 0, 1 -> 1, 2-3 -> 2, ...
            return 1 + size if self.rule == "length" else 10 - size
        if self.rule == "closest":
            return max(1, 10 - abs(len(response) - len(reference or "")))
        if self.rule == "random":
            return rng.randint(1, 10)
        return 5  # position, tie

    def _pick(self, a: str, b: str, reference: str | None, rng: random.Random) -> str:
        if self.rule == "oracle":
            right_a, right_b = a == reference, b == reference
            return "A" if right_a and not right_b else "B" if right_b and not right_a else "tie"
        if self.rule in ("length", "shorter", "closest"):
            if self.rule == "closest":
                key_a, key_b = (-abs(len(x) - len(reference or "")) for x in (a, b))
            else:
                sign = 1 if self.rule == "length" else -1
                key_a, key_b = sign * len(a), sign * len(b)
            return "A" if key_a > key_b else "B" if key_b > key_a else "tie"
        if self.rule == "random":
            return rng.choice(["A", "B", "tie"])
        return "A" if self.rule == "position" else "tie"
