"""mix: several validated sources (`data.sources`) into one dataset, by weight, seeded.

How many rows each source gives (documented in docs/data.md, tested in tests/test_mix.py):
- A source's available rows are its validated rows, capped by its `max_rows` (a seeded sample).
- Shares: the weights normalised (no weights: in proportion to the available rows, i.e.
  everything). Total: `data.mix.total_rows`, else the largest total the shares allow without
  repeating a row (the scarcest source relative to its weight is used whole). Each source's
  count is its share of the total, rounded by largest remainder so the counts add up.
- Within a source the rows are a sample *without* replacement, drawn by a generator seeded by
  (mix seed, source name): changing one source's weight never re-draws another's rows.
- A count above the available rows (only with total_rows): an error naming the source, unless
  `data.mix.replacement` is on; then every available row is taken once and the rest are
  repeats drawn with replacement (`repeat_of` = the row's id, same group, kept in train only).

Every row gets `source` (the source's name) and an id prefixed by it (ids stay unique across
sources). Rows with the same prompt in two sources already share their `group`, so split
keeps them on one side; how many such groups exist is reported.

Written by hand: `datasets.interleave_datasets` samples by probability until a source runs
out (no exact counts, no per-source cap report) and would turn our JSONL rows into Arrow only
to turn them back.
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

from instructflow.artifacts import ArtifactRef, write_artifact
from instructflow.caching import stage_task
from instructflow.config import MixConfig
from instructflow.rows import read_jsonl, write_jsonl


class MixError(ValueError):
    pass


def plan_counts(
    available: dict[str, int], weights: dict[str, float | None], total: int | None
) -> dict[str, int]:
    """Rows per source (see the module doc): shares from the weights (or the availability),
    the total from `total` or the scarcest source, largest-remainder rounding."""
    names = list(available)
    raw = {n: (weights[n] if weights[n] is not None else available[n]) for n in names}
    norm = sum(raw.values())
    if norm <= 0:
        raise MixError("data.sources: every source is empty")
    share = {n: raw[n] / norm for n in names}
    if total is None:
        # 1e-9: 300 / (300 / 1000) must give 1000, not 999.9999.
        total = min(math.floor(available[n] / share[n] + 1e-9) for n in names if share[n] > 0)
    exact = {n: share[n] * total for n in names}
    counts = {n: math.floor(exact[n]) for n in names}
    by_remainder = sorted(names, key=lambda n: (-(exact[n] - counts[n]), names.index(n)))
    for n in by_remainder[: total - sum(counts.values())]:
        counts[n] += 1
    return counts


def draw(
    rows: list[dict[str, Any]], count: int, rng: random.Random, replacement: bool, name: str
) -> list[dict[str, Any]]:
    """`count` of `rows`: a sample without replacement in the rows' order, plus repeats."""
    if count <= len(rows):
        return [rows[i] for i in sorted(rng.sample(range(len(rows)), count))]
    if not replacement:
        raise MixError(
            f"data.sources[{name}]: the mix asks for {count} rows, it has {len(rows)} "
            "(lower data.mix.total_rows or this weight, or set data.mix.replacement: true)"
        )
    repeats = [rng.choice(rows) for _ in range(count - len(rows))]
    seen: dict[str, int] = defaultdict(int)
    out = list(rows)
    for row in repeats:
        seen[row["id"]] += 1
        out.append({**row, "id": f"{row['id']}#{seen[row['id']]}", "repeat_of": row["id"]})
    return out


def mix(validated: dict[str, ArtifactRef], plan: list[dict[str, Any]], cfg: MixConfig):
    """`validated`: source name -> its validate artifact; `plan`: [{name, weight, max_rows}]
    in the config's order (only what changes the mix: a source's download knobs are not in
    this stage's key)."""
    rows: dict[str, list[dict[str, Any]]] = {}
    pool: dict[str, int] = {}
    for item in plan:
        name = item["name"]
        own = [
            {**r, "id": f"{name}:{r['id']}", "source": name}
            for r in read_jsonl(validated[name].file("clean.jsonl"))
        ]
        pool[name] = len(own)
        cap = item.get("max_rows")
        if cap is not None and cap < len(own):
            own = draw(own, cap, random.Random(f"{cfg.seed}:{name}:cap"), False, name)
        rows[name] = own
    weights = {i["name"]: i.get("weight") for i in plan}
    caps = {i["name"]: i.get("max_rows") for i in plan}
    counts = plan_counts({n: len(r) for n, r in rows.items()}, weights, cfg.total_rows)
    mixed: list[dict[str, Any]] = []
    report_sources: dict[str, dict[str, Any]] = {}
    total = sum(counts.values())
    for name, own in rows.items():
        taken = draw(own, counts[name], random.Random(f"{cfg.seed}:{name}"), cfg.replacement, name)
        mixed.extend(taken)
        report_sources[name] = {
            "validated_rows": pool[name],
            "available_rows": len(own),
            "max_rows": caps[name],
            "weight": weights[name],
            "rows": len(taken),
            "repeated": sum(1 for r in taken if r.get("repeat_of")),
            "share": len(taken) / total if total else 0.0,
        }
    shared = _shared_groups(mixed)
    report = {
        "rows": len(mixed),
        "total_rows": cfg.total_rows,
        "replacement": cfg.replacement,
        "seed": cfg.seed,
        "sources": report_sources,
        "groups_in_several_sources": shared,
    }

    def write(tmp: Path) -> dict[str, Any]:
        write_jsonl(tmp / "clean.jsonl", mixed)
        (tmp / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
        figures: dict[str, float] = {"rows": len(mixed), "groups_in_several_sources": shared}
        # Per source, MLflow metrics mix/<source>/{rows,share,...}: compared across runs.
        metrics = {
            f"{name}.{key}": entry[key]
            for name, entry in report_sources.items()
            for key in ("rows", "share", "available_rows", "repeated")
        }
        parts = ", ".join(f"{n} {e['rows']} ({e['share']:.0%})" for n, e in report_sources.items())
        return {
            "figures": figures,
            "metrics": metrics,
            "log_files": ["report.json"],
            "summary": f"{len(mixed)} rows: {parts}",
        }

    return write_artifact("mix", write)


def _shared_groups(rows: list[dict[str, Any]]) -> int:
    sources: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        sources[r.get("group") or r["id"]].add(r["source"])
    return sum(1 for s in sources.values() if len(s) > 1)


def mix_plan(sources) -> list[dict[str, Any]]:
    """The mix stage's view of `data.sources`."""
    return [{"name": s.name, "weight": s.weight, "max_rows": s.max_rows} for s in sources]


mix_task = stage_task("mix")(mix)
