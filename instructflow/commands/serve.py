"""`instructflow serve --model PATH_OR_URI`: an OpenAI-compatible chat server on loopback."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _at_least(lo: float, kind=int):
    """An argparse type: a number >= lo (argparse turns the ValueError into one line)."""

    def parse(text: str):
        value = kind(text)
        if not value >= lo:
            raise ValueError(text)
        return value

    parse.__name__ = f"{kind.__name__} >= {lo:g}"
    return parse


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible API")
    p.add_argument(
        "--model",
        required=True,
        help="builtin:tiny, a base model dir or hub id, a train artifact / PEFT adapter dir, "
        "or models:/NAME@alias",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument(
        "--max-tokens", type=_at_least(1), default=512, help="cap on max_tokens per request"
    )
    p.add_argument(
        "--max-batch", type=_at_least(1), default=16, help="greedy requests answered together (16)"
    )
    p.add_argument(
        "--max-queue",
        type=_at_least(1),
        default=64,
        help="requests waiting at most; more get 429 (64)",
    )
    p.add_argument(
        "--max-request-bytes",
        type=_at_least(1),
        default=1_000_000,
        help="larger bodies get 413 (1 MB)",
    )
    p.add_argument(
        "--max-prompt-tokens",
        type=_at_least(1),
        default=None,
        help="longer prompts get 400 (default: the model's context less one token)",
    )
    p.add_argument(
        "--max-connections",
        type=_at_least(1),
        default=1000,
        help="open connections at most; over it the oldest idle one is closed, or 503 (1000)",
    )
    p.add_argument(
        "--drain-seconds",
        type=_at_least(0, float),
        default=10.0,
        help="on SIGTERM, time for requests in progress; then 503 and exit (10)",
    )
    p.add_argument("--tracking-uri", help="MLflow store for models:/ URIs (default: workspace)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from instructflow import server

    if args.model.startswith(("models:/", "runs:/")):
        import mlflow
        from instructflow import tracking

        mlflow.set_tracking_uri(tracking.tracking_uri(args.tracking_uri))
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding {args.host}: the server has no authentication", file=sys.stderr)
    chat = server.load_chat_model(args.model, max_tokens=args.max_tokens)
    chat.max_prompt_tokens = args.max_prompt_tokens
    print(f"serving {args.model} at http://{args.host}:{args.port}/v1 (Ctrl-C stops)", flush=True)
    limits = {
        "max_batch": args.max_batch,
        "max_queue": args.max_queue,
        "max_request_bytes": args.max_request_bytes,
        "max_connections": args.max_connections,
        "drain_s": args.drain_seconds,
    }
    server.serve(chat, host=args.host, port=args.port, **limits)
    # Done: tearing the interpreter down (torch, the model) took 1-3 s more here, time a
    # SIGTERM's sender waits for; nothing is left to flush but the logs.
    logging.shutdown()
    sys.stdout.flush()
    os._exit(0)
