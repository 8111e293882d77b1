"""A scripted OpenAI-compatible /v1/chat/completions endpoint: a real HTTP server on
127.0.0.1 whose replies follow fixed rules, so what the synthesize stage keeps is known.

- paraphrase: "Rewritten instruction: Could you <instruction, first letter lowered>?" (the
  instruction with a trailing '.' removed); an instruction holding "SAME" comes back unchanged
  (too similar), one holding "WILD" comes back as "Banana." (too different).
- translate to the pivot: "[fr] <text>"; to English: the "[fr] " text as "Would you <text>".
- evolve: the instruction + " Explain your reasoning step by step."; its answer: "Because
  <instruction>".
- self_instruct: by the request's seed (attempt number): SELF_INSTRUCT_REPLIES[seed % n].
`die_after`: after that many answered requests the server stops (an endpoint that dies);
`delay`: seconds before each answer.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _task(instruction: str, output: str, input: str = "") -> str:
    return json.dumps({"instruction": instruction, "input": input, "output": output})


SELF_INSTRUCT_REPLIES = [
    _task("Write a haiku about autumn rain.", "Soft rain on red leaves"),
    "```json\n" + _task("Convert 5 kilometres to miles.", "About 3.1 miles.") + "\n```",
    "Sure! Here is a task: translate hello into German.",  # unparsable
    _task("Name a prime number above 10.", ""),  # no output
    _task("Write a haiku about autumn rain, please.", "Rain"),  # not novel
    _task("Sort these numbers.", "1, 2, 3", input="3, 1, 2"),
]


def send_chat_reply(handler: BaseHTTPRequestHandler, content: str) -> None:
    """Answer a chat-completions request with `content` (both scripted endpoints use it)."""
    data = json.dumps({"choices": [{"message": {"content": content}}]}).encode()
    try:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
    except OSError:  # the client timed out and hung up
        pass


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


class LLMStub:
    def __init__(self, die_after: int | None = None, delay: float = 0.0):
        self.requests: list[dict] = []
        self.die_after = die_after
        self.delay = delay
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if stub.die_after is not None and len(stub.requests) >= stub.die_after:
                    self.close_connection = True
                    threading.Thread(target=stub.close, daemon=True).start()
                    return
                time.sleep(stub.delay)
                stub.requests.append({"auth": self.headers.get("Authorization"), "body": body})
                send_chat_reply(self, stub.reply(body))

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reply(self, body: dict) -> str:
        prompt = body["messages"][-1]["content"]
        if prompt.startswith("Rewrite the instruction below so that it asks"):
            instruction = prompt.split("Instruction: ", 1)[1]
            if "SAME" in instruction:
                return instruction
            if "WILD" in instruction:
                return "Banana."
            return f"Rewritten instruction: Could you {_lower_first(instruction.rstrip('.'))}?"
        if prompt.startswith("Translate the text below into English"):
            text = prompt.split("Text: ", 1)[1]
            return f"Would you {_lower_first(text.removeprefix('[fr] ').rstrip('.'))}?"
        if prompt.startswith("Translate the text below into"):
            return "[fr] " + prompt.split("Text: ", 1)[1]
        if prompt.startswith("Rewrite the instruction below into a more complex"):
            instruction = prompt.split("Instruction: ", 1)[1]
            return instruction + " Explain your reasoning step by step."
        if prompt.startswith("Here are example tasks"):
            return SELF_INSTRUCT_REPLIES[body["seed"] % len(SELF_INSTRUCT_REPLIES)]
        return f"Because {prompt.splitlines()[0]}"  # an evolved instruction, to be answered

    def close(self):
        self.server.shutdown()
        self.server.server_close()
