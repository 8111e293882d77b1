"""Tokenize-artifact stand-ins for tests (same layout as the tokenize stage).

Rows are rendered with `instructflow.templates` and tokenised segment by segment: prompt
tokens get label -100, response tokens (and the end-of-turn token) are trained.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from instructflow import templates
from instructflow.artifacts import ArtifactRef, write_artifact
from instructflow.templates import IGNORE_INDEX


def tokenize_row(row: dict[str, Any], tokenizer, template: str = "alpaca") -> dict[str, list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    for text, trainable in templates.segments(row, template, tokenizer):
        piece = tokenizer(text, add_special_tokens=False).input_ids
        ids += piece
        labels += piece if trainable else [IGNORE_INDEX] * len(piece)
    return {"input_ids": ids, "labels": labels, "length": len(ids)}


def tokenize_rows(
    rows: list[dict[str, Any]], tokenizer, template: str = "alpaca", max_length: int = 512
) -> list[dict[str, Any]]:
    out, seen = [], set()
    for row in rows:
        ex = tokenize_row(row, tokenizer, template)
        key = tuple(ex["input_ids"])
        # Distinct examples only, so tests can tell which rank saw which example.
        if ex["length"] <= max_length and key not in seen:
            seen.add(key)
            out.append(ex)
    return out


def write_tokenized(
    splits: dict[str, list[dict[str, Any]]], tokenizer, template: str = "alpaca", max_length=512
) -> ArtifactRef:
    """Publish a `tokenize` artifact from canonical/Alpaca rows per split."""
    import datasets

    features = datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "labels": datasets.Sequence(datasets.Value("int32")),
            "length": datasets.Value("int32"),
        }
    )

    def write(tmp: Path) -> dict[str, Any]:
        counts = {}
        for name, rows in splits.items():
            examples = tokenize_rows(rows, tokenizer, template, max_length)
            cols = {k: [e[k] for e in examples] for k in ("input_ids", "labels", "length")}
            datasets.Dataset.from_dict(cols, features=features).save_to_disk(str(tmp / name))
            counts[name] = len(examples)
        report = {"template": template, "max_length": max_length, "examples": counts}
        (tmp / "report.json").write_text(json.dumps(report, indent=1))
        return {"params": {"template": template}}

    return write_artifact("tokenize", write)
