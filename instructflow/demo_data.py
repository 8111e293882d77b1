"""The project's own demo dataset: generated tasks with checkable answers.

Short, regular tasks (reverse, sort, add, uppercase, count) that a ~7M-parameter model can
visibly learn on a CPU in minutes, in Alpaca form. Deterministic for a given seed.
"""

from __future__ import annotations

import random

WORDS = (
    "apple river stone cloud maple tiger piano orange silver garden rocket lemon window "
    "forest candle marble pepper violet harbor meadow falcon copper summer winter"
).split()


def _reverse(rng: random.Random) -> dict[str, str]:
    words = rng.sample(WORDS, rng.randint(2, 4))
    return {
        "instruction": "Reverse the order of the words.",
        "input": " ".join(words),
        "output": " ".join(reversed(words)),
    }


def _sort(rng: random.Random) -> dict[str, str]:
    nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 5))]
    return {
        "instruction": "Sort the numbers in ascending order.",
        "input": ", ".join(map(str, nums)),
        "output": ", ".join(map(str, sorted(nums))),
    }


def _add(rng: random.Random) -> dict[str, str]:
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    return {"instruction": f"What is {a} plus {b}?", "input": "", "output": str(a + b)}


def _upper(rng: random.Random) -> dict[str, str]:
    words = rng.sample(WORDS, rng.randint(1, 3))
    text = " ".join(words)
    return {"instruction": "Convert the text to uppercase.", "input": text, "output": text.upper()}


def _count(rng: random.Random) -> dict[str, str]:
    word = rng.choice(WORDS)
    return {
        "instruction": f"How many letters are in the word '{word}'?",
        "input": "",
        "output": str(len(word)),
    }


GENERATORS = (_reverse, _sort, _add, _upper, _count)


def generate(rows: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out: list[dict[str, str]] = []
    seen: set[tuple[str, str]] = set()
    attempts = 0
    while len(out) < rows and attempts < rows * 50:
        attempts += 1
        row = rng.choice(GENERATORS)(rng)
        key = (row["instruction"], row["input"])
        if key in seen:
            continue
        seen.add(key)
        row["task"] = row["instruction"].split()[0].lower()
        out.append(row)
    return out
