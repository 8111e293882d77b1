"""validate: parse the downloaded files, map every row to the canonical form, reject bad rows.

Every input row ends up either in `clean.jsonl` or in `rejects.jsonl` with a reason
(rows_in == rows_out + rejected, always). Rows stream through in pieces of PIECE_ROWS
(formats.iter_parsed), so a file of millions of rows never sits in memory: each piece is
parsed, mapped and checked, and its rows go to scratch files; what stays in memory is global
by nature: one 16-byte hash per distinct row (exact duplicates) and, for the near-duplicate
search, MinHash signatures (above `lsh_min_rows`) or the texts (below it). Near-duplicates:
TF-IDF char 5-gram cosine, exact below `lsh_min_rows` (scikit-learn, block by block against
the rows kept so far), MinHash + LSH candidates from there on (instructflow.neardup). A file
that cannot be parsed, has no valid row, or has too many invalid rows fails the stage with
one line naming the file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from instructflow import formats, neardup, plots
from instructflow.artifacts import ArtifactRef, write_artifact
from instructflow.caching import stage_task
from instructflow.config import RayConfig, ValidateConfig
from instructflow.formats import DataError, Reject, normalise, quality_problem
from instructflow.neardup import near_duplicate_method
from instructflow.rows import data_files, iter_value_blocks

DUPLICATE_REASONS = ("duplicate", "near_duplicate")
PIECE_ROWS = 20_000
_CLIP_CHARS = 2000
_SCRATCH = ".scratch"


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

    def write(tmp: Path) -> dict[str, Any]:
        scratch = tmp / _SCRATCH
        scratch.mkdir()
        try:
            seen = collect(files, root, cfg, ray, scratch)
            match, method = find_near_duplicates(seen, cfg)
            stats = _file_stats(seen, match)
            check(stats, cfg)
            lengths = write_clean(seen, match, tmp / "clean.jsonl")
            with open(tmp / "rejects.jsonl", "wb") as out:
                for part in seen.reject_files:
                    with open(part, "rb") as fh:
                        shutil.copyfileobj(fh, out)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        report = {**build_report(stats, lengths), "near_duplicate_method": method}
        (tmp / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
        plots.text_lengths(lengths["prompt"], lengths["output"], tmp / "length_hist.png")
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


# -- parse + map + per-row checks + exact duplicates ------------------------------------------


@dataclass
class Collected:
    """What one pass over the files leaves: the distinct rows (scratch files, in order) and
    the per-file counts; `reject_files` are concatenated into rejects.jsonl at the end."""

    scratch: Path
    info: dict[str, dict[str, Any]] = field(default_factory=dict)
    reasons: dict[str, Counter] = field(default_factory=dict)
    file_of: array = field(default_factory=lambda: array("i"))  # per distinct row
    prompt_chars: array = field(default_factory=lambda: array("i"))
    output_chars: array = field(default_factory=lambda: array("i"))
    turns: array = field(default_factory=lambda: array("i"))

    @property
    def rows(self) -> Path:
        return self.scratch / "rows.jsonl"

    @property
    def texts(self) -> Path:
        return self.scratch / "texts.jsonl"

    @property
    def reject_files(self) -> list[Path]:
        return [self.scratch / f"rejects-{k}.jsonl" for k in ("row", "duplicate", "near")]


def collect(
    files: list[Path], root: Path, cfg: ValidateConfig, ray: RayConfig | None, scratch: Path
) -> Collected:
    """Parse, map and check every row; distinct rows to scratch rows.jsonl (and their texts
    to texts.jsonl), rejects to the scratch reject files."""
    seen = Collected(scratch)
    first: dict[bytes, str] = {}  # hash of a distinct row's text -> its id
    with (
        open(seen.rows, "w", encoding="utf-8") as rows_out,
        open(seen.texts, "w", encoding="utf-8") as texts_out,
        open(seen.reject_files[0], "w", encoding="utf-8") as row_rejects,
        open(seen.reject_files[1], "w", encoding="utf-8") as dup_rejects,
    ):
        for index, path in enumerate(files):
            name = path.relative_to(root).as_posix()
            reasons = seen.reasons.setdefault(name, Counter())
            for rows, rejects in _checked_pieces(path, name, cfg, ray, seen.info):
                for r in rejects:
                    reasons[r.reason] += 1
                    _write_reject(row_rejects, r)
                for row in rows:
                    text = _full_text(row)
                    if cfg.drop_exact_duplicates:
                        # 128 bits: a collision among 10^9 rows has odds near 10^-21.
                        key = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16)
                        j = first.setdefault(key.digest(), row["id"])
                        if j != row["id"]:
                            reasons["duplicate"] += 1
                            _write_reject(dup_rejects, _dup_reject(row, "duplicate", j))
                            continue
                    rows_out.write(json.dumps(row, ensure_ascii=False) + "\n")
                    texts_out.write(json.dumps(text) + "\n")
                    seen.file_of.append(index)
                    seen.prompt_chars.append(sum(len(m["content"]) for m in row["messages"][:-1]))
                    seen.output_chars.append(len(row["output"]))
                    seen.turns.append(len(row["messages"]))
    return seen


def _checked_pieces(
    path: Path, name: str, cfg: ValidateConfig, ray: RayConfig | None, info: dict
) -> Iterator[tuple[list[dict[str, Any]], list[Reject]]]:
    """(rows, rejects) of each piece of one file; rejects in row order, so the output never
    depends on where pieces or Ray batches were cut."""
    fmt = None
    size = PIECE_ROWS if ray is None else max(PIECE_ROWS, 4 * ray.batch_rows)
    for parsed in _detectable(formats.iter_parsed(path, name, size)):
        if fmt is None:
            fmt = formats.detect_format(parsed.records, name, cfg.format, cfg.field_mapping)
            info[name] = {"format": fmt, "kind": parsed.kind}
        if ray is None:
            checked = [check_records(parsed.records, name, fmt, cfg)]
        else:  # per-record work, so any cut joined in order gives the same rows and rejects
            from instructflow import ray_engine

            recs, step = parsed.records, ray.batch_rows
            batches = [recs[i : i + step] for i in range(0, len(recs), step)]
            checked, _ = ray_engine.map_batches(check_records, batches, (name, fmt, cfg), ray)
        rows = [row for kept, _ in checked for row in kept]
        rejects = [*parsed.rejects, *(r for _, rejected in checked for r in rejected)]
        yield rows, sorted(rejects, key=lambda r: r.row)  # stable: a row's items keep order


def _detectable(pieces: Iterator[formats.Parsed]) -> Iterator[formats.Parsed]:
    """The pieces, the first one holding at least the 500 records detect_format samples."""
    buffered = formats.Parsed()
    for parsed in pieces:
        buffered.kind = parsed.kind
        buffered.records += parsed.records
        buffered.rejects += parsed.rejects
        if len(buffered.records) >= 500:
            break
    yield buffered
    yield from pieces


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


def _dup_reject(row: dict[str, Any], reason: str, of: str) -> Reject:
    data = {k: row[k] for k in ("messages", "meta")}
    return Reject(row["file"], row["row"], reason, f"same as {of}", data, row["id"])


def _write_reject(fh, reject: Reject) -> None:
    # ASCII escapes keep rejected text with lone surrogates writable.
    fh.write(json.dumps(_reject_json(reject)) + "\n")


def find_near_duplicates(seen: Collected, cfg: ValidateConfig) -> tuple[dict[int, int], str | None]:
    """{distinct row: earlier distinct row it nearly duplicates}, and how they were searched
    (None: not at all)."""
    n = len(seen.file_of)
    if cfg.near_duplicate_threshold is None or n < 2:
        return {}, None
    method = near_duplicate_method(n, cfg.lsh_min_rows)
    if method == "exact":  # fewer than lsh_min_rows texts: held in memory
        texts = [t for block in iter_value_blocks(seen.texts) for t in block]
        return near_duplicates(texts, cfg.near_duplicate_threshold), method
    blocks = lambda: iter_value_blocks(seen.texts)  # noqa: E731
    return neardup.near_duplicates(blocks, n, cfg.near_duplicate_threshold), method


def write_clean(seen: Collected, match: dict[int, int], path: Path) -> dict[str, np.ndarray]:
    """The distinct rows but near-duplicates to `path` (those to the near reject file);
    returns the kept rows' lengths."""
    targets = set(match.values())
    ids: dict[int, str] = {}
    with (
        open(seen.rows, encoding="utf-8") as rows,
        open(path, "w", encoding="utf-8") as out,
        open(seen.reject_files[2], "w", encoding="utf-8") as near,
    ):
        for k, line in enumerate(rows):
            if k in match:
                row = json.loads(line)
                _write_reject(near, _dup_reject(row, "near_duplicate", ids[match[k]]))
                continue
            if k in targets:  # i < j: the id is read before the rows that point to it
                ids[k] = json.loads(line)["id"]
            out.write(line)
    keep = np.ones(len(seen.file_of), dtype=bool)
    keep[list(match)] = False
    return {
        "prompt": np.asarray(seen.prompt_chars)[keep],
        "output": np.asarray(seen.output_chars)[keep],
        "turns": np.asarray(seen.turns)[keep],
    }


