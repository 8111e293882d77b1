"""An OpenAI-compatible chat-completions server for one model (FastAPI + uvicorn).

Routes: POST /v1/chat/completions, GET /v1/models, GET /health. Messages are rendered with
the model's training template (instructflow.templates) and answered by the generation code
the evaluate stage uses: concurrent greedy requests with the same settings share one
continuously batched decode loop, later arrivals joining as rows finish (Batcher). Bounded: a
full queue answers 429, an over-large body or prompt 413, each with a JSON error; one access
line per request. `stream: true` is answered in the SSE format token by token as the batch
generates (TextStream: only text the final answer surely starts with is sent, so the deltas
add up to exactly the non-streamed answer). There is no auth, so the default bind is
127.0.0.1.
"""

import asyncio
import collections
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, NamedTuple

from instructflow import generation, streaming, templates

log = logging.getLogger(__name__)


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

    def end_strings(self, settings: dict[str, Any]) -> list[str]:
        """Every string generate cuts a reply at (stop strings, end-of-turn and EOS text)."""
        eot = templates.end_of_turn_token(self.template, self.tok)
        return [*settings["stop_strings"], eot, self.tok.eos_token or ""]

    def run(
        self,
        prompts: list[str],
        settings: dict[str, Any],
        *,
        batch_size: int | None = None,
        on_token: generation.OnToken | None = None,
        admit: Callable[[int], list[str]] | None = None,
        on_done: Callable[[int, dict[str, Any]], None] | None = None,
    ) -> list[dict[str, Any]]:
        """generate's detailed outputs for prompts that share `settings`, in one decode loop
        (the evaluate stage's continuous batching); the serving hooks are generate's."""
        with self.lock:
            return generation.generate(
                self.model,
                self.tok,
                prompts,
                batch_size=batch_size or max(1, len(prompts)),
                stop_tokens=[templates.end_of_turn_token(self.template, self.tok)],
                add_special_tokens=templates.add_special_tokens(self.template),
                details=True,
                on_token=on_token,
                admit=admit,
                on_done=on_done,
                **{**settings, "stop_strings": list(settings["stop_strings"])},
            )

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        prompt, settings = self.prepare(body)
        return self.reply(self.run([prompt], settings)[0])

    def reply(self, out: dict[str, Any]) -> dict[str, Any]:
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


END = streaming.END
Sink = Callable[[int | None], None]


class Job(NamedTuple):
    prompt: str
    settings: dict[str, Any]
    future: Future
    sink: Sink | None  # hears each token id, then END


