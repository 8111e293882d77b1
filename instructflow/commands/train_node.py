"""`instructflow train-node SPEC`: one more node for a multi-node train stage.

The pipeline's train stage (train.nnodes > 1) writes SPEC into its work dir on the shared
workspace and waits at the c10d rendezvous; this starts this machine's torchrun agent there.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("train-node", help="join a multi-node train stage from another machine")
    p.add_argument("spec", type=Path, help="the node spec the train stage printed")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from instructflow.training import trainer

    if not args.spec.is_file():
        raise FileNotFoundError(f"{args.spec}: no such node spec (is the workspace shared?)")
    return trainer.join_node(args.spec)
