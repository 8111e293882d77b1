"""An OpenAI-compatible chat-completions server for one model (FastAPI + uvicorn).

Routes: POST /v1/chat/completions, GET /v1/models, GET /health. Messages are rendered with
the model's training template (instructflow.templates) and answered by the same batched
generation code the evaluate stage uses. `stream: true` is answered in the SSE format with the
whole answer in one chunk. One request generates at a time (a lock); there is no auth, so the
default bind is 127.0.0.1.
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
    """The loaded model plus what it takes to answer one chat request."""

    def __init__(self, model, tokenizer, template: str, model_id: str, max_tokens: int = 512):
        self.model, self.tok, self.template = model, tokenizer, template
        self.model_id, self.max_tokens = model_id, max_tokens
        self.lock = threading.Lock()

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        msgs = _messages(body)
        row = {"messages": [*msgs, {"role": "assistant", "content": ""}]}
        prompt = templates.generation_prompt(row, self.template, self.tok)
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        # Above the server's cap is clamped, not refused: clients often ask for more.
        max_new = min(
            int(_number({"max_tokens": limit}, "max_tokens", 1e9, 1, 1e9)), self.max_tokens
        )
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise RequestError("'stop' must be a string or a list of strings")
        with self.lock:
            out = generation.generate(
                self.model,
                self.tok,
                [prompt],
                max_new_tokens=max_new,
                temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
                top_p=_number(body, "top_p", 1.0, 1e-6, 1.0),
                seed=int(_number(body, "seed", 0, 0, 2**63 - 1)),
                stop_strings=[*templates.stop_strings(self.template, self.tok), *stop],
                stop_tokens=[templates.end_of_turn_token(self.template, self.tok)],
                add_special_tokens=templates.add_special_tokens(self.template),
                details=True,
            )[0]
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


def create_app(chat: ChatModel):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="instructflow serve", docs_url=None, redoc_url=None)

    def error(status: int, message: str) -> JSONResponse:
        body = {"error": {"message": message, "type": "invalid_request_error"}}
        return JSONResponse(body, status_code=status)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "model": chat.model_id}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        entry = {"id": chat.model_id, "object": "model", "created": 0, "owned_by": "instructflow"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        try:
            body = await request.json()
        except ValueError:
            return error(400, "the request body is not valid JSON")
        if not isinstance(body, dict):
            return error(400, "the request body must be a JSON object")
        import anyio

        try:
            # Generation is CPU/GPU-bound: run it off the event loop so /health stays live.
            reply = await anyio.to_thread.run_sync(chat.complete, body)
        except RequestError as exc:
            return error(400, str(exc))
        if body.get("stream"):
            return StreamingResponse(_stream(reply), media_type="text/event-stream")
        return reply

    return app


def load_chat_model(spec: str, max_tokens: int = 512) -> ChatModel:
    from instructflow.loading import load_for_inference

    model, tok, template = load_for_inference(spec)
    model.eval()
    return ChatModel(model, tok, template, model_id=spec, max_tokens=max_tokens)


def serve(chat: ChatModel, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    uvicorn.run(create_app(chat), host=host, port=port, log_level="warning", access_log=False)
