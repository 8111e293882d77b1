"""Judge calibration: before its verdicts count, the judge grades answers of known quality.

The sanity set comes from the test split's own references. Each sampled reference is paired
with wrong answers that are certainly worse, built so that length tells nothing: as many
shorter than the reference (`empty`; `truncated`: its words, or letters for one word,
reversed and cut to two thirds) as longer (`other_references`: other rows' references joined
until longer; `reversed_twice`: its letters reversed, written twice) and as many of equal
length (`reversed`: its letters reversed; `other_cut`: other rows' references cut to its
length). A wrong answer that contains the reference is dropped. So preferring the longer (or
the shorter) answer is right on exactly half of the pairs whose lengths differ, and preferring
the length closest to the reference's says nothing on the equal-length third (which only a
palindrome without other references lacks): length alone stays below 0.8, whatever the data.

The two modes are scored apart, each the way its verdicts are used:
- single: both answers graded alone; right when the reference scores strictly higher.
- pairwise: both orders; a pair is right only when the reference wins in BOTH (judging counts
  a win only then), so a judge that always answers "A" or always "tie" scores 0.
  `position_consistency` is the share of pairs whose two verdicts name the same answer.
A failed verdict is wrong. The judge is trusted when every mode it runs reaches
`judge.min_calibration` and, for pairwise, `position_consistency` reaches
`judge.min_position_consistency`; otherwise its figures are logged but flagged and not used.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

SHORTER = ("empty", "truncated")
LONGER = ("other_references", "reversed_twice")
EQUAL = ("reversed", "other_cut")
SIDES = (SHORTER, LONGER, EQUAL)


@dataclass
class Calibration:
    single: float | None  # accuracy of the single-answer checks (None: mode not run)
    pairwise: float | None  # share of pairs right in both orders
    position_consistency: float | None
    pairs: int  # (reference, wrong answer) pairs in the sanity set
    failed: int
    reference_longer: float | None  # among unequal-length pairs: 0.5 by construction
    table: list[dict[str, Any]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        """The lowest accuracy of the modes run: trust rests on the weakest one."""
        scores = [s for s in (self.single, self.pairwise) if s is not None]
        return min(scores) if scores else 0.0

    def problems(self, min_accuracy: float, min_consistency: float) -> list[str]:
        """Why the judge is not trusted; empty when it is."""
        if not self.pairs:
            return ["no sanity pairs (the test split has no non-empty reference)"]
        out = []
        for mode, score in (("single", self.single), ("pairwise", self.pairwise)):
            if score is not None and score < min_accuracy:
                out.append(f"{mode} {score:.2f} < judge.min_calibration {min_accuracy:.2f}")
        pc = self.position_consistency
        if pc is not None and pc < min_consistency:
            out.append(
                f"position consistency {pc:.2f} < judge.min_position_consistency "
                f"{min_consistency:.2f}"
            )
        return out


def corrupt(text: str) -> str:
    """A clearly wrong version of `text`: words (or, for one word, letters) reversed, then
    cut to two thirds. Never equal to `text` unless it is empty."""
    words = text.split()
    flipped = " ".join(reversed(words)) if len(words) > 1 else text[::-1]
    cut = flipped[: max(1, (2 * len(flipped)) // 3)]
    return cut if cut != text else cut + " (wrong)"


def _wrong_answers(ref: str, others: list[str], start: int) -> dict[str, str]:
    """kind -> wrong answer for reference `ref` (kinds that cannot be built are missing)."""
    flipped = ref[::-1]
    out = {"empty": "", "truncated": corrupt(ref), "reversed": flipped}
    out["reversed_twice"] = f"{flipped} {flipped}"
    if others:
        parts, i = [], start
        while len(" ".join(parts)) <= len(ref):
            parts.append(others[i % len(others)])
            i += 1
        out["other_references"] = " ".join(parts)
        out["other_cut"] = out["other_references"][: len(ref)]
    low = ref.casefold()
    # Stripped, as the judge's prompt shows them (instructflow.judge_prompts).
    kept = {k: w.strip() for k, w in out.items() if low not in w.casefold()}
    # Each kind must really be on its side of the reference's length.
    for kind in SHORTER:
        if kind in kept and len(kept[kind]) >= len(ref):
            del kept[kind]
    for kind in LONGER:
        if kind in kept and len(kept[kind]) <= len(ref):
            del kept[kind]
    for kind in EQUAL:
        if kind in kept and len(kept[kind]) != len(ref):
            del kept[kind]
    return kept


def sanity_set(items: Sequence[Any], n: int, seed: int) -> list[tuple[Any, str, str]]:
    """(item, wrong answer, kind) triples for up to `n` items with a non-empty reference;
    per item as many wrong answers shorter than the reference as longer and as long (see the
    module doc)."""
    usable = [it for it in items if it.reference.strip()]
    rng = random.Random(seed)
    picked = rng.sample(usable, min(n, len(usable)))
    refs = list(dict.fromkeys(it.reference.strip() for it in usable))
    out: list[tuple[Any, str, str]] = []
    for i, it in enumerate(picked):
        ref = it.reference.strip()
        low = ref.casefold()
        # Another reference that holds this one (or is held in it) may be partly right.
        others = [o for o in refs if low not in o.casefold() and o.casefold() not in low]
        wrong = _wrong_answers(ref, others, i * 7 + 3)
        shorter, longer, equal = ([kind for kind in side if kind in wrong] for side in SIDES)
        # As many of each side (equal-length ones when any can be built: rarely none).
        k = min(len(shorter), len(longer), len(equal) or len(shorter))
        kinds = [
            *rng.sample(shorter, k),
            *rng.sample(longer, k),
            *rng.sample(equal, k if equal else 0),
        ]
        out += [(it, wrong[kind], kind) for kind in kinds]
    return out


def calibrate(backend, items: Sequence[Any], mode: str, n: int, seed: int) -> Calibration:
    """Run the judge `backend` on the sanity set built from `items` (see the module doc)."""
    triples = sanity_set(items, n, seed)
    if not triples:
        return Calibration(None, None, None, 0, 0, None)
    its = [t[0] for t in triples]
    good = [it.reference.strip() for it in its]
    bad = [t[1] for t in triples]
    table = [
        {"instruction": it.instruction, "kind": kind, "wrong": w, "reference_longer": None}
        for it, w, kind in triples
    ]
    for row, g, b in zip(table, good, bad, strict=True):
        if len(g) != len(b):
            row["reference_longer"] = len(g) > len(b)
    unequal = [r["reference_longer"] for r in table if r["reference_longer"] is not None]
    failed = 0
    single = pairwise = consistency = None
    if mode in ("single", "both"):
        # Each reference is graded once, however many wrong answers it is compared with.
        firsts = list({id(it): it for it in its}.values())
        verdicts = backend.single(firsts, [it.reference.strip() for it in firsts])
        graded = {id(it): v for it, v in zip(firsts, verdicts, strict=True)}
        failed += sum(v.failed for v in graded.values())
        right = 0
        for row, it, b in zip(table, its, backend.single(its, bad), strict=True):
            g = graded[id(it)]
            ok = not (g.failed or b.failed) and g.value > b.value
            failed += b.failed
            row.update(score_reference=g.value, score_wrong=b.value, single_right=ok)
            right += ok
        single = right / len(table)
    if mode in ("pairwise", "both"):
        ref_first = backend.pairwise(its, good, bad)
        ref_second = backend.pairwise(its, bad, good)
        right = follows = 0
        for row, x, y in zip(table, ref_first, ref_second, strict=True):
            failed += x.failed + y.failed
            ok = x.value == "A" and y.value == "B"
            follows += ok or (x.value == "B" and y.value == "A")
            row.update(pair_ref_first=x.value, pair_ref_second=y.value, pair_right=ok)
            right += ok
        pairwise, consistency = right / len(table), follows / len(table)
    balance = sum(unequal) / len(unequal) if unequal else None
    return Calibration(single, pairwise, consistency, len(table), failed, balance, table)
