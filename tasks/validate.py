"""validate: parse the downloaded files, map every row to the canonical form, reject bad rows.

Every input row ends up either in `clean.jsonl` or in `rejects.jsonl` with a reason
(rows_in == rows_out + rejected, always). Exact duplicates are found first (cheap, and 100K
identical rows collapse to one before the TF-IDF near-duplicate pass); near-duplicates use
scikit-learn TF-IDF char 5-grams and cosine similarity, computed block by block against the
rows kept so far. A file that cannot be parsed, has no valid row, or has too many invalid
rows fails the stage with one line naming the file.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from instructflow import formats, plots
from instructflow.artifacts import ArtifactRef, write_artifact
from instructflow.caching import stage_task
from instructflow.config import RayConfig, ValidateConfig
from instructflow.formats import DataError, Reject, normalise
from instructflow.rows import write_jsonl
from tasks.download import data_files

DUPLICATE_REASONS = ("duplicate", "near_duplicate")
_CLIP_CHARS = 2000


def validate(
    raw: ArtifactRef, cfg: ValidateConfig, stage: str = "validate", *, ray: RayConfig | None = None
) -> ArtifactRef:
    """`stage`: validate/<name> for one of several `data.sources`; its clean rows are then
    also an MLflow dataset input of that name. `ray`: check rows as Ray tasks there, in
    batches of ray.batch_rows (the same artifact as without)."""
    root = raw.dir / "data"
    files = data_files(raw)
    if not files:
        raise DataError(f"{raw.dir}: the download artifact holds no data files")
    rows, rejects, file_info = collect(files, root, cfg, ray)
    rows, method = deduplicate(rows, rejects, cfg)
    stats = _file_stats(file_info, rows, rejects)
    check(stats, cfg)
    rows_in = sum(s["rows_in"] for s in stats.values())
    assert rows_in == len(rows) + len(rejects), "validate lost rows"
    report = {**build_report(stats, rows, rejects), "near_duplicate_method": method}

    def write(tmp: Path) -> dict[str, Any]:
        write_jsonl(tmp / "clean.jsonl", rows)
        # ASCII escapes keep rejected text with lone surrogates writable.
        write_jsonl(tmp / "rejects.jsonl", map(_reject_json, rejects), ascii_only=True)
        (tmp / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
        plots.text_lengths(*_lengths(rows), tmp / "length_hist.png")
        return {
            "figures": _metrics(report),
            "params": {"formats": ",".join(sorted({s["format"] for s in stats.values()}))},
            "log_files": ["report.json", "rejects.jsonl", "length_hist.png", "clean.jsonl"],
            "summary": _summary(report),
            "datasets": [
                {"file": "clean.jsonl", "name": stage.split("/", 1)[1], "context": "source"}
            ]
            if "/" in stage
            else [],
        }

    return write_artifact(stage, write)


# -- parse + map + per-row checks ------------------------------------------------------------


def collect(
    files: list[Path], root: Path, cfg: ValidateConfig, ray: RayConfig | None = None
) -> tuple[list[dict[str, Any]], list[Reject], dict[str, dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    rejects: list[Reject] = []
    info: dict[str, dict[str, Any]] = {}
    for path in files:
        name = path.relative_to(root).as_posix()
        parsed = formats.read_file(path, name)
        fmt = formats.detect_format(parsed.records, name, cfg.format, cfg.field_mapping)
        info[name] = {"format": fmt, "kind": parsed.kind}
        rejects.extend(parsed.rejects)
        if ray is None:
            checked = [check_records(parsed.records, name, fmt, cfg)]
        else:  # per-record work, so any cut joined in order gives the same rows and rejects
            from instructflow import ray_engine

            size = ray.batch_rows
            batches = [parsed.records[i : i + size] for i in range(0, len(parsed.records), size)]
            checked, _ = ray_engine.map_batches(check_records, batches, (name, fmt, cfg), ray)
        for kept, rejected in checked:
            rows.extend(kept)
            rejects.extend(rejected)
    return rows, rejects, info


def check_records(
    records: list[formats.Record], name: str, fmt: str, cfg: ValidateConfig
) -> tuple[list[dict[str, Any]], list[Reject]]:
    """Map parsed records of file `name` to canonical rows; (rows, rejects), in record order."""
    rows: list[dict[str, Any]] = []
    rejects: list[Reject] = []
    for rec in records:
        items = list(
            formats.to_canonical(rec.value, fmt, cfg.field_mapping, cfg.input_placeholders)
        )
        for k, item in enumerate(items):
            rid = f"{name}:{rec.row}" + (f".{k + 1}" if len(items) > 1 else "")
            if isinstance(item, formats.RowReject):
                rejects.append(Reject(name, rec.row, item.reason, item.detail, rec.value, rid))
                continue
            problem = quality_problem(item, cfg)
            if problem is not None:
                rejects.append(Reject(name, rec.row, *problem, rec.value, rid))
                continue
            rows.append(_canonical(rid, name, rec.row, item))
    return rows, rejects


def quality_problem(row: dict[str, Any], cfg: ValidateConfig) -> tuple[str, str] | None:
    """(reason, detail) for a mapped row that should not be trained on, else None."""
    total = sum(len(m["content"]) for m in row["messages"])
    if total > cfg.max_chars:
        return "too_long", f"{total} chars > validate.max_chars={cfg.max_chars}"
    bad = next((m for m in row["messages"] if formats.undecodable(m["content"])), None)
    if bad is not None:
        return "undecodable", f"{bad['role']} text holds U+FFFD or a lone surrogate"
    instruction, output = row["instruction"].strip(), row["output"].strip()
    if not instruction:
        return "empty_instruction", "'instruction' is empty"
    if not output:
        return "empty_output", "'output' is empty"
    if formats.is_placeholder(output, cfg.placeholders):
        return "placeholder_output", f"output is {output[:40]!r}"
    if len(instruction) < cfg.min_instruction_chars:
        return (
            "too_short",
            f"instruction < validate.min_instruction_chars={cfg.min_instruction_chars}",
        )
    if len(output) < cfg.min_output_chars:
        return "too_short", f"output < validate.min_output_chars={cfg.min_output_chars}"
    return None


def _canonical(rid: str, name: str, row: int, item: dict[str, Any]) -> dict[str, Any]:
    prompt = "\n".join(m["content"] for m in item["messages"] if m["role"] != "assistant")
    return {
        "id": rid,
        "file": name,
        "row": row,
        "messages": item["messages"],
        "instruction": item["instruction"],
        "input": item["input"],
        "output": item["output"],
        "group": hashlib.sha1(normalise(prompt).encode()).hexdigest()[:16],
        "augmented_from": None,
        "meta": item["meta"],
    }


# -- duplicates ------------------------------------------------------------------------------


def _full_text(row: dict[str, Any]) -> str:
    return normalise("\n".join(f"{m['role']}: {m['content']}" for m in row["messages"]))


def deduplicate(
    rows: list[dict[str, Any]], rejects: list[Reject], cfg: ValidateConfig
) -> tuple[list[dict[str, Any]], str | None]:
    """Keep the first of each exact (then near-) duplicate; the others become rejects.
    Also returns how near-duplicates were searched (None: not at all)."""
    texts = [_full_text(r) for r in rows]
    if cfg.drop_exact_duplicates:
        first: dict[str, int] = {}
        keep = []
        for i, text in enumerate(texts):
            j = first.setdefault(text, i)
            if j == i:
                keep.append(i)
            else:
                _reject_dup(rejects, rows[i], "duplicate", rows[j]["id"])
        rows, texts = [rows[i] for i in keep], [texts[i] for i in keep]
    method = None
    if cfg.near_duplicate_threshold is not None and len(rows) > 1:
        method = near_duplicate_method(len(rows), cfg.lsh_min_rows)
        match = near_duplicates(texts, cfg.near_duplicate_threshold, lsh_min_rows=cfg.lsh_min_rows)
        for j, i in sorted(match.items()):
            _reject_dup(rejects, rows[j], "near_duplicate", rows[i]["id"])
        rows = [r for k, r in enumerate(rows) if k not in match]
    return rows, method


def _reject_dup(rejects: list[Reject], row: dict[str, Any], reason: str, of: str) -> None:
    data = {k: row[k] for k in ("messages", "meta")}
    rejects.append(Reject(row["file"], row["row"], reason, f"same as {of}", data, row["id"]))


def near_duplicate_method(n_rows: int, lsh_min_rows: int | None) -> str:
    """What `near_duplicates` uses for `n_rows` rows (recorded in the reports)."""
    return "minhash_lsh" if lsh_min_rows is not None and n_rows >= lsh_min_rows else "exact"


def near_duplicates(
    texts: list[str], threshold: float, block: int = 2000, lsh_min_rows: int | None = None
) -> dict[int, int]:
    """{later row: earlier kept row} for TF-IDF char 5-gram cosine >= threshold.

    Exact, but fast: n-grams found in many rows ("common", C) are split off, since they make
    the product dense. cos = x_R.y_R + x_C.y_C <= x_R.y_R + |x_C||y_C|, so the sparse rare-part
    product yields every candidate (plus pairs whose common parts alone could pass), and only
    candidates get their exact cosine. Rows are compared with rows kept so far only.
    From `lsh_min_rows` rows on, the candidates come from MinHash + LSH instead
    (instructflow.minhash: linear cost, a pair it reports has the same exact cosine; it may
    miss a pair the exact search finds).
    """
    from sklearn.feature_extraction.text import TfidfVectorizer

    try:
        X = TfidfVectorizer(
            analyzer="char_wb", ngram_range=(5, 5), sublinear_tf=True, dtype=np.float32
        ).fit_transform(texts)
    except ValueError:  # no n-grams at all
        return {}
    n = X.shape[0]
    if near_duplicate_method(n, lsh_min_rows) == "minhash_lsh":
        return _near_duplicates_lsh(X.tocsr(), texts, threshold)
    df = np.bincount(X.indices, minlength=X.shape[1])
    common = df > max(50, 0.02 * n)
    Xc = X.tocsc()
    XC = Xc[:, np.flatnonzero(common)].tocsr()
    XR = Xc[:, np.flatnonzero(~common)].tocsr()
    X = X.tocsr()
    a = np.sqrt(np.asarray(XC.multiply(XC).sum(axis=1)).ravel())
    hi = a >= threshold
    kept = np.ones(n, dtype=bool)
    match: dict[int, int] = {}
    for s in range(0, n, block):
        e = min(n, s + block)
        cols = np.flatnonzero(kept[:e])
        S = (XR[s:e] @ XR[cols].T).tocoo()
        r, c = S.row + s, cols[S.col]
        ok = (c < r) & (S.data + a[r] * a[c] >= threshold)
        r, c, sim = r[ok], c[ok], S.data[ok]
        if len(r):
            sim = sim + np.asarray(XC[r].multiply(XC[c]).sum(axis=1)).ravel()
        hr = np.flatnonzero(hi[s:e]) + s
        hc = cols[hi[cols]]
        if len(hr) and len(hc):
            H = (X[hr] @ X[hc].T).tocoo()
            r = np.concatenate([r, hr[H.row]])
            c = np.concatenate([c, hc[H.col]])
            sim = np.concatenate([sim, H.data])
        sel = (sim >= threshold) & (c < r)
        order = np.lexsort((c[sel], r[sel]))
        for j, i in zip(r[sel][order].tolist(), c[sel][order].tolist(), strict=True):
            if kept[j] and kept[i]:
                kept[j] = False
                match[j] = i
    return match


def pair_cosines(A, B, rows_a: np.ndarray, rows_b: np.ndarray, chunk: int = 200_000):
    """Cosine of A[rows_a[k]] and B[rows_b[k]] for every k (L2-normalised sparse rows)."""
    out = np.empty(len(rows_a), dtype=np.float64)
    for s in range(0, len(rows_a), chunk):
        a, b = A[rows_a[s : s + chunk]], B[rows_b[s : s + chunk]]
        out[s : s + chunk] = np.asarray(a.multiply(b).sum(axis=1)).ravel()
    return out


def _near_duplicates_lsh(X, texts: list[str], threshold: float) -> dict[int, int]:
    from instructflow import minhash

    later, earlier = minhash.candidate_pairs(minhash.signatures(texts))
    sim = pair_cosines(X, X, later, earlier)
    sel = sim >= threshold
    r, c = later[sel], earlier[sel]
    order = np.lexsort((c, r))
    kept = np.ones(X.shape[0], dtype=bool)
    match: dict[int, int] = {}
    # As the exact search: in row order, a row goes when an earlier row still kept matches.
    for j, i in zip(r[order].tolist(), c[order].tolist(), strict=True):
        if kept[j] and kept[i]:
            kept[j] = False
            match[j] = i
    return match


# -- checks, report, outputs -----------------------------------------------------------------


def _file_stats(
    info: dict[str, dict[str, Any]], rows: list[dict[str, Any]], rejects: list[Reject]
) -> dict[str, dict[str, Any]]:
    kept = Counter(r["file"] for r in rows)
    stats = {}
    for name, meta in info.items():
        reasons = Counter(r.reason for r in rejects if r.file == name)
        n_rej = sum(reasons.values())
        stats[name] = {
            **meta,
            "rows_in": kept[name] + n_rej,
            "rows_out": kept[name],
            "rejected": n_rej,
            "rejects_by_reason": dict(reasons.most_common()),
        }
    return stats


def check(stats: dict[str, dict[str, Any]], cfg: ValidateConfig) -> None:
    """Fail (one line, naming the file) when a file has nothing valid or too much invalid."""
    for name, s in stats.items():
        reasons = s["rejects_by_reason"]
        invalid = sum(v for k, v in reasons.items() if k not in DUPLICATE_REASONS)
        top = ", ".join(f"{k} {v}" for k, v in list(reasons.items())[:3])
        if s["rows_out"] == 0 and invalid:
            raise DataError(f"{name}: no valid rows ({s['rejected']} rejected: {top})")
        fraction = invalid / max(1, s["rows_in"])
        if fraction > cfg.max_reject_fraction:
            raise DataError(
                f"{name}: {invalid} of {s['rows_in']} rows invalid ({fraction:.0%} > "
                f"validate.max_reject_fraction={cfg.max_reject_fraction}): {top}"
            )


def _length_stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values)
    return {
        "min": int(arr.min()),
        "mean": round(float(arr.mean()), 1),
        "p50": float(np.percentile(arr, 50)),
        "p95": float(np.percentile(arr, 95)),
        "p99": float(np.percentile(arr, 99)),
        "max": int(arr.max()),
    }


def _lengths(rows: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
    prompt = [sum(len(m["content"]) for m in r["messages"][:-1]) for r in rows]
    output = [len(r["output"]) for r in rows]
    return prompt, output


def build_report(
    stats: dict[str, dict[str, Any]], rows: list[dict[str, Any]], rejects: list[Reject]
) -> dict[str, Any]:
    prompt, output = _lengths(rows)
    return {
        "rows_in": len(rows) + len(rejects),
        "rows_out": len(rows),
        "rejected": len(rejects),
        "rejects_by_reason": dict(Counter(r.reason for r in rejects).most_common()),
        "files": stats,
        "lengths": {
            "prompt_chars": _length_stats(prompt),
            "output_chars": _length_stats(output),
            "turns": _length_stats([len(r["messages"]) for r in rows]),
        },
    }


def _metrics(report: dict[str, Any]) -> dict[str, float]:
    m: dict[str, float] = {
        "rows_in": report["rows_in"],
        "rows_out": report["rows_out"],
        "rejected": report["rejected"],
        "files": len(report["files"]),
    }
    m.update({f"reject.{k}": v for k, v in report["rejects_by_reason"].items()})
    for kind in ("prompt_chars", "output_chars"):
        s = report["lengths"][kind]
        if s:
            m[f"{kind}_mean"] = s["mean"]
            m[f"{kind}_p95"] = s["p95"]
    return m


def _summary(report: dict[str, Any]) -> str:
    top = ", ".join(f"{k} {v}" for k, v in list(report["rejects_by_reason"].items())[:3])
    text = f"{report['rows_out']} rows kept, {report['rejected']} rejected"
    return f"{text} ({top})" if top else text


def clip(value: Any, limit: int = _CLIP_CHARS, depth: int = 0) -> Any:
    """A bounded copy of a rejected row, so a 10 MB field does not make a 10 MB reject file."""
    if isinstance(value, str):
        return value if len(value) <= limit else f"{value[:limit]}…[+{len(value) - limit} chars]"
    if depth > 4:
        return "…"
    if isinstance(value, dict):
        items = list(value.items())
        out = {str(k): clip(v, limit, depth + 1) for k, v in items[:50]}
        if len(items) > 50:
            out["…"] = f"+{len(items) - 50} keys"
        return out
    if isinstance(value, list | tuple):
        out_list = [clip(v, limit, depth + 1) for v in value[:50]]
        if len(value) > 50:
            out_list.append(f"…[+{len(value) - 50} items]")
        return out_list
    return value


def _reject_json(r: Reject) -> dict[str, Any]:
    return {
        "id": r.id or f"{r.file}:{r.row}",
        "file": r.file,
        "row": r.row,
        "reason": r.reason,
        "detail": r.detail,
        "data": clip(r.data),
    }


# The engine decides where rows are checked, never the result: not part of the key.
validate_task = stage_task("validate", exclude=["ray"])(validate)
