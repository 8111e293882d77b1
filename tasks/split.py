"""split: seeded, group-aware train/validation/test split with decontamination.

Whole groups (a row, its duplicates and its augmentations share `group`) go to one split,
so nothing leaks between train and the held-out sets. Augmented rows that land in
validation/test are dropped there: held-out sets measure the original data only. Then every
training row whose prompt is a near-duplicate (TF-IDF char n-gram cosine >= threshold) of a
validation/test prompt is dropped and counted. The stage streams its input twice (groups,
then rows), so memory holds the group assignment and the held-out prompts, not the rows.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from instructflow import neardup
from instructflow.artifacts import ArtifactRef, write_artifact
from instructflow.caching import stage_task
from instructflow.config import SplitConfig
from instructflow.neardup import near_duplicate_method
from instructflow.rows import SPLITS, column, iter_batches, iter_value_blocks, read_jsonl


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
    codes, stratified = split_codes(len(groups), strata, cfg)
    return {g: SPLITS[c] for g, c in zip(groups, codes, strict=True)}, stratified


def split_codes(
    n_groups: int, strata: list[str] | None, cfg: SplitConfig
) -> tuple[np.ndarray, bool]:
    """Per group (in order of first appearance), its split's index in SPLITS."""
    from sklearn.model_selection import train_test_split

    n_val, n_test = _sizes(n_groups, cfg)
    order = np.arange(n_groups)
    if cfg.method == "ordered":
        codes = np.zeros(n_groups, dtype=np.int8)  # train first, then test, then validation
        n_train = n_groups - n_val - n_test
        codes[n_train : n_train + n_test] = SPLITS.index("test")
        codes[n_train + n_test :] = SPLITS.index("validation")
        return codes, False

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
    _, val, strat_val = cut(rest, n_val, cfg.seed + 1)
    codes = np.zeros(n_groups, dtype=np.int8)  # train
    codes[val] = SPLITS.index("validation")
    codes[test] = SPLITS.index("test")
    return codes, strat_test and strat_val


