"""MinHash + LSH near-duplicate search agrees with the exact search on real rows with planted
near-duplicates (validate's dedup and split's decontamination), and the reports say which
search ran."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from instructflow import minhash
from tasks.split import decontaminate
from tasks.validate import near_duplicates


def _planted(shared_datasets, n: int = 3000, seed: int = 0):
    """Alpaca rows as texts, and a near copy (a word dropped, every other one upper-cased) of
    every 10th row above 200 characters, placed after its original."""
    path = shared_datasets / "stanford_alpaca_subsets" / "random_9k.json"
    rows = json.loads(path.read_text(encoding="utf-8"))[:n]
    rng = random.Random(seed)
    texts, planted = [], {}
    for k, r in enumerate(rows):
        text = f"user: {r['instruction']}\n{r['input']}\nassistant: {r['output']}"
        texts.append(text)
        if k % 10 == 0 and len(text) > 200:
            words = text.split(" ")
            words.pop(rng.randrange(1, len(words)))
            copy = " ".join(words)
            copy = copy.upper() if k % 20 == 0 else copy  # the search ignores case
            planted[len(texts)] = len(texts) - 1
            texts.append(copy)
    return texts, planted


def test_lsh_finds_the_same_near_duplicates_as_the_exact_search(shared_datasets):
    texts, planted = _planted(shared_datasets)
    exact = near_duplicates(texts, 0.9)
    lsh = near_duplicates(texts, 0.9, lsh_min_rows=2)
    assert lsh == exact
    # Every planted copy is found (pointing at its original or at an earlier duplicate).
    assert set(planted) <= set(lsh)
    assert sum(lsh[j] == i for j, i in planted.items()) >= 0.95 * len(planted)


def test_lsh_decontamination_drops_the_same_rows(shared_datasets):
    texts, planted = _planted(shared_datasets, n=2000, seed=1)
    answer = {"role": "assistant", "content": "-"}  # prompt_text: all turns but the answer
    rows = [
        {"id": str(k), "messages": [{"role": "user", "content": t}, answer]}
        for k, t in enumerate(texts)
    ]
    # Originals of planted copies held out; their copies (and everything else) in train.
    held = [rows[i] for i in planted.values()]
    train = [r for k, r in enumerate(rows) if k not in set(planted.values())]
    exact_kept, exact_dropped = decontaminate(train, held, 0.9)
    lsh_kept, lsh_dropped = decontaminate(train, held, 0.9, lsh_min_rows=2)
    assert [r["id"] for r in lsh_dropped] == [r["id"] for r in exact_dropped]
    assert {r["id"] for r in exact_dropped} >= {str(j) for j in planted}


def test_signatures_are_seeded_and_bounded_per_bucket():
    texts = [f"the same templated sentence about item number {i % 7}" for i in range(500)]
    sig = minhash.signatures(texts)
    assert np.array_equal(sig, minhash.signatures(texts))
    assert not np.array_equal(sig, minhash.signatures(texts, seed=1))
    later, earlier = minhash.candidate_pairs(sig)
    assert (later > earlier).all()
    # 500 rows in 7 buckets of near-identical text: at most MAX_PER_BUCKET partners per row.
    per_row = np.bincount(later, minlength=len(texts))
    assert per_row.max() <= minhash.MAX_PER_BUCKET * minhash.BANDS
    # Uncapped, 500 rows this alike would give up to 124,750 pairs.
    assert len(later) < len(texts) * (len(texts) - 1) // 2 // 2
    # A text without any character n-gram matches nothing (not even another such text).
    short = minhash.signatures(["", " ", "a longer sentence here"])
    assert len(minhash.candidate_pairs(short)[0]) == 0


@pytest.mark.parametrize("lsh_min_rows, method", [(None, "exact"), (2, "minhash_lsh")])
def test_the_validate_and_split_reports_name_the_search(home, tmp_path, lsh_min_rows, method):
    from instructflow.config import DataConfig, SplitConfig, ValidateConfig
    from tasks.download import download
    from tasks.split import split
    from tasks.validate import validate

    path = tmp_path / "rows.json"
    rows = [{"instruction": f"Say the number {i} in words.", "output": f"n{i}"} for i in range(30)]
    path.write_text(json.dumps(rows))
    ref = validate(
        download(DataConfig(source=str(path))), ValidateConfig(lsh_min_rows=lsh_min_rows)
    )
    assert json.loads(ref.file("report.json").read_text())["near_duplicate_method"] == method
    from instructflow.config import AugmentConfig
    from tasks.augment import augment

    parts = split(
        augment(ref, AugmentConfig(enabled=False)), SplitConfig(lsh_min_rows=lsh_min_rows)
    )
    assert json.loads(parts.file("report.json").read_text())["decontamination_method"] == method
