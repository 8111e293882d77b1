"""Small real inputs for the evaluate / judge / serve tests: the builtin tokenizer and base
model, a train artifact holding a fresh (non-zero) LoRA adapter, and a split with test rows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from demo_rows import canonical_demo_rows

from instructflow.artifacts import ArtifactRef, write_artifact
from instructflow.config import ModelConfig
from instructflow.loading import load_base_model
from tasks.base_model import prepare_base_model, prepare_tokenizer


def canonical_rows(n: int, seed: int = 7) -> list[dict]:
    return canonical_demo_rows(n, seed)


def make_splits(rows: list[dict]) -> ArtifactRef:
    """A split artifact whose test (and, so that tokenize accepts it, train) split is `rows`."""

    def write(tmp: Path):
        lines = "".join(json.dumps(r) + "\n" for r in rows)
        (tmp / "train.jsonl").write_text(lines)
        (tmp / "validation.jsonl").write_text("")
        (tmp / "test.jsonl").write_text(lines)
        return {}

    return write_artifact("split", write)


def make_tokenized(
    splits: ArtifactRef, tok: ArtifactRef, template: str = "alpaca", max_length: int = 128
) -> ArtifactRef:
    """The real tokenize stage's artifact for `splits`."""
    from instructflow.config import TokenizeConfig
    from tasks.tokenize import tokenize

    return tokenize(splits, tok, TokenizeConfig(template=template, max_length=max_length))


def make_inputs(
    rows: list[dict], tok: ArtifactRef, template: str = "alpaca", max_length: int = 128
):
    """(splits, tokenized) artifacts for evaluating on `rows`."""
    splits = make_splits(rows)
    return splits, make_tokenized(splits, tok, template, max_length)


def make_base() -> tuple[ArtifactRef, ArtifactRef]:
    tok = prepare_tokenizer(ModelConfig())
    return tok, prepare_base_model(ModelConfig(), tok)


def make_train(base: ArtifactRef, tok: ArtifactRef, template: str = "alpaca") -> ArtifactRef:
    """A train artifact with a LoRA adapter whose B matrices are random (so it differs)."""
    from peft import LoraConfig, get_peft_model

    model = load_base_model(base)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)

    def write(tmp: Path):
        peft.save_pretrained(str(tmp / "adapter"))
        shutil.copytree(tok.path, tmp / "tokenizer", ignore=shutil.ignore_patterns("MANIFEST.json"))
        info = {
            "method": "lora",
            "base_model": json.loads(base.file("model.json").read_text()),
            "template": template,
            "metrics": {},
        }
        (tmp / "train.json").write_text(json.dumps(info))
        return {}

    return write_artifact("train", write)
