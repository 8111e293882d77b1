"""An OpenAI-compatible chat-completions server for one model (FastAPI + uvicorn).

Routes: POST /v1/chat/completions, GET /v1/models, GET /health. Messages are rendered with
the model's training template (instructflow.templates) and answered by the same batched
generation code the evaluate stage uses: concurrent greedy requests with the same settings are
batched (Batcher). Bounded: a full queue answers 429, an over-large body or prompt 413, each
with a JSON error; one access line per request. `stream: true` is answered in the SSE format
with the whole answer in one chunk (not token by token). There is no auth, so the default bind
is 127.0.0.1.
"""

import json
import threading
import time
import uuid
from typing import Any

from instructflow import generation, templates


class RequestError(ValueError):
    pass


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{i}]: role must be system, user or assistant")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}]: content must be a string")
        out.append({"role": m["role"], "content": content})
    if out[-1]["role"] == "assistant":
        raise RequestError("the last message must not be from the assistant")
    return out


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise RequestError(f"'{name}' must be a number in [{lo}, {hi}]")
    return value


class ChatModel:
    """The loaded model plus what it takes to answer chat requests."""

    def __init__(self, model, tokenizer, template: str, model_id: str, max_tokens: int = 512):
        self.model, self.tok, self.template = model, tokenizer, template
        self.model_id, self.max_tokens = model_id, max_tokens
        self.lock = threading.Lock()
        self.max_prompt_tokens: int | None = None

    def prepare(self, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """(prompt, generation settings) of a request; RequestError when it is malformed,
        PromptTooLong above max_prompt_tokens."""
        msgs = _messages(body)
        row = {"messages": [*msgs, {"role": "assistant", "content": ""}]}
        prompt = templates.generation_prompt(row, self.template, self.tok)
        if self.max_prompt_tokens is not None:
            n = len(self.tok(prompt, add_special_tokens=False).input_ids)
            if n > self.max_prompt_tokens:
                raise PromptTooLong(
                    f"the prompt has {n} tokens; this server takes at most "
                    f"{self.max_prompt_tokens} (--max-prompt-tokens)"
                )
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        # Above the server's cap is clamped, not refused: clients often ask for more.
        max_new = min(
            int(_number({"max_tokens": limit}, "max_tokens", 1e9, 1, 1e9)), self.max_tokens
        )
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise RequestError("'stop' must be a string or a list of strings")
        temperature = _number(body, "temperature", 0.0, 0.0, 2.0)
        settings = {
            "max_new_tokens": max_new,
            "temperature": temperature,
            "top_p": _number(body, "top_p", 1.0, 1e-6, 1.0),
            # Greedy ignores the seed: leaving it out lets greedy requests share a batch.
            "seed": int(_number(body, "seed", 0, 0, 2**63 - 1)) if temperature > 0 else 0,
            "stop_strings": (*templates.stop_strings(self.template, self.tok), *stop),
        }
        return prompt, settings

    def complete_many(self, prompts: list[str], settings: dict[str, Any]) -> list[dict]:
        """Replies to prompts that share `settings`, in one batched generate call (the
        evaluate stage's decoding)."""
        with self.lock:
            outs = generation.generate(
                self.model,
                self.tok,
                prompts,
                batch_size=max(1, len(prompts)),
                stop_tokens=[templates.end_of_turn_token(self.template, self.tok)],
                add_special_tokens=templates.add_special_tokens(self.template),
                details=True,
                **{**settings, "stop_strings": list(settings["stop_strings"])},
            )
        return [self._reply(out) for out in outs]

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        prompt, settings = self.prepare(body)
        return self.complete_many([prompt], settings)[0]

    def _reply(self, out: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_id,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": out["text"]},
                    "finish_reason": out["finish_reason"],
                }
            ],
            "usage": {
                "prompt_tokens": out["prompt_tokens"],
                "completion_tokens": out["completion_tokens"],
                "total_tokens": out["prompt_tokens"] + out["completion_tokens"],
            },
        }


class PromptTooLong(RequestError):
    pass


class QueueFull(RuntimeError):
    pass


