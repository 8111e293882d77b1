"""augment: seeded instruction rewrites ("Please ...", "Can you ...") for a fraction of rows.

An augmented row is a copy of a single-turn source row with its instruction (and the first
user message) rephrased; it gets a new id, `augmented_from` = the source id, and the source's
`group`, so split keeps it with its source (and drops it from validation/test).
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

from instructflow.artifacts import ArtifactRef, write_artifact
from instructflow.caching import stage_task
from instructflow.config import AugmentConfig
from instructflow.rows import read_jsonl, write_jsonl

# name -> rewrite of an instruction; `body` is the instruction with a lower-cased first letter.
REWRITES = {
    "please": lambda instr, body: f"Please {body}",
    "can_you": lambda instr, body: f"Can you {_no_end(body)}?",
    "could_you": lambda instr, body: f"Could you please {_no_end(body)}?",
    "i_need": lambda instr, body: f"I need your help with this: {instr}",
    "task": lambda instr, body: f"Here is a task for you. {instr}",
}
QUESTION_REWRITES = {
    "please_answer": lambda instr, body: f"Please answer the following question. {instr}",
    "can_you_tell": lambda instr, body: f"Can you tell me: {body}",
    "question": lambda instr, body: f"Question: {instr}",
}


def _no_end(text: str) -> str:
    return text.rstrip().rstrip(".!")


def _lower_first(text: str) -> str:
    # Keep acronyms and "I" as they are: only lower "Word", not "NASA" or "I".
    if len(text) > 1 and text[0].isupper() and text[1].islower():
        return text[0].lower() + text[1:]
    return text


def rewrite(instruction: str, rng: random.Random) -> tuple[str, str]:
    """A seeded rephrasing of `instruction`; returns (rewrite name, new instruction)."""
    instr = instruction.strip()
    table = QUESTION_REWRITES if instr.endswith("?") else REWRITES
    name = rng.choice(sorted(table))
    return name, table[name](instr, _lower_first(instr))


def _augment_row(row: dict[str, Any], rng: random.Random) -> dict[str, Any] | None:
    users = [m for m in row.get("messages", []) if m["role"] == "user"]
    instruction = (row.get("instruction") or "").strip()
    if len(users) != 1 or not instruction:
        return None  # multi-turn rows have no single instruction to rephrase
    name, new = rewrite(instruction, rng)
    messages = [dict(m) for m in row["messages"]]
    user = next(m for m in messages if m["role"] == "user")
    content = user["content"]
    idx = content.find(instruction)
    user["content"] = content[:idx] + new + content[idx + len(instruction) :] if idx >= 0 else new
    return {
        **row,
        "id": f"{row['id']}#aug-{name}",
        "instruction": new,
        "messages": messages,
        "augmented_from": row["id"],
        "meta": {**(row.get("meta") or {}), "augmentation": name},
    }


def augment_rows(rows: list[dict[str, Any]], cfg: AugmentConfig) -> list[dict[str, Any]]:
    """The input rows followed by augmented copies of a seeded `cfg.fraction` of them."""
    if not cfg.enabled or cfg.fraction <= 0:
        return list(rows)
    rng = random.Random(cfg.seed)
    candidates = [r for r in rows if not r.get("augmented_from")]
    chosen = rng.sample(candidates, round(len(candidates) * cfg.fraction))
    extra = [aug for r in chosen if (aug := _augment_row(r, rng)) is not None]
    return [*rows, *extra]


def augment(clean: ArtifactRef, cfg: AugmentConfig) -> ArtifactRef:
    rows = read_jsonl(clean.file("clean.jsonl"))
    out = augment_rows(rows, cfg)
    added = out[len(rows) :]
    kinds = Counter(r["meta"]["augmentation"] for r in added)

    def write(tmp: Path) -> dict[str, Any]:
        write_jsonl(tmp / "rows.jsonl", out)
        return {
            "figures": {
                "rows_in": len(rows),
                "augmented": len(added),
                "rows_out": len(out),
                **{f"by_rewrite.{k}": v for k, v in sorted(kinds.items())},
            },
            "summary": f"{len(rows)} rows + {len(added)} augmented",
        }

    return write_artifact("augment", write)


augment_task = stage_task("augment")(augment)
