"""MinHash + LSH candidate pairs for near-duplicate search at scale (validate's dedup and
split's decontamination above their `lsh_min_rows`).

The exact searches compare every row with every kept row: quadratic. Here each text gets a
MinHash signature of its character 5-gram set (num_perm = bands x rows_per_band values), rows
whose signatures agree on all values of at least one band become candidate pairs, and the
caller scores only the candidates with its own exact measure (TF-IDF cosine), so a pair it
reports is a pair the exact search reports too; what LSH can add is a miss. With 16 bands of
4, a pair with 5-gram Jaccard similarity s is a candidate with probability 1 - (1 - s^4)^16:
0.987 at s = 0.7, above 0.9999 at s = 0.85 (near-duplicates at cosine 0.9-0.95 sit there).

Written by hand, vectorised with numpy, rather than with datasketch: its MinHash updates one
shingle at a time in Python (~100x slower on a million rows), and its LSH index is a dict of
Python sets. Shingles are hashed by scikit-learn's HashingVectorizer (C speed).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

SHIFT = np.uint64(32)  # multiply-shift hashing: ((a * x + b) mod 2**64) >> 32, a odd
FEATURES = 2**30
BANDS, ROWS_PER_BAND = 16, 4
# Candidates per row within one bucket at most (the earliest members): a bucket of 10,000
# templated rows must not become 50M pairs. Each row still meets the bucket's first rows.
MAX_PER_BUCKET = 64


def _shingles(texts: list[str]):
    from sklearn.feature_extraction.text import HashingVectorizer

    vec = HashingVectorizer(
        analyzer="char_wb",
        ngram_range=(5, 5),
        n_features=FEATURES,
        alternate_sign=False,
        norm=None,
        binary=True,
        lowercase=True,
    )
    return vec.transform(texts).tocsr()


def signatures(texts: list[str], seed: int = 0, block: int = 20_000) -> np.ndarray:
    """(len(texts), BANDS * ROWS_PER_BAND) uint32 MinHash values; block by block so memory
    stays bounded. A text without any 5-gram gets a signature no other row shares."""
    parts = [
        signatures_of(_shingles(texts[start : start + block]), seed, start)
        for start in range(0, len(texts), block)
    ]
    return np.concatenate(parts) if parts else np.empty((0, BANDS * ROWS_PER_BAND), np.uint32)


def signatures_of(X, seed: int = 0, first_row: int = 0) -> np.ndarray:
    """MinHash values of the rows of a sparse matrix of hashed 5-gram features (any values:
    only which features a row has counts). `first_row`: the rows' place in the whole input,
    which makes the signatures of rows without any 5-gram unique."""
    k = BANDS * ROWS_PER_BAND
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**63, size=k, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, size=k, dtype=np.uint64)
    out = np.empty((X.shape[0], k), dtype=np.uint32)
    idx = X.indices.astype(np.uint64)
    lengths = np.diff(X.indptr)
    empty = lengths == 0
    starts = X.indptr[:-1].copy()
    starts[empty] = 0  # reduceat needs valid offsets; these rows are overwritten below
    for p in range(k):
        values = (a[p] * idx + b[p]) >> SHIFT  # wraps mod 2**64 by design
        if len(values):
            out[:, p] = np.minimum.reduceat(values, starts)
    rows = np.flatnonzero(empty) + first_row
    out[empty] = (np.uint32(2**32 - 1) - rows[:, None]).astype(np.uint32)
    return out


def agreement(A: np.ndarray, B: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Share of equal MinHash values of rows A[a[k]] and B[b[k]]: their estimated Jaccard
    similarity (standard error <= 0.0625 with 64 values)."""
    out = np.empty(len(a), dtype=np.float32)
    for s in range(0, len(a), 100_000):  # bounded temporaries
        out[s : s + 100_000] = (A[a[s : s + 100_000]] == B[b[s : s + 100_000]]).mean(axis=1)
    return out


def candidate_pairs(sig: np.ndarray, min_jaccard: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(later, earlier) row pairs sharing a band bucket, unique, later > earlier; each row
    is paired with (at most) the MAX_PER_BUCKET earliest members of each of its buckets.
    `min_jaccard`: only pairs whose estimated Jaccard similarity reaches it."""
    pairs = []
    n = sig.shape[0]
    positions = np.arange(n)
    for key in _band_hashes(sig):
        order = np.lexsort((positions, key))  # by bucket, then row
        k = key[order]
        first = np.r_[True, k[1:] != k[:-1]]
        start = np.maximum.accumulate(np.where(first, positions, 0))
        rank = positions - start  # place within its bucket
        for m in range(MAX_PER_BUCKET):
            ok = np.flatnonzero(rank > m)
            if not len(ok):
                break
            pairs.append(_close_pairs(sig, sig, order[ok], order[start[ok] + m], min_jaccard))
    return _unique_pairs(pairs)


def query_pairs(
    query: np.ndarray, ref: np.ndarray, min_jaccard: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """(query row, ref row) pairs sharing a band bucket, unique; each query row meets at most
    MAX_PER_BUCKET ref rows per band. `min_jaccard`: as for candidate_pairs."""
    return BandIndex(ref).query(query, min_jaccard)


class BandIndex:
    """The band buckets of a reference set, sorted once, so that each block of queries costs
    O(block x log ref) rather than a pass over the whole reference set."""

    def __init__(self, ref: np.ndarray):
        self.ref = ref
        self.bands = []
        for key in _band_hashes(ref):
            order = np.argsort(key, kind="stable")
            self.bands.append((key[order], order))

    def query(self, query: np.ndarray, min_jaccard: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        pairs = []
        nq = query.shape[0]
        for key, (sorted_keys, order) in zip(_band_hashes(query), self.bands, strict=True):
            lo = np.searchsorted(sorted_keys, key, side="left")
            hi = np.minimum(np.searchsorted(sorted_keys, key, side="right"), lo + MAX_PER_BUCKET)
            counts = hi - lo
            if not counts.any():
                continue
            q_rows = np.repeat(np.arange(nq), counts)
            offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
            ref_rows = order[np.repeat(lo, counts) + offsets]
            pairs.append(_close_pairs(query, self.ref, q_rows, ref_rows, min_jaccard))
        return _unique_pairs(pairs)


def _close_pairs(A, B, a: np.ndarray, b: np.ndarray, min_jaccard: float) -> np.ndarray:
    """The (a[k], b[k]) pairs, as rows of an (n, 2) array, whose estimated Jaccard
    similarity reaches `min_jaccard`."""
    if min_jaccard > 0:
        close = agreement(A, B, a, b) >= min_jaccard
        a, b = a[close], b[close]
    return np.stack([a, b], 1)


def _unique_pairs(pairs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if not pairs:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    both = np.unique(np.concatenate(pairs), axis=0)
    return both[:, 0], both[:, 1]


def _band_hashes(sig: np.ndarray) -> Iterator[np.ndarray]:
    """Per band, one 64-bit hash per row of its values: equal values, equal hash, in any set
    (so a reference set's buckets can be sorted once and queried block by block). Two
    different values colliding (odds ~n^2 / 2^64) only add a candidate, scored like any other."""
    mult = np.uint64(0x9E3779B97F4A7C15)
    for band in range(BANDS):
        h = np.zeros(sig.shape[0], dtype=np.uint64)
        for col in range(band * ROWS_PER_BAND, (band + 1) * ROWS_PER_BAND):
            h = (h ^ sig[:, col].astype(np.uint64)) * mult  # wraps mod 2**64 by design
            h ^= h >> np.uint64(29)
        yield h