def decontaminate(
    train: list[dict[str, Any]],
    held_out: list[dict[str, Any]],
    threshold: float,
    lsh_min_rows: int | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(kept, dropped) training rows; dropped ones are near-duplicates of a held-out prompt."""
    if not train or not held_out:
        return train, []
    blocks = neardup.in_blocks([prompt_text(r) for r in train])
    held = [prompt_text(r) for r in held_out]
    drop = contaminated(blocks, len(train), held, threshold, lsh_min_rows)
    kept = [r for r, d in zip(train, drop, strict=True) if not d]
    return kept, [r for r, d in zip(train, drop, strict=True) if d]


def contaminated(
    train: neardup.Blocks,
    n_train: int,
    held_out: list[str],
    threshold: float,
    lsh_min_rows: int | None = None,
) -> np.ndarray:
    """Mask of the training prompts (read block by block) that are near-duplicates (TF-IDF
    char 3-5-gram cosine >= threshold) of a held-out prompt. Exact (every train row against
    every held-out row, texts in memory) below `lsh_min_rows` rows in all; from there on only
    MinHash + LSH candidates are scored (instructflow.neardup), in bounded memory."""
    if near_duplicate_method(n_train + len(held_out), lsh_min_rows) == "minhash_lsh":
        return neardup.contaminated(train, n_train, held_out, threshold)
    from sklearn.feature_extraction.text import TfidfVectorizer

    prompts = [t for block in train() for t in block]
    vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), lowercase=True)
    vec.fit(held_out + prompts)
    cand = vec.transform(prompts).tocsr()
    ref = vec.transform(held_out).T.tocsc()
    best = np.zeros(n_train)
    # Chunks keep the sparse similarity products small on 10^4 x 10^3 inputs.
    for start in range(0, n_train, 2000):
        sims = (cand[start : start + 2000] @ ref).max(axis=1)
        best[start : start + 2000] = sims.toarray().ravel()
    return best >= threshold


class _Parts:
    """Where split puts rows: lists in memory (split_rows) or files (the stage). Training
    rows are final only at `finish`, once decontamination has decided."""

    def __init__(self):
        self.lists: dict[str, list] = {name: [] for name in SPLITS}

    def add(self, name: str, row: dict[str, Any]) -> None:
        self.lists[name].append(row)

    def train_prompts(self) -> neardup.Blocks:
        return neardup.in_blocks([prompt_text(r) for r in self.lists["train"]])

    def finish(self, drop: np.ndarray | None) -> list[dict[str, Any]]:
        """Keep the training rows not in `drop`; the rows dropped."""
        if drop is None:
            return []
        train = self.lists["train"]
        self.lists["train"] = [r for r, d in zip(train, drop, strict=True) if not d]
        return [r for r, d in zip(train, drop, strict=True) if d]


class _FileParts(_Parts):
    def __init__(self, out: Path):
        self.out = out
        self.scratch = out / ".scratch"
        self.scratch.mkdir()
        names = {"train": self.scratch / "train.jsonl", "validation": out / "validation.jsonl"}
        names["test"] = out / "test.jsonl"
        self.files = {k: open(p, "w", encoding="utf-8") for k, p in names.items()}  # noqa: SIM115
        self.prompts = open(self.scratch / "prompts.jsonl", "w", encoding="utf-8")  # noqa: SIM115

    def add(self, name: str, row: dict[str, Any]) -> None:
        self.files[name].write(json.dumps(row, ensure_ascii=False) + "\n")
        if name == "train":
            self.prompts.write(json.dumps(prompt_text(row)) + "\n")

    def train_prompts(self) -> neardup.Blocks:
        for fh in (*self.files.values(), self.prompts):
            fh.flush()
        return lambda: iter_value_blocks(self.scratch / "prompts.jsonl")

    def finish(self, drop: np.ndarray | None) -> list[dict[str, Any]]:
        for fh in (*self.files.values(), self.prompts):
            fh.close()
        dropped = []
        with (
            open(self.scratch / "train.jsonl", encoding="utf-8") as rows,
            open(self.out / "train.jsonl", "w", encoding="utf-8") as out,
        ):
            for k, line in enumerate(rows):
                if drop is not None and drop[k]:
                    dropped.append(json.loads(line))
                else:
                    out.write(line)
        shutil.rmtree(self.scratch)
        return dropped


def _group_of(row: dict[str, Any]) -> str:
    return row.get("group") or row["id"]


def split_rows(rows: list[dict[str, Any]], cfg: SplitConfig) -> tuple[dict[str, list], dict]:
    """Rows per split and a report of the counts (in memory; the stage streams files)."""
    parts = _Parts()
    report = split_stream(lambda: [rows], cfg, parts)
    return parts.lists, report


def split_stream(batches: Callable[[], Iterable[list]], cfg: SplitConfig, parts: _Parts) -> dict:
    """Split the rows of `batches` (read twice: groups first, then rows) into `parts`; the
    report. In memory beyond one batch: the groups' assignment and the held-out prompts."""
    index: dict[str, int] = {}  # group -> order of first appearance
    first_stratum: list[str] = []
    n_rows = 0
    for batch in batches():
        for r in batch:
            n_rows += 1
            if index.setdefault(_group_of(r), len(index)) == len(first_stratum):
                first_stratum.append(column(r, cfg.stratify_by) if cfg.stratify_by else "")
    if n_rows < 3:
        raise SplitError(f"only {n_rows} rows: too few to split")
    strata = first_stratum if cfg.stratify_by else None
    where, stratified = split_codes(len(index), strata, cfg)
    del first_stratum
    counts = {name: 0 for name in SPLITS}
    sources: dict[str, Counter] = {name: Counter() for name in SPLITS}
    strata_counts: dict[str, Counter] = {name: Counter() for name in SPLITS}
    held_prompts: list[str] = []
    augmented_dropped = 0
    any_source = False
    for batch in batches():
        for r in batch:
            name = SPLITS[where[index[_group_of(r)]]]
            # Augmented rows and a mix's repeats are copies of a row: never evaluated on.
            if name != "train" and (r.get("augmented_from") or r.get("repeat_of")):
                augmented_dropped += 1
                continue
            parts.add(name, r)
            counts[name] += 1
            any_source = any_source or bool(r.get("source"))
            sources[name][r.get("source", "")] += 1
            if cfg.stratify_by:
                strata_counts[name][column(r, cfg.stratify_by)] += 1
            if name != "train" and cfg.decontaminate:
                held_prompts.append(prompt_text(r))
    n_groups = len(index)
    del index, where
    drop, method = None, None
    if cfg.decontaminate:
        method = near_duplicate_method(counts["train"] + len(held_prompts), cfg.lsh_min_rows)
        if counts["train"] and held_prompts:
            threshold = cfg.decontamination_threshold
            blocks = parts.train_prompts()
            drop = contaminated(blocks, counts["train"], held_prompts, threshold, cfg.lsh_min_rows)
    dropped = parts.finish(drop)
    counts["train"] -= len(dropped)
    for r in dropped:  # the counts are of what the files hold
        sources["train"][r.get("source", "")] -= 1
        if cfg.stratify_by:
            strata_counts["train"][column(r, cfg.stratify_by)] -= 1
    if not counts["train"]:
        raise SplitError("no training rows left after decontamination")
    report = {
        "rows_in": n_rows,
        "groups": n_groups,
        "rows": counts,
        "stratify_by": cfg.stratify_by,
        "stratified": bool(strata is not None and stratified),
        "augmented_dropped_from_eval": augmented_dropped,
        "decontaminated": len(dropped),
        "decontamination_method": method,
        "decontaminated_ids": [r["id"] for r in dropped[:1000]],
    }
    if any_source:  # several data.sources: the counts per source
        report["sources"] = {name: dict(+sources[name]) for name in SPLITS}
    if cfg.stratify_by:
        report["strata"] = {name: dict(+strata_counts[name]) for name in SPLITS}
    return report


def split(augmented: ArtifactRef, cfg: SplitConfig) -> ArtifactRef:
    path = augmented.file("rows.jsonl")

    def write(tmp: Path) -> dict[str, Any]:
        try:
            report = split_stream(lambda: iter_batches(path, 10_000), cfg, _FileParts(tmp))
        except SplitError as exc:
            raise SplitError(f"{path}: {exc}") from None
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
