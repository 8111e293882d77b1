"""`instructflow serve --model PATH_OR_URI`: an OpenAI-compatible chat server on loopback."""

from __future__ import annotations

import argparse
import sys


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
    p.add_argument("--max-tokens", type=int, default=512, help="cap on max_tokens per request")
    p.add_argument(
        "--max-batch", type=int, default=16, help="greedy requests answered together (16)"
    )
    p.add_argument(
        "--max-queue", type=int, default=64, help="requests waiting at most; more get 429 (64)"
    )
    p.add_argument(
        "--max-request-bytes", type=int, default=1_000_000, help="larger bodies get 413 (1 MB)"
    )
    p.add_argument(
        "--max-prompt-tokens", type=int, default=None, help="longer prompts get 413 (no limit)"
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
    }
    server.serve(chat, host=args.host, port=args.port, **limits)
    return 0
