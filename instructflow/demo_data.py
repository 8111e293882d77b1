"""The project's own demo dataset: instructions that ask for the facts the built-in model was
pre-trained on (instructflow.builtin.world), in Alpaca form (instruction / input / output).

One row per fact: 400 rows over four tasks (capital, opposite, plural, uppercase); an opposite
pair is asked one way only, so its reverse can't sit in another split. Each row asks in one of
its task's phrasings (seeded), and carries `task` and `subject` (both land in `meta`). Every
answer is specific to its subject: no constant answer and no copy of the input is right.
"""

from __future__ import annotations

import itertools
import random

from instructflow.builtin import world


class DemoDataError(ValueError):
    pass


def size() -> int:
    return sum(len(facts) for facts in world.FACTS.values())


def _row(relation: str, subject: str, answer: str, rng: random.Random) -> dict[str, str]:
    ask = rng.choice(world.ASKS[relation])
    return {
        "instruction": ask.instruction.format(a=subject),
        "input": ask.input.format(a=subject),
        "output": answer,
        "task": relation,
        "subject": subject,
    }


def generate(rows: int | None = None, seed: int = 0) -> list[dict[str, str]]:
    """`rows` rows (default: all), the tasks interleaved so any prefix is balanced."""
    total = size()
    if rows is not None and rows > total:
        raise DemoDataError(f"data.demo_rows={rows}: builtin:demo has {total} rows")
    rng = random.Random(seed)
    per_task: list[list[dict[str, str]]] = []
    for relation, facts in world.FACTS.items():
        made = []
        for a, b in facts:
            if relation == "opposite" and rng.random() < 0.5:
                a, b = b, a
            made.append(_row(relation, a, b, rng))
        rng.shuffle(made)
        per_task.append(made)
    out = [r for group in itertools.zip_longest(*per_task) for r in group if r is not None]
    return out[:rows] if rows is not None else out
