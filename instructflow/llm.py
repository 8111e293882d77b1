"""A client for OpenAI-compatible /v1/chat/completions endpoints, shared by the judge
(instructflow.judge) and model-made data (tasks/synthesize.py).

The API key is read from the environment variable NAMED in the config and lives only in the
request header. Replies are cached on disk by (model, messages, seed, sampling parameters), so a
re-run, or a run that resumes after the endpoint died, sends only what it has not asked before.
Retries with exponential backoff on connection errors, timeouts and 408/409/425/429/5xx; an
unreachable host stops every other request at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class LLMError(RuntimeError):
    pass


class CallBudgetSpent(LLMError):
    """The per-run cap on requests (cache misses) is reached."""


def public_url(url: str | None) -> str | None:
    """The URL without credentials or query string (safe to log)."""
    if not url:
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class ReplyCache:
    """Replies on disk under `root` (default <workspace>/judge_cache), one file per key,
    written atomically."""

    def __init__(self, model_id: str, root: Path | None = None):
        from instructflow import workspace

        self.root = root if root is not None else workspace.home() / "judge_cache"
        self.model_id = model_id

    def key(self, messages: list[dict[str, str]], seed: int, params: dict | None = None) -> str:
        blob: dict[str, Any] = {"model": self.model_id, "messages": messages, "seed": seed}
        if params:
            blob["params"] = params
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> str | None:
        path = self.root / key[:2] / f"{key}.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))["reply"]
        except (OSError, ValueError, KeyError):
            return None

    def put(self, key: str, reply: str) -> None:
        path = self.root / key[:2] / f"{key}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps({"model": self.model_id, "reply": reply}), encoding="utf-8")
        os.replace(tmp, path)


class ChatClient:
    """POST /chat/completions with caching, retries and an optional cap on requests sent.

    `what` names the endpoint in errors ("judge endpoint", "synthesis endpoint").
    `params`: sampling parameters sent with every request (temperature, max_tokens ...); they
    are part of the cache key. `max_requests`: requests (cache misses) allowed, None: no cap.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None,
        timeout_s: float,
        max_retries: int,
        seed: int,
        params: dict[str, Any],
        cache: ReplyCache,
        what: str,
        max_requests: int | None = None,
    ):
        import httpx

        headers = {}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise LLMError(f"{what}: environment variable {api_key_env} is unset")
            headers["Authorization"] = f"Bearer {key}"
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.seed = seed
        self.params = params
        self.cache = cache
        self.what = what
        self.max_requests = max_requests
        self.client = httpx.Client(timeout=httpx.Timeout(timeout_s), headers=headers)
        self.unreachable: str | None = None
        self.requests = 0  # HTTP requests actually sent (cache misses, retries included)
        self.cache_hits = 0
        self._lock = threading.Lock()

    @classmethod
    def for_endpoint(
        cls,
        cfg,
        *,
        params: dict[str, Any],
        cache_root: Path | None,
        what: str,
        max_requests: int | None = None,
    ) -> ChatClient:
        """A client for an `instructflow.config.LLMEndpoint` (judge.*, synthesize.llm.*)."""
        return cls(
            cfg.base_url,
            cfg.model,
            api_key_env=cfg.api_key_env,
            timeout_s=cfg.timeout_s,
            max_retries=cfg.max_retries,
            seed=cfg.seed,
            params=params,
            cache=ReplyCache(cfg.model, cache_root),
            what=what,
            max_requests=max_requests,
        )

    def close(self) -> None:
        self.client.close()

    def chat(self, messages: list[dict[str, str]], seed: int | None = None) -> str:
        """The reply to `messages`; `seed`: this request's (default: the client's)."""
        seed = self.seed if seed is None else seed
        key = self.cache.key(messages, seed, self.params)
        cached = self.cache.get(key)
        if cached is not None:
            with self._lock:
                self.cache_hits += 1
            return cached
        reply = self._post(messages, seed)
        self.cache.put(key, reply)
        return reply

    def _post(self, messages: list[dict[str, str]], seed: int) -> str:
        import httpx

        body = {"model": self.model, "messages": messages, "seed": seed, **self.params}
        where = f"{self.what} {public_url(self.url)}"
        error = "no attempt"
        for attempt in range(self.max_retries + 1):
            if self.unreachable:
                raise LLMError(self.unreachable)
            if attempt:
                time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0) * (1 + random.random() / 4))
            with self._lock:
                if self.max_requests is not None and self.requests >= self.max_requests:
                    raise CallBudgetSpent(f"{self.what}: the cap of {self.max_requests} calls")
                self.requests += 1
            try:
                resp = self.client.post(self.url, json=body)
            except httpx.ConnectError:
                error = f"{where} is unreachable (connection refused or no route)"
                continue
            except httpx.TimeoutException:
                error = f"{where} timed out after {self.timeout_s:g}s"
                continue
            except httpx.HTTPError as exc:
                error = f"{where}: {type(exc).__name__}"
                continue
            if resp.status_code in RETRY_STATUS:
                error = f"{where}: HTTP {resp.status_code}"
                continue
            if resp.status_code >= 400:
                raise LLMError(f"{where}: HTTP {resp.status_code}")
            try:
                return resp.json()["choices"][0]["message"]["content"] or ""
            except (ValueError, KeyError, IndexError, TypeError):
                raise LLMError(f"{where}: not a chat-completions reply") from None
        if "unreachable" in error:
            # Stop every other request at once instead of retrying each against a dead host.
            self.unreachable = error
        raise LLMError(error)
