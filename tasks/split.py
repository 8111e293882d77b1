"""split: seeded, group-aware train/validation/test split with decontamination.

Whole groups (a row, its duplicates and its augmentations share `group`) go to one split,
so nothing leaks between train and the held-out sets. Augmented rows that land in
validation/test are dropped there: held-out sets measure the original data only. Then every
training row whose prompt is a near-duplicate (TF-IDF char n-gram cosine >= threshold) of a
validation/test prompt is dropped and counted.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from instructflow.artifacts import ArtifactRef, write_artifact
from instructflow.caching import stage_task
from instructflow.config import SplitConfig
from instructflow.rows import column, read_jsonl, write_jsonl
from tasks.validate import near_duplicate_method, pair_cosines

SPLITS = ("train", "validation", "test")


class SplitError(ValueError):
    pass


def read_split(ref: ArtifactRef, name: str) -> list[dict[str, Any]]:
    """The canonical rows of one split of a split artifact."""
    return read_jsonl(ref.file(f"{name}.jsonl"))


def prompt_text(row: dict[str, Any]) -> str:
    """Everything the model is shown (not the final answer): what decontamination compares."""
    msgs = row.get("messages") or []
    if msgs:
        return "\n".join(m["content"] for m in msgs[:-1])
    return f"{row.get('instruction', '')}\n{row.get('input', '')}"


def _sizes(n_groups: int, cfg: SplitConfig) -> tuple[int, int]:
    """(validation, test) group counts; each held-out split with a fraction > 0 gets >= 1."""
    n_val = max(1, math.floor(cfg.validation * n_groups + 0.5)) if cfg.validation > 0 else 0
    n_test = max(1, math.floor(cfg.test * n_groups + 0.5)) if cfg.test > 0 else 0
    if n_groups - n_val - n_test < 1:
        raise SplitError(f"only {n_groups} groups: too few to split into train/validation/test")
    return n_val, n_test


def assign_groups(
    groups: list[str], strata: list[str] | None, cfg: SplitConfig
) -> tuple[dict[str, str], bool]:
    """group -> split name, with scikit-learn's (optionally stratified) shuffle split."""
    from sklearn.model_selection import train_test_split

    n_val, n_test = _sizes(len(groups), cfg)
    order = np.arange(len(groups))

    def cut(idx: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray, bool]:
        if size == 0:
            return idx, idx[:0], strata is not None
        if strata is not None:
            try:
                labels = [strata[i] for i in idx]
                a, b = train_test_split(idx, test_size=size, random_state=seed, stratify=labels)
                return a, b, True
            except ValueError:
                pass  # too few groups in some stratum for this size: plain shuffle instead
        a, b = train_test_split(idx, test_size=size, random_state=seed)
        return a, b, False

    rest, test, strat_test = cut(order, n_test, cfg.seed)
    train, val, strat_val = cut(rest, n_val, cfg.seed + 1)
    stratified = strat_test and strat_val
    out = {groups[i]: "train" for i in train}
    out.update({groups[i]: "validation" for i in val})
    out.update({groups[i]: "test" for i in test})
    return out, stratified