def near_duplicates(
    texts: list[str], threshold: float, block: int = 2000, lsh_min_rows: int | None = None
) -> dict[int, int]:
    """{later row: earlier kept row} for TF-IDF char 5-gram cosine >= threshold.

    Exact, but fast: n-grams found in many rows ("common", C) are split off, since they make
    the product dense. cos = x_R.y_R + x_C.y_C <= x_R.y_R + |x_C||y_C|, so the sparse rare-part
    product yields every candidate (plus pairs whose common parts alone could pass), and only
    candidates get their exact cosine. Rows are compared with rows kept so far only.
    From `lsh_min_rows` rows on, the candidates come from MinHash + LSH instead
    (instructflow.neardup: linear cost and bounded memory, cosines on hashed n-grams; it may
    miss a pair the exact search finds).
    """
    from sklearn.feature_extraction.text import TfidfVectorizer

    if near_duplicate_method(len(texts), lsh_min_rows) == "minhash_lsh":
        return neardup.near_duplicates(neardup.in_blocks(texts), len(texts), threshold)
    try:
        X = TfidfVectorizer(
            analyzer="char_wb", ngram_range=(5, 5), sublinear_tf=True, dtype=np.float32
        ).fit_transform(texts)
    except ValueError:  # no n-grams at all
        return {}
    n = X.shape[0]
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


