"""Near-duplicate search over texts read block by block (millions of rows, bounded memory):
MinHash + LSH candidates (instructflow.minhash), each scored by its TF-IDF cosine.

The exact searches (tasks/validate.near_duplicates, tasks/split.decontaminate below their
`lsh_min_rows`) fit a vocabulary TF-IDF over all texts in memory; at a million rows the
vocabulary and the matrix alone take GBs. Here the n-grams are hashed (scikit-learn's
HashingVectorizer, as minhash does) into 2**24 buckets whose document frequencies are counted
block by block, and only candidate rows ever get a vector. A hash collision can move a cosine
a little; tests/test_minhash.py checks that the pairs found equal the exact search's on real
rows with planted near-duplicates. Texts are passed as `blocks`: a callable that returns a
fresh iterable of text lists each time, because the texts are read more than once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import chain

import numpy as np

from instructflow import minhash

Blocks = Callable[[], Iterable[list[str]]]
BUCKETS = 2**24
# Candidates whose MinHash-estimated 5-gram Jaccard similarity is below this are not scored.
# On the shared Alpaca rows, pairs at TF-IDF cosine >= 0.8 have a Jaccard of 0.6 or more
# (measured); rows that merely share an output or a template sit near 0.25 and, on large
# sets, would otherwise be most of the candidates.
MIN_JACCARD = 0.4


def in_blocks(texts: list[str], size: int = 10_000) -> Blocks:
    """`blocks` over a list held in memory."""
    return lambda: (texts[s : s + size] for s in range(0, len(texts), size))


class HashedTfidf:
    """TF-IDF on hashed char_wb n-grams (lower-cased, smooth idf, L2 rows), as scikit-learn's
    TfidfVectorizer computes it, with document frequencies added block by block."""

    def __init__(self, ngram_range: tuple[int, int], sublinear_tf: bool):
        from sklearn.feature_extraction.text import HashingVectorizer

        self.vec = HashingVectorizer(
            analyzer="char_wb",
            ngram_range=ngram_range,
            n_features=minhash.FEATURES,  # 2**30: the 5-grams double as minhash's shingles
            alternate_sign=False,
            norm=None,
            lowercase=True,
            dtype=np.float32,
        )
        self.sublinear_tf = sublinear_tf
        self.df = np.zeros(BUCKETS, dtype=np.int32)
        self.rows = 0

    def counts(self, texts: list[str]):
        """Raw n-gram counts, columns hashed into 2**30 features."""
        return self.vec.transform(texts).tocsr()

    def add(self, counts) -> None:
        folded = self._fold(counts)
        self.df += np.bincount(folded.indices, minlength=BUCKETS)
        self.rows += counts.shape[0]

    def weigh(self, counts):
        """L2-normalised TF-IDF rows of `counts` under the frequencies added so far."""
        from sklearn.preprocessing import normalize

        X = self._fold(counts).astype(np.float32)
        if self.sublinear_tf:
            X.data = 1 + np.log(X.data)
        idf = np.log((1 + self.rows) / (1 + self.df[X.indices])) + 1
        X.data *= idf.astype(np.float32)
        return normalize(X)

    @staticmethod
    def _fold(counts):
        from scipy import sparse

        X = sparse.csr_matrix(
            (counts.data, counts.indices % BUCKETS, counts.indptr), shape=(counts.shape[0], BUCKETS)
        )
        X.sum_duplicates()
        return X


def _gather(blocks: Blocks, rows: np.ndarray, vectorise: Callable) -> list:
    """vectorise(texts) of the texts at sorted positions `rows`, block by block."""
    from scipy import sparse

    parts, start = [], 0
    for texts in blocks():
        lo, hi = np.searchsorted(rows, [start, start + len(texts)])
        if hi > lo:
            parts.append(vectorise([texts[i - start] for i in rows[lo:hi]]))
        start += len(texts)
    return sparse.vstack(parts).tocsr() if parts else None


def pair_cosines(A, B, rows_a: np.ndarray, rows_b: np.ndarray, chunk: int = 20_000):
    """Cosine of A[rows_a[k]] and B[rows_b[k]] for every k (L2-normalised sparse rows)."""
    out = np.empty(len(rows_a), dtype=np.float64)
    for s in range(0, len(rows_a), chunk):
        a, b = A[rows_a[s : s + chunk]], B[rows_b[s : s + chunk]]
        out[s : s + chunk] = np.asarray(a.multiply(b).sum(axis=1)).ravel()
    return out


def first_kept(later: np.ndarray, earlier: np.ndarray, n: int) -> dict[int, int]:
    """{row: earlier row it duplicates} from matching pairs: in row order, a row goes when an
    earlier row that is still kept matches it (as the exact search decides)."""
    order = np.lexsort((earlier, later))
    kept = np.ones(n, dtype=bool)
    match: dict[int, int] = {}
    for j, i in zip(later[order].tolist(), earlier[order].tolist(), strict=True):
        if kept[j] and kept[i]:
            kept[j] = False
            match[j] = i
    return match


def near_duplicates(blocks: Blocks, n: int, threshold: float) -> dict[int, int]:
    """{later row: earlier kept row} for char 5-gram TF-IDF (sublinear tf) cosine >=
    threshold among the `n` texts of `blocks`; candidates from MinHash + LSH."""
    tfidf = HashedTfidf((5, 5), sublinear_tf=True)
    sig = np.empty((n, minhash.BANDS * minhash.ROWS_PER_BAND), dtype=np.uint32)
    start = 0
    for texts in blocks():
        counts = tfidf.counts(texts)
        sig[start : start + len(texts)] = minhash.signatures_of(counts, first_row=start)
        tfidf.add(counts)
        start += len(texts)
    later, earlier = minhash.candidate_pairs(sig, MIN_JACCARD)
    del sig
    if not len(later):
        return {}
    need = np.unique(np.concatenate([later, earlier]))
    V = _gather(blocks, need, lambda t: tfidf.weigh(tfidf.counts(t)))
    sim = pair_cosines(V, V, np.searchsorted(need, later), np.searchsorted(need, earlier))
    sel = sim >= threshold
    return first_kept(later[sel], earlier[sel], n)


def contaminated(train: Blocks, n_train: int, held_out: list[str], threshold: float) -> np.ndarray:
    """Mask of the `n_train` texts of `train` whose char 3-5-gram TF-IDF cosine with some
    held-out text is >= threshold; candidates from MinHash + LSH against the held-out set
    (held in memory: it is the small side)."""
    tfidf = HashedTfidf((3, 5), sublinear_tf=False)
    held = in_blocks(held_out)
    for texts in chain(held(), train()):
        tfidf.add(tfidf.counts(texts))
    ref = minhash.BandIndex(minhash.signatures(held_out))
    best = np.zeros(n_train)
    start = 0
    for texts in train():
        t, h = ref.query(minhash.signatures(texts), MIN_JACCARD)
        if len(t):
            rows_t, rows_h = np.unique(t), np.unique(h)
            T = tfidf.weigh(tfidf.counts([texts[i] for i in rows_t]))
            H = tfidf.weigh(tfidf.counts([held_out[i] for i in rows_h]))
            sim = pair_cosines(T, H, np.searchsorted(rows_t, t), np.searchsorted(rows_h, h))
            np.maximum.at(best, start + t, sim)
        start += len(texts)
    return best >= threshold


def near_duplicate_method(n_rows: int, lsh_min_rows: int | None) -> str:
    """What `near_duplicates` uses for `n_rows` rows (recorded in the reports)."""
    return "minhash_lsh" if lsh_min_rows is not None and n_rows >= lsh_min_rows else "exact"
