"""augment on canonical rows: seeded rewrites of a fraction, tagged with their source."""

from __future__ import annotations

from demo_rows import canonical_demo_rows

from instructflow.config import AugmentConfig
from tasks.augment import augment_rows


def canonical(n: int, seed: int = 0) -> list[dict]:
    return canonical_demo_rows(n, seed)


def test_augment_rewrites_a_seeded_fraction_and_tags_the_source():
    rows = canonical(200)
    out = augment_rows(rows, AugmentConfig(fraction=0.25, seed=1))
    added = out[200:]
    assert out[:200] == rows and len(added) == 50
    by_id = {r["id"]: r for r in rows}
    for aug in added:
        src = by_id[aug["augmented_from"]]
        assert aug["id"] != src["id"] and aug["group"] == src["group"]
        assert aug["instruction"] != src["instruction"]
        assert aug["messages"][0]["content"].startswith(aug["instruction"])
        assert aug["messages"][0]["content"].endswith(src["input"])  # the input is kept
        assert aug["output"] == src["output"] and aug["meta"]["task"] == src["meta"]["task"]
        assert aug["instruction"].split()[0] in {"Please", "Can", "Could", "I", "Here", "Question:"}
    assert augment_rows(rows, AugmentConfig(fraction=0.25, seed=1)) == out
    other = augment_rows(rows, AugmentConfig(fraction=0.25, seed=2))[200:]
    assert {r["id"] for r in other} != {r["id"] for r in added}
    assert augment_rows(rows, AugmentConfig(enabled=False)) == rows


def test_augment_skips_multi_turn_rows():
    row = canonical(1)[0]
    row["messages"] = row["messages"] + row["messages"]
    assert augment_rows([row], AugmentConfig(fraction=1.0)) == [row]
