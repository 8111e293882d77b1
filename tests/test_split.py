"""split on canonical rows: group-aware, stratified, decontaminated, never an empty test set."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from demo_rows import canonical_demo_rows

from instructflow.artifacts import write_artifact
from instructflow.config import AugmentConfig, SplitConfig
from instructflow.rows import read_jsonl
from tasks.augment import augment, augment_rows
from tasks.split import SPLITS, SplitError, read_split, split, split_rows


def canonical(n: int, seed: int = 0) -> list[dict]:
    return canonical_demo_rows(n, seed)


def test_split_keeps_groups_together_and_augmentations_out_of_eval():
    rows = canonical(300)
    for r in rows[:60]:  # duplicates share a group with their original
        rows.append({**r, "id": r["id"] + "-dup"})
    rows = augment_rows(rows, AugmentConfig(fraction=0.3, seed=0))
    parts, report = split_rows(rows, SplitConfig(seed=3, decontaminate=False))
    where = {}
    for name in SPLITS:
        for r in parts[name]:
            assert where.setdefault(r["group"], name) == name, "a group spans two splits"
    assert all(not r["augmented_from"] for n in ("validation", "test") for r in parts[n])
    dropped = report["augmented_dropped_from_eval"]
    assert sum(len(p) for p in parts.values()) + dropped == len(rows)
    groups = report["groups"]
    assert groups == 300
    n_groups = {n: len({r["group"] for r in parts[n]}) for n in SPLITS}
    assert n_groups == {"train": 255, "validation": 30, "test": 15}
    again, _ = split_rows(rows, SplitConfig(seed=3, decontaminate=False))
    assert again == parts
    other, _ = split_rows(rows, SplitConfig(seed=4, decontaminate=False))
    assert {r["id"] for r in other["test"]} != {r["id"] for r in parts["test"]}


@pytest.mark.parametrize("n", [20, 21, 37])
def test_test_split_is_never_empty_from_twenty_rows(n):
    parts, _ = split_rows(canonical(n), SplitConfig())
    assert parts["test"] and parts["validation"] and parts["train"]


def test_split_stratifies_by_a_column():
    rows = canonical(400, seed=5)
    cfg = SplitConfig(seed=0, stratify_by="meta.task", decontaminate=False)
    parts, report = split_rows(rows, cfg)
    assert report["stratified"] is True
    overall = Counter(r["meta"]["task"] for r in rows)
    test = Counter(r["meta"]["task"] for r in parts["test"])
    for task, count in overall.items():
        assert abs(test[task] - count * 0.05) <= 1.0, (task, test[task], count)


def test_decontamination_drops_train_rows_near_duplicate_to_held_out_rows():
    rows = canonical(200, seed=9)
    # A slightly different copy of every row, in its own group (so the split cannot see it).
    twins = [
        {**r, "id": r["id"] + "-twin", "group": r["group"] + "-twin",
         "messages": [{**r["messages"][0], "content": r["messages"][0]["content"] + " !"},
                      r["messages"][1]]}
        for r in rows
    ]  # fmt: skip

    def crossing(parts):
        """Pairs with one copy in train and the other held out."""
        held = {r["id"].removesuffix("-twin") for n in ("validation", "test") for r in parts[n]}
        return {r["id"].removesuffix("-twin") for r in parts["train"]} & held

    loose, _ = split_rows(rows + twins, SplitConfig(seed=1, decontaminate=False))
    assert crossing(loose), "the fixture must put some pairs across the split"
    parts, report = split_rows(rows + twins, SplitConfig(seed=1, decontamination_threshold=0.9))
    assert not crossing(parts)
    assert report["decontaminated"] == len(loose["train"]) - len(parts["train"]) > 0
    assert len(report["decontaminated_ids"]) == report["decontaminated"]


def test_too_few_rows_fail_in_one_line():
    with pytest.raises(SplitError, match="too few"):
        split_rows(canonical(2), SplitConfig())


def test_stage_functions_write_artifacts_with_datasets_and_counts(home):
    rows = canonical(120)

    def write(tmp):
        with open(tmp / "clean.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)

    clean = write_artifact("validate", write)
    aug = augment(clean, AugmentConfig(fraction=0.1))
    assert aug.figures["augmented"] == 12
    assert len(read_jsonl(aug.file("rows.jsonl"))) == 132
    ref = split(aug, SplitConfig())
    meta = ref.meta
    assert [d["context"] for d in meta["datasets"]] == ["train", "validation", "test"]
    counts = {n: len(read_split(ref, n)) for n in SPLITS}
    assert {f"rows_{n}": c for n, c in counts.items()}.items() <= ref.figures.items()
    report = json.loads(ref.file("report.json").read_text())
    assert report["rows"] == counts


def test_a_zero_fraction_gives_an_empty_split():
    parts, report = split_rows(canonical(50), SplitConfig(train=0.8, validation=0.0, test=0.2))
    assert parts["validation"] == [] and len({r["group"] for r in parts["test"]}) == 10


def test_ordered_split_cuts_the_file_as_the_lecture_does(home):
    """builtin:ch07 with method ordered: train = the first 85 % of the file, then test, then
    validation (LLMs-from-scratch ch07), prompts repeated across a cut kept on one side."""
    from instructflow.config import DataConfig, ValidateConfig
    from tasks.download import download
    from tasks.validate import validate

    clean = validate(download(DataConfig(source="builtin:ch07")), ValidateConfig(format="alpaca"))
    rows = read_jsonl(clean.file("clean.jsonl"))
    cfg = SplitConfig(method="ordered", train=0.85, validation=0.05, test=0.10)
    parts, report = split_rows(rows, cfg)
    order = {r["id"]: i for i, r in enumerate(rows)}
    position = {n: sorted(order[r["id"]] for r in parts[n]) for n in SPLITS}
    # Groups in file order: every test row comes after the training rows' groups began and
    # before validation's; the held-out sets are contiguous runs of the file.
    first_of_group = {}
    for i, r in enumerate(rows):
        first_of_group.setdefault(r["group"], i)
    starts = {n: sorted({first_of_group[r["group"]] for r in parts[n]}) for n in SPLITS}
    assert max(starts["train"]) < min(starts["test"]) <= max(starts["test"])
    assert max(starts["test"]) < min(starts["validation"])
    n_groups = report["groups"]
    assert len(starts["test"]) == round(0.10 * n_groups)
    assert len(starts["validation"]) == round(0.05 * n_groups)
    assert position["test"] == sorted(position["test"])
    again, _ = split_rows(rows, cfg.model_copy(update={"seed": 7}))
    assert again == parts  # no randomness
    with pytest.raises(ValueError, match="cannot stratify_by"):
        SplitConfig(method="ordered", stratify_by="meta.task")
