"""Judge calibration: before its verdicts count, the judge grades answers of known quality.

The sanity set comes from the test split's own references. For each sampled item, the
reference is paired with three answers that are certainly worse: an empty answer, another
row's (different) reference, and the reference corrupted (its words reversed, or its letters
when it is one word, then cut to two thirds). The judge then
- grades both answers alone (single mode): right when the reference scores higher;
- compares them in both orders (pairwise mode): right in an order when it picks the reference.
`accuracy` is the share of those checks it gets right (a failed verdict is wrong), and
`position_consistency` the share of pairs whose two verdicts follow the content (the same
answer wins in both orders, right or wrong). A judge whose accuracy is below
`judge.min_calibration` is untrusted: its figures are still logged, but flagged and not used.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

KINDS = ("empty", "other_reference", "corrupted")


@dataclass
class Calibration:
    accuracy: float
    position_consistency: float | None
    checks: int
    failed: int
    table: list[dict[str, Any]] = field(default_factory=list)

    def trusted(self, minimum: float) -> bool:
        return self.checks > 0 and self.accuracy >= minimum


def corrupt(text: str) -> str:
    """A clearly wrong version of `text`: words (or, for one word, letters) reversed, then
    cut to two thirds. Never equal to `text` unless it is empty."""
    words = text.split()
    flipped = " ".join(reversed(words)) if len(words) > 1 else text[::-1]
    cut = flipped[: max(1, (2 * len(flipped)) // 3)]
    return cut if cut != text else cut + " (wrong)"


def sanity_set(items: Sequence[Any], n: int, seed: int) -> list[tuple[Any, str, str]]:
    """(item, wrong answer, kind) triples for up to `n` items with a non-empty reference."""
    usable = [it for it in items if it.reference.strip()]
    rng = random.Random(seed)
    picked = rng.sample(usable, min(n, len(usable)))
    out: list[tuple[Any, str, str]] = []
    for i, it in enumerate(picked):
        out.append((it, "", "empty"))
        others = [o.reference for o in usable if o.reference.strip() != it.reference.strip()]
        if others:
            out.append((it, others[(i * 7 + 3) % len(others)], "other_reference"))
        out.append((it, corrupt(it.reference), "corrupted"))
    return out


def calibrate(backend, items: Sequence[Any], mode: str, n: int, seed: int) -> Calibration:
    """Run the judge `backend` on the sanity set built from `items` (see the module doc)."""
    triples = sanity_set(items, n, seed)
    if not triples:
        return Calibration(0.0, None, 0, 0)
    its = [t[0] for t in triples]
    good = [it.reference for it in its]
    bad = [t[1] for t in triples]
    table = [{"instruction": it.instruction, "kind": kind, "wrong": w} for it, w, kind in triples]
    right: list[bool] = []
    failed = 0
    if mode in ("single", "both"):
        for row, g, b in zip(
            table, backend.single(its, good), backend.single(its, bad), strict=True
        ):
            ok = not (g.failed or b.failed) and g.value > b.value
            failed += g.failed + b.failed
            row.update(score_reference=g.value, score_wrong=b.value, single_right=ok)
            right.append(ok)
    consistency = None
    if mode in ("pairwise", "both"):
        ref_first = backend.pairwise(its, good, bad)
        ref_second = backend.pairwise(its, bad, good)
        follows = 0
        for row, x, y in zip(table, ref_first, ref_second, strict=True):
            failed += x.failed + y.failed
            ok_first, ok_second = x.value == "A", y.value == "B"
            follows += (ok_first and ok_second) or (x.value == "B" and y.value == "A")
            row.update(pair_ref_first=x.value, pair_ref_second=y.value)
            right += [ok_first, ok_second]
        consistency = follows / len(table)
    return Calibration(sum(right) / len(right), consistency, len(right), failed, table)
