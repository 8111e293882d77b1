"""An OpenAI-compatible chat-completions server for one model (FastAPI + uvicorn).

Routes: POST /v1/chat/completions, GET /v1/models, GET /health. Messages are rendered with
the model's training template (instructflow.templates) and answered by the generation code
the evaluate stage uses: concurrent greedy requests with the same settings share one
continuously batched decode loop, later arrivals joining as rows finish (Batcher). Every
request is untrusted and alone: its fields are checked (chat_request: 400 naming the field),
its text that spells a special token is encoded as text (special_text), its prompt must fit
the model's context (400 saying the limit) and its completion the context left; a row that
breaks a shared batch fails only its own request. Bounded: a full queue answers 429, a body
over the limit 413 (chunked ones too, read no further), open connections are capped
(serve_net), and SIGTERM drains the requests in progress for at most --drain-seconds, then
exits. `stream: true` is answered in the SSE format token by token as the batch generates
(TextStream: only text the final answer surely starts with is sent, so the deltas add up to
exactly the non-streamed answer). One access line per request. There is no auth, so the
default bind is 127.0.0.1.
"""

import asyncio
import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from instructflow import chat_request, generation, serve_net, streaming, templates
from instructflow.batcher import Batcher, QueueFull, ShuttingDown, Sink
from instructflow.chat_request import PromptTooLong, RequestError
from instructflow.special_text import SpecialText

log = logging.getLogger(__name__)
access = logging.getLogger("instructflow.serve.access")
__all__ = ["ChatModel", "PromptTooLong", "RequestError", "create_app", "serve"]


