"""`instructflow generate --model URI "instruction"`: one answer from a fine-tuned model."""

from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    p = sub.add_parser("generate", help="answer an instruction with a fine-tuned model")
    p.add_argument(
        "--model",
        required=True,
        help="models:/NAME@champion, models:/NAME/3, runs:/ID/model, a train artifact dir "
        "or a PEFT adapter dir",
    )
    p.add_argument("instruction", help="the instruction ('-' reads it from stdin)")
    p.add_argument("--input", default="", help="optional input/context for the instruction")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length cap (default: 64)")
    p.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples"
    )
    p.add_argument("--tracking-uri", help="MLflow store (default: the workspace's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import mlflow
    from instructflow import model_specs, registry, tracking

    mlflow.set_tracking_uri(tracking.tracking_uri(args.tracking_uri))
    instruction = sys.stdin.read() if args.instruction == "-" else args.instruction
    model, tokenizer, template = model_specs.load_for_inference(args.model)
    print(
        registry.generate(
            model,
            tokenizer,
            template,
            instruction,
            args.input,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
        )
    )
    return 0