def decontaminate(
    train: list[dict[str, Any]],
    held_out: list[dict[str, Any]],
    threshold: float,
    lsh_min_rows: int | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(kept, dropped) training rows; dropped ones are near-duplicates of a held-out prompt.
    Exact (every train row against every held-out row) below `lsh_min_rows` rows in all;
    from there on only MinHash + LSH candidates are scored (tasks/validate.near_duplicates)."""
    if not train or not held_out:
        return train, []
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), lowercase=True)
    vec.fit([prompt_text(r) for r in held_out + train])
    cand = vec.transform([prompt_text(r) for r in train]).tocsr()
    best = np.zeros(len(train))
    if near_duplicate_method(len(train) + len(held_out), lsh_min_rows) == "minhash_lsh":
        from instructflow import minhash

        ref_rows = vec.transform([prompt_text(r) for r in held_out]).tocsr()
        sig = minhash.signatures([prompt_text(r) for r in train + held_out])
        t, h = minhash.query_pairs(sig[: len(train)], sig[len(train) :])
        np.maximum.at(best, t, pair_cosines(cand, ref_rows, t, h))
        return _apart(train, best >= threshold)
    ref = vec.transform([prompt_text(r) for r in held_out]).T.tocsc()
    # Chunks keep the sparse similarity products small on 10^4 x 10^3 inputs.
    for start in range(0, len(train), 2000):
        sims = (cand[start : start + 2000] @ ref).max(axis=1)
        best[start : start + 2000] = sims.toarray().ravel()
    return _apart(train, best >= threshold)


def _apart(rows: list[dict[str, Any]], drop: np.ndarray) -> tuple[list, list]:
    kept = [r for r, d in zip(rows, drop, strict=True) if not d]
    dropped = [r for r, d in zip(rows, drop, strict=True) if d]
    return kept, dropped


def split_rows(rows: list[dict[str, Any]], cfg: SplitConfig) -> tuple[dict[str, list], dict]:
    """Rows per split and a report of the counts."""
    if len(rows) < 3:
        raise SplitError(f"only {len(rows)} rows: too few to split")
    groups = list(dict.fromkeys(r.get("group") or r["id"] for r in rows))
    strata = None
    if cfg.stratify_by:
        first: dict[str, str] = {}
        for r in rows:
            first.setdefault(r.get("group") or r["id"], column(r, cfg.stratify_by))
        strata = [first[g] for g in groups]
    where, stratified = assign_groups(groups, strata, cfg)
    out: dict[str, list] = {name: [] for name in SPLITS}
    augmented_dropped = 0
    for r in rows:
        name = where[r.get("group") or r["id"]]
        # Augmented rows and a mix's repeats are copies of a row: never evaluated on.
        if name != "train" and (r.get("augmented_from") or r.get("repeat_of")):
            augmented_dropped += 1
            continue
        out[name].append(r)
    dropped: list[dict[str, Any]] = []
    if cfg.decontaminate:
        held = out["validation"] + out["test"]
        out["train"], dropped = decontaminate(
            out["train"], held, cfg.decontamination_threshold, cfg.lsh_min_rows
        )
    if not out["train"]:
        raise SplitError("no training rows left after decontamination")
    report = {
        "rows_in": len(rows),
        "groups": len(groups),
        "rows": {name: len(out[name]) for name in SPLITS},
        "stratify_by": cfg.stratify_by,
        "stratified": bool(strata is not None and stratified),
        "augmented_dropped_from_eval": augmented_dropped,
        "decontaminated": len(dropped),
        "decontamination_method": near_duplicate_method(len(rows), cfg.lsh_min_rows)
        if cfg.decontaminate
        else None,
        "decontaminated_ids": [r["id"] for r in dropped][:1000],
    }
    if any(r.get("source") for r in rows):  # several data.sources: the counts per source
        report["sources"] = {
            name: dict(Counter(r.get("source", "") for r in out[name])) for name in SPLITS
        }
    if cfg.stratify_by:
        report["strata"] = {
            name: dict(Counter(column(r, cfg.stratify_by) for r in out[name])) for name in SPLITS
        }
    return out, report


def split(augmented: ArtifactRef, cfg: SplitConfig) -> ArtifactRef:
    rows = read_jsonl(augmented.file("rows.jsonl"))
    try:
        parts, report = split_rows(rows, cfg)
    except SplitError as exc:
        raise SplitError(f"{augmented.file('rows.jsonl')}: {exc}") from None

    def write(tmp: Path) -> dict[str, Any]:
        for name in SPLITS:
            write_jsonl(tmp / f"{name}.jsonl", parts[name])
        (tmp / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
        n = report["rows"]
        return {
            "figures": {
                **{f"rows_{k}": v for k, v in n.items()},
                "groups": report["groups"],
                "decontaminated": report["decontaminated"],
                "augmented_dropped_from_eval": report["augmented_dropped_from_eval"],
                **{
                    f"{source}.rows_{name}": count
                    for name, counts in report.get("sources", {}).items()
                    for source, count in counts.items()
                },
            },
            "log_files": ["report.json"],
            "datasets": [
                {"file": f"{name}.jsonl", "name": name, "context": name}
                for name in SPLITS
                if n[name] > 0
            ],
            "summary": (
                f"train {n['train']} / validation {n['validation']} / test {n['test']}, "
                f"{report['decontaminated']} decontaminated"
            ),
        }

    return write_artifact("split", write)


split_task = stage_task("split")(split)