def model_context(model) -> int | None:
    """How many positions the model takes (None when its config does not say)."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class ChatModel:
    """The loaded model plus what it takes to answer chat requests."""

    def __init__(self, model, tokenizer, template: str, model_id: str, max_tokens: int = 512):
        self.model, self.tok, self.template = model, tokenizer, template
        self.model_id, self.max_tokens = model_id, max_tokens
        self.lock = threading.Lock()
        self.max_prompt_tokens: int | None = None
        self.context = model_context(model)
        self.special = SpecialText.of(tokenizer)

    def prompt_limit(self) -> int | None:
        """The most prompt tokens taken: --max-prompt-tokens, and room for one new token."""
        limits = [n for n in (self.max_prompt_tokens, self.context and self.context - 1) if n]
        return min(limits) if limits else None

    def prepare(self, body: dict[str, Any]) -> tuple[list[int], dict[str, Any]]:
        """(prompt token ids, generation settings) of a request; RequestError when it is
        malformed, PromptTooLong when its prompt is over prompt_limit()."""
        msgs = chat_request.messages(body)
        opts = chat_request.options(body)
        row = self.special.shield({"messages": [*msgs, {"role": "assistant", "content": ""}]})
        prompt = templates.generation_prompt(row, self.template, self.tok)
        ids = self.special.encode(prompt, templates.add_special_tokens(self.template))
        limit = self.prompt_limit()
        if limit is not None and len(ids) > limit:
            context = f"; the model's context is {self.context}" if self.context else ""
            raise PromptTooLong(
                f"the prompt has {len(ids)} tokens; this server takes at most {limit}"
                f"{context} (--max-prompt-tokens)"
            )
        # Above the server's cap, or past the context, is clamped: clients often ask for more.
        room = self.context - len(ids) if self.context else opts["max_tokens"]
        settings = {
            "max_new_tokens": min(opts["max_tokens"], self.max_tokens, room),
            "temperature": opts["temperature"],
            "top_p": opts["top_p"],
            "seed": opts["seed"],
            "stop_strings": (*templates.stop_strings(self.template, self.tok), *opts["stop"]),
        }
        return ids, settings

    def end_strings(self, settings: dict[str, Any]) -> list[str]:
        """Every string generate cuts a reply at (stop strings, end-of-turn and EOS text)."""
        eot = templates.end_of_turn_token(self.template, self.tok)
        return [*settings["stop_strings"], eot, self.tok.eos_token or ""]

    def run(
        self,
        prompts: list[list[int]],
        settings: dict[str, Any],
        *,
        batch_size: int | None = None,
        on_token: generation.OnToken | None = None,
        admit: Callable[[int], list[list[int]]] | None = None,
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
    batcher = app.state.batcher = Batcher(chat, max_batch=max_batch, max_queue=max_queue)
    too_big = f"request body above {max_request_bytes} bytes (--max-request-bytes)"

    def error(status: int, message: str, kind: str = "invalid_request_error", **extra):
        body = {"error": {"message": message, "type": kind, **extra}}
        # A refused body may still be arriving: close rather than read it.
        headers = {"connection": "close"} if status == 413 else None
        return JSONResponse(body, status_code=status, headers=headers)

    def failure(request: Request, exc: BaseException) -> JSONResponse:
        """The answer to a request whose generation failed: 503 when shutting down, else
        500 with its one-line reason (never a traceback)."""
        if isinstance(exc, ShuttingDown):
            return error(503, str(exc), "server_error")
        request.state.log = f" error={type(exc).__name__}"
        return error(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error")

    def access_line(request: Request, status: int, note: str) -> None:
        client = request.client.host if request.client else "-"
        access.info(
            f'{client} "{request.method} {request.url.path}" {status} '
            f"{time.perf_counter() - request.state.t0:.3f}s{note}"
        )

    async def read_body(request: Request) -> bytes | None:
        """The body, or None past max_request_bytes (declared, or counted as it arrives: a
        chunked body has no length to check first)."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_request_bytes:
            return None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_request_bytes:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

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
        raw = await read_body(request)
        if raw is None:
            return error(413, too_big)
        tokens: asyncio.Queue = asyncio.Queue()
        try:
            body = chat_request.parse_body(raw)
            streamed = body.get("stream") is True
            # Off the event loop: a long prompt's encoding must not stall other clients.
            prompt, settings = await asyncio.get_running_loop().run_in_executor(
                None, chat.prepare, body
            )
            future = batcher.submit(prompt, settings, _loop_sink(tokens) if streamed else None)
        except RequestError as exc:
            return error(400, str(exc), **({"code": exc.code} if exc.code else {}))
        except QueueFull as exc:
            return error(429, str(exc), "rate_limit_error")
        except Exception as exc:  # not the client's fault, and not worth a traceback
            return failure(request, exc)
        if streamed:
            request.state.streaming = True
            text = streaming.TextStream(chat.tok, chat.end_strings(settings))
            events = streaming.sse_events(
                chat.model_id, text, tokens, future, lambda note: access_line(request, 200, note)
            )
            return StreamingResponse(events, media_type="text/event-stream")
        # Generation runs on the batcher's thread: the event loop stays free (/health live).
        try:
            reply, batch = await asyncio.wrap_future(future)
        except Exception as exc:
            return failure(request, exc)
        request.state.log = streaming.usage_note(reply, batch)
        return reply

    return app


def load_chat_model(spec: str, max_tokens: int = 512) -> ChatModel:
    from instructflow.model_specs import load_for_inference

    model, tok, template = load_for_inference(spec)
    model.eval()
    return ChatModel(model, tok, template, model_id=spec, max_tokens=max_tokens)


def serve(
    chat: ChatModel,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_connections: int = 1000,
    drain_s: float = 10.0,
    **limits: int,
) -> None:
    """`limits`: max_batch, max_queue, max_request_bytes (create_app). One access line per
    request goes to stderr; SIGTERM drains for at most `drain_s`, then returns."""
    import uvicorn

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False
    cap = serve_net.connection_cap(max_connections)
    if cap < max_connections:
        access.warning(f"--max-connections {max_connections} lowered to {cap}: the fd limit")
    app = create_app(chat, **limits)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        http=serve_net.capped_protocol(cap),
        timeout_graceful_shutdown=max(1, round(drain_s)),
    )
    serve_net.one_line_logs("uvicorn.error", "asyncio")  # after Config: it sets up logging
    # uvicorn raises SIGTERM again once it has shut down: by then there is nothing left to do.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            busy = len(self.server_state.tasks)
            access.info(f"shutting down: {busy} requests in progress, {drain_s:g} s to finish")
            # Those left a second early fail with 503, written before uvicorn cancels them.
            asyncio.get_running_loop().call_later(max(0.0, drain_s - 1), app.state.batcher.stop)
            await super().shutdown(sockets)

    Server(config).run()