# -- checks, report, outputs -----------------------------------------------------------------


def _file_stats(seen: Collected, match: dict[int, int]) -> dict[str, dict[str, Any]]:
    names = list(seen.reasons)
    file_of = np.asarray(seen.file_of, dtype=np.int64)
    kept = np.bincount(file_of, minlength=len(names))
    near = np.bincount(file_of[list(match)], minlength=len(names))
    stats = {}
    for k, name in enumerate(names):
        reasons = seen.reasons[name]
        reasons["near_duplicate"] += int(near[k])
        reasons = Counter({r: c for r, c in reasons.items() if c})
        n_rej = sum(reasons.values())
        rows_out = int(kept[k] - near[k])
        stats[name] = {
            **seen.info.get(name, {"format": "", "kind": ""}),
            "rows_in": rows_out + n_rej,
            "rows_out": rows_out,
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


def _length_stats(values: np.ndarray) -> dict[str, float]:
    if not len(values):
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


def build_report(
    stats: dict[str, dict[str, Any]], lengths: dict[str, np.ndarray]
) -> dict[str, Any]:
    reasons: Counter[str] = Counter()
    for s in stats.values():
        reasons.update(s["rejects_by_reason"])
    rows_out = sum(s["rows_out"] for s in stats.values())
    rejected = sum(s["rejected"] for s in stats.values())
    return {
        "rows_in": rows_out + rejected,
        "rows_out": rows_out,
        "rejected": rejected,
        "rejects_by_reason": dict(reasons.most_common()),
        "files": stats,
        "lengths": {
            "prompt_chars": _length_stats(lengths["prompt"]),
            "output_chars": _length_stats(lengths["output"]),
            "turns": _length_stats(lengths["turns"]),
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