class Batcher:
    """Requests go to a bounded queue; one worker thread answers them. Greedy requests with
    the same settings that are waiting together are answered by one batched generate call,
    so throughput grows with concurrency and each answer equals the single-request greedy
    answer (tested). A sampling request (temperature > 0) is answered alone: its random
    stream must not depend on what else is in the batch."""

    def __init__(self, chat: ChatModel, max_batch: int = 16, max_queue: int = 64):
        import queue

        self.chat, self.max_batch, self.max_queue = chat, max_batch, max_queue
        self.jobs: queue.Queue = queue.Queue()
        self.waiting = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._work, daemon=True, name="batcher").start()

    def submit(self, body: dict[str, Any]):
        """A concurrent.futures.Future of (reply, batch size); RequestError at once for a bad
        request, QueueFull when max_queue requests are already waiting."""
        from concurrent.futures import Future

        prompt, settings = self.chat.prepare(body)
        with self._lock:
            if self.waiting >= self.max_queue:
                raise QueueFull(f"server busy: {self.waiting} requests queued (--max-queue)")
            self.waiting += 1
        future: Future = Future()
        self.jobs.put((prompt, settings, future))
        return future

    def _work(self) -> None:
        import queue

        while True:
            first = self.jobs.get()
            batch, held = [first], []
            while len(batch) < self.max_batch:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                same = job[1] == first[1] and first[1]["temperature"] == 0
                (batch if same else held).append(job)
            for job in held:  # other settings: the next rounds
                self.jobs.put(job)
            with self._lock:
                self.waiting -= len(batch)
            try:
                replies = self.chat.complete_many([p for p, _, _ in batch], first[1])
            except Exception as exc:  # every waiting client hears about it
                for _, _, future in batch:
                    future.set_exception(exc)
                continue
            for (_, _, future), reply in zip(batch, replies, strict=True):
                future.set_result((reply, len(batch)))


def _stream(reply: dict[str, Any]):
    choice = reply["choices"][0]
    base = {k: reply[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    chunks = [
        {"index": 0, "delta": {"role": "assistant", "content": choice["message"]["content"]}},
        {"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]},
    ]
    for c in chunks:
        yield f"data: {json.dumps(base | {'choices': [c]})}\n\n"
    yield "data: [DONE]\n\n"


def create_app(chat: ChatModel, max_batch: int = 16, max_queue: int = 64,
               max_request_bytes: int = 1_000_000):  # fmt: skip
    import logging

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="instructflow serve", docs_url=None, redoc_url=None)
    batcher = Batcher(chat, max_batch=max_batch, max_queue=max_queue)
    access = logging.getLogger("instructflow.serve.access")

    def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
        body = {"error": {"message": message, "type": kind}}
        return JSONResponse(body, status_code=status)

    @app.middleware("http")
    async def access_log(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        client = request.client.host if request.client else "-"
        extra = getattr(request.state, "log", "")
        access.info(
            f'{client} "{request.method} {request.url.path}" {response.status_code} '
            f"{time.perf_counter() - t0:.3f}s{extra}"
        )
        return response

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "model": chat.model_id}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        entry = {"id": chat.model_id, "object": "model", "created": 0, "owned_by": "instructflow"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        import asyncio

        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_request_bytes:
            return error(413, f"request body above {max_request_bytes} bytes (--max-request-bytes)")
        raw = await request.body()
        if len(raw) > max_request_bytes:
            return error(413, f"request body above {max_request_bytes} bytes (--max-request-bytes)")
        try:
            body = json.loads(raw)
        except ValueError:
            return error(400, "the request body is not valid JSON")
        if not isinstance(body, dict):
            return error(400, "the request body must be a JSON object")
        try:
            future = batcher.submit(body)
        except PromptTooLong as exc:
            return error(413, str(exc))
        except RequestError as exc:
            return error(400, str(exc))
        except QueueFull as exc:
            return error(429, str(exc), "rate_limit_error")
        # Generation runs on the batcher's thread: the event loop stays free (/health live).
        reply, batch = await asyncio.wrap_future(future)
        usage = reply["usage"]
        request.state.log = (
            f" prompt={usage['prompt_tokens']} completion={usage['completion_tokens']} "
            f"batch={batch}"
        )
        if body.get("stream"):
            return StreamingResponse(_stream(reply), media_type="text/event-stream")
        return reply

    return app


def load_chat_model(spec: str, max_tokens: int = 512) -> ChatModel:
    from instructflow.loading import load_for_inference

    model, tok, template = load_for_inference(spec)
    model.eval()
    return ChatModel(model, tok, template, model_id=spec, max_tokens=max_tokens)


def serve(chat: ChatModel, host: str = "127.0.0.1", port: int = 8000, **limits: int) -> None:
    """`limits`: max_batch, max_queue, max_request_bytes (create_app). One access line per
    request goes to stderr."""
    import logging

    import uvicorn

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    access = logging.getLogger("instructflow.serve.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False
    app = create_app(chat, **limits)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
