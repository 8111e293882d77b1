"""The demo dataset tests generalisation, not memory: the test split asks about facts the
fine-tune never sees (but pre-training stated), and no constant or copied answer passes."""

from __future__ import annotations

from collections import Counter

from demo_rows import demo_config_splits

from instructflow import demo_data
from instructflow.builtin import world


def _fact(row: dict) -> tuple[str, frozenset[str]]:
    """(task, the words of the fact): an opposite pair is one fact whichever way it is asked."""
    return row["meta"]["task"], frozenset((row["meta"]["subject"], row["output"]))


def test_generate_is_seeded_balanced_and_bounded():
    rows = demo_data.generate(seed=0)
    assert len(rows) == demo_data.size() == 400
    assert demo_data.generate(seed=0) == rows and demo_data.generate(seed=1) != rows
    assert Counter(r["task"] for r in demo_data.generate(40, seed=3)) == {
        t: 10 for t in world.FACTS
    }
    try:
        demo_data.generate(401)
    except demo_data.DemoDataError as exc:
        assert "has 400 rows" in str(exc)
    else:
        raise AssertionError("401 rows accepted")


def test_demo_test_split_is_held_out_from_the_fine_tune(home):
    parts = demo_config_splits()
    train, test = parts["train"], parts["test"]
    assert len(test) >= 60 and len(train) >= 250
    # No fact of a test row is instructed in training, in any phrasing or direction
    # (augmented rows included: they stay with their source's group).
    assert {_fact(r) for r in test}.isdisjoint({_fact(r) for r in train})
    assert not {r["meta"]["subject"] for r in test if r["meta"]["task"] == "opposite"} & {
        r["output"] for r in train if r["meta"]["task"] == "opposite"
    }

    corpus = set(world.statements())
    for row in test:
        task, subject, answer = row["meta"]["task"], row["meta"]["subject"], row["output"]
        # ... but pre-training stated it (in its probe phrasing, among others),
        assert world.STATEMENTS[task][0].format(a=subject, b=answer) in corpus
        # and pre-training never saw the instruction itself.
        assert row["instruction"] not in corpus
        # Copying the input or the subject is never right (exact match is case-sensitive).
        assert answer not in (subject, row["input"], row["instruction"])

    # No constant answer passes a task: the commonest answer is one row in each.
    by_task: dict[str, Counter] = {}
    for row in test:
        by_task.setdefault(row["meta"]["task"], Counter())[row["output"]] += 1
    assert set(by_task) == set(world.FACTS)
    assert all(c.most_common(1)[0][1] == 1 for c in by_task.values()), by_task
