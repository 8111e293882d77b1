"""augment: seeded instruction rewrites ("Please ...", "Can you ...") for a fraction of rows.

An augmented row is a copy of a single-turn source row with its instruction (and the first
user message) rephrased; it gets a new id, `augmented_from` = the source id, and the source's
`group`, so split keeps it with its source (and drops it from validation/test).
"""

from __future__ import annotations

import json
import random
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from instructflow.artifacts import ArtifactRef, write_artifact
from instructflow.caching import stage_task
from instructflow.config import AugmentConfig

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
    candidates = [r for r in rows if not r.get("augmented_from")]
    return [*rows, *augmented(candidates.__getitem__, len(candidates), cfg)]


def augmented(row_at: Callable[[int], dict], n_candidates: int, cfg: AugmentConfig) -> Iterator:
    """Augmented copies of a seeded `cfg.fraction` of the candidates (rows that are not
    augmented themselves), in the seeded order; `row_at(k)`: the k-th candidate."""
    if not cfg.enabled or cfg.fraction <= 0:
        return
    rng = random.Random(cfg.seed)
    # Sampling indices picks what sampling the rows would (random.sample works on indices).
    for k in rng.sample(range(n_candidates), round(n_candidates * cfg.fraction)):
        aug = _augment_row(row_at(k), rng)
        if aug is not None:
            yield aug


def augment(clean: ArtifactRef, cfg: AugmentConfig) -> ArtifactRef:
    """Streams: the rows are copied line by line and the chosen ones read back by offset,
    so memory holds one offset per row, not the rows."""
    source = clean.file("clean.jsonl")

    def write(tmp: Path) -> dict[str, Any]:
        offsets = array("q")  # byte offset of every candidate row
        rows_in = 0
        kinds: Counter[str] = Counter()
        with open(source, "rb") as src, open(tmp / "rows.jsonl", "wb") as out:
            for line in iter(src.readline, b""):
                if not line.strip():
                    continue
                out.write(line if line.endswith(b"\n") else line + b"\n")
                rows_in += 1
                if not json.loads(line).get("augmented_from"):
                    offsets.append(src.tell() - len(line))

            def row_at(k: int) -> dict[str, Any]:
                src.seek(offsets[k])
                return json.loads(src.readline())

            for aug in augmented(row_at, len(offsets), cfg):
                kinds[aug["meta"]["augmentation"]] += 1
                out.write((json.dumps(aug, ensure_ascii=False) + "\n").encode())
        added = sum(kinds.values())
        return {
            "figures": {
                "rows_in": rows_in,
                "augmented": added,
                "rows_out": rows_in + added,
                **{f"by_rewrite.{k}": v for k, v in sorted(kinds.items())},
            },
            "summary": f"{rows_in} rows + {added} augmented",
        }

    return write_artifact("augment", write)


augment_task = stage_task("augment")(augment)