class Batcher:
    """Requests wait in a bounded FIFO; one worker thread answers them with the evaluate
    stage's continuous-batching decoder. Greedy requests with the same settings share a decode
    loop: those waiting when it starts, and those that arrive while it runs, which join as
    rows finish (at most max_batch rows at once); each is answered as soon as its row ends,
    and equals the answer to the same request sent alone (tested). A sampling request
    (temperature > 0) is answered alone: its random stream must not depend on the batch.
    Arrivals join a running loop only while the oldest waiting request has its settings, so a
    request with other settings waits for the rows already running, not for later arrivals."""

    def __init__(self, chat: ChatModel, max_batch: int = 16, max_queue: int = 64):
        self.chat, self.max_batch, self.max_queue = chat, max_batch, max_queue
        self.pending: collections.deque[Job] = collections.deque()
        self.changed = threading.Condition()
        threading.Thread(target=self._work, daemon=True, name="batcher").start()

    def submit(self, prompt: str, settings: dict[str, Any], sink: Sink | None = None) -> Future:
        """A Future of (reply, requests that shared its decode loop) for a prepared request
        (ChatModel.prepare); QueueFull when max_queue requests are already waiting. `sink`, if
        given, hears the reply's token ids as they are generated, then END once the future is
        settled."""
        job = Job(prompt, settings, Future(), sink)
        with self.changed:
            if len(self.pending) >= self.max_queue:
                raise QueueFull(f"server busy: {len(self.pending)} requests queued (--max-queue)")
            self.pending.append(job)
            self.changed.notify()
        return job.future

    def _take(self, settings: dict[str, Any], room: int, skip_others: bool) -> list[Job]:
        """Up to `room` waiting jobs with `settings`, oldest first; past jobs with other
        settings (which keep their place) only if `skip_others`."""
        taken: list[Job] = []
        with self.changed:
            for job in list(self.pending):
                if len(taken) == room:
                    break
                if job.settings == settings:
                    self.pending.remove(job)
                    taken.append(job)
                elif not skip_others:
                    break
        return taken

    def _work(self) -> None:
        while True:
            with self.changed:
                while not self.pending:
                    self.changed.wait()
                first = self.pending.popleft()
            greedy = first.settings["temperature"] == 0
            more = self._take(first.settings, self.max_batch - 1, True) if greedy else []
            self._answer([first, *more], greedy)

    def _answer(self, jobs: list[Job], greedy: bool) -> None:
        settings = jobs[0].settings

        def admit(room: int) -> list[str]:
            arrived = self._take(settings, room, skip_others=False) if greedy else []
            jobs.extend(arrived)
            return [job.prompt for job in arrived]

        def on_token(index: int, token: int) -> None:
            if jobs[index].sink is not None:
                jobs[index].sink(token)

        def on_done(index: int, out: dict[str, Any]) -> None:
            job = jobs[index]
            job.future.set_result((self.chat.reply(out), len(jobs)))
            if job.sink is not None:
                job.sink(END)

        try:
            self.chat.run(
                [job.prompt for job in jobs],
                settings,
                batch_size=self.max_batch,
                on_token=on_token,
                admit=admit,
                on_done=on_done,
            )
        except Exception as exc:  # every client still waiting hears about it
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
                    if job.sink is not None:
                        job.sink(END)


def _loop_sink(queue: asyncio.Queue) -> Sink:
    """A sink that hands items from the batcher's thread to `queue`, on the running event
    loop."""
    loop = asyncio.get_running_loop()

    def sink(item: int | None) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is closed (shutting down): nobody is listening
            pass

    return sink


def create_app(chat: ChatModel, max_batch: int = 16, max_queue: int = 64,
               max_request_bytes: int = 1_000_000):  # fmt: skip
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="instructflow serve", docs_url=None, redoc_url=None)
    batcher = Batcher(chat, max_batch=max_batch, max_queue=max_queue)
    access = logging.getLogger("instructflow.serve.access")

    def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
        body = {"error": {"message": message, "type": kind}}
        return JSONResponse(body, status_code=status)

    def access_line(request: Request, status: int, note: str) -> None:
        client = request.client.host if request.client else "-"
        access.info(
            f'{client} "{request.method} {request.url.path}" {status} '
            f"{time.perf_counter() - request.state.t0:.3f}s{note}"
        )

    @app.middleware("http")
    async def access_log(request: Request, call_next):
        request.state.t0 = time.perf_counter()
        response = await call_next(request)
        # A stream writes its own line when it ends: its token counts are known only then.
        if not getattr(request.state, "streaming", False):
            access_line(request, response.status_code, getattr(request.state, "log", ""))
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
        streamed = bool(body.get("stream"))
        tokens: asyncio.Queue = asyncio.Queue()
        try:
            prompt, settings = chat.prepare(body)
            future = batcher.submit(prompt, settings, _loop_sink(tokens) if streamed else None)
        except PromptTooLong as exc:
            return error(413, str(exc))
        except RequestError as exc:
            return error(400, str(exc))
        except QueueFull as exc:
            return error(429, str(exc), "rate_limit_error")
        if streamed:
            request.state.streaming = True
            text = streaming.TextStream(chat.tok, chat.end_strings(settings))
            events = streaming.sse_events(
                chat.model_id, text, tokens, future, lambda note: access_line(request, 200, note)
            )
            return StreamingResponse(events, media_type="text/event-stream")
        # Generation runs on the batcher's thread: the event loop stays free (/health live).
        reply, batch = await asyncio.wrap_future(future)
        request.state.log = streaming.usage_note(reply, batch)
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
    import uvicorn

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    access = logging.getLogger("instructflow.serve.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False
    app = create_app(chat, **limits)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
