"""tokenize: render rows with a prompt template and write token ids + labels as Arrow.

Each split is read and encoded in batches of tokenize.batch_rows rows (here, or as Ray
tasks a few batches at a time), and each batch is saved as soon as it is encoded, so memory
holds one batch, not the split.

Fast path ("segments"): every row is a list of (text, trainable) segments (see
instructflow.templates). The distinct segment texts of a whole batch (the template's fixed
pieces appear once) are tokenised in ONE batched fast-tokenizer call, and each row's ids are
the concatenation of its segments' ids; labels follow the segment flags. That equals
tokenising the whole text when no BPE pre-token crosses a segment boundary, which holds for
byte-level BPE tokenizers here because templates put boundaries next to newlines or special
tokens. It is checked on up to 256 rows spread over the whole batch; if any differs (e.g. a
Metaspace/SentencePiece tokenizer, or a Llama-3-style regex that glues punctuation to following
newlines), the stage uses the "offsets" path: one batched call over whole texts, labels from
character offsets. Labels, either way: a token is trained iff any of its characters belongs to
a trainable segment, so a token straddling the prompt/answer boundary is trained
(`boundary_labels`). The evaluate stage scores perplexity on exactly these ids and labels.
Arrays go straight into pyarrow (int32 lists); each split is one `datasets.load_from_disk`
directory with an Arrow shard per batch (`ShardedSave`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np

from instructflow import fast_bpe, plots, templates
from instructflow.arrow_io import hash_buffers, save_dataset
from instructflow.artifacts import ArtifactRef, write_artifact
from instructflow.caching import stage_task
from instructflow.config import RayConfig, TokenizeConfig
from instructflow.rows import SPLITS, iter_batches
from instructflow.special_text import SpecialText

IGNORE = templates.IGNORE_INDEX
CHECK_ROWS = 256
# Batches in flight at once on the Ray engine: the driver holds a window's rows and tables,
# so this bounds its memory (at the cost of idling a cluster with more task slots).
RAY_WINDOW = 4


def fast_backend(tokenizer):
    """The Rust tokenizer behind a transformers fast tokenizer (no per-call Python wrapping)."""
    return tokenizer.backend_tokenizer


def encode_batch(backend, texts: list[str]) -> list[list[int]]:
    """One batched call, using the tokenizer's Rust threads where there are cores to spare.

    Measured on a quiet 2-core machine: 12K Alpaca texts in 0.79 s with threads vs 1.29 s
    without (under heavy load from other jobs threads gave nothing); ids are the same.
    """
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    if threads >= 2:
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def special_affixes(tokenizer, template: str) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds around a text itself (e.g. BOS), when the template wants them."""
    if not templates.add_special_tokens(template):
        return [], []
    core = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    for k in range(len(full) - len(core) + 1):
        if full[k : k + len(core)] == core:
            return full[:k], full[k + len(core) :]
    return [], []


class Encoded:
    """Flat token arrays of many rows: values/labels concatenated, row offsets."""

    def __init__(
        self, values: np.ndarray, trainable: np.ndarray, lengths: np.ndarray, engine: str = ""
    ):
        self.engine = engine  # what produced the ids: "tiktoken" or "tokenizers"
        self.values = values.astype(np.int32, copy=False)
        self.trainable = trainable
        self.lengths = lengths.astype(np.int64, copy=False)


def encode_segments(
    backend, segs: list[templates.Segments], prefix: list[int], suffix: list[int], fast=None
) -> Encoded:
    """Tokenise each distinct segment once and concatenate per row.

    `fast` (an instructflow.fast_bpe.FastBPE) encodes the distinct segments when its ids match
    the backend's on a spread-out sample of them; otherwise the backend does."""
    index: dict[str, int] = {}
    order: list[int] = []
    train: list[bool] = []
    per_row = np.empty(len(segs), dtype=np.int64)
    for r, row in enumerate(segs):
        per_row[r] = len(row) + 2
        order.append(-2)  # the tokenizer's own specials (e.g. BOS) wrap each row, untrained
        train.append(False)
        for text, trainable in row:
            order.append(index.setdefault(text, len(index)))
            train.append(trainable)
        order.append(-1)
        train.append(False)
    texts = list(index)
    flat, seg_len, engine = _encode_distinct(backend, texts, fast)
    affix = np.asarray(prefix + suffix, dtype=np.int32)
    flat = np.concatenate([flat, affix])
    seg_len = np.concatenate([seg_len, [len(prefix), len(suffix)]]).astype(np.int64)
    n_pieces = len(seg_len)
    seg_start = np.concatenate([[0], np.cumsum(seg_len)[:-1]])
    # Gather: token k of piece j is flat[seg_start[order[j]] + k], fully vectorised.
    pieces = np.asarray(order, dtype=np.int64) % n_pieces
    tok_len = seg_len[pieces]
    piece_start = np.concatenate([[0], np.cumsum(tok_len)[:-1]])
    total = int(tok_len.sum())
    gather = np.arange(total) + np.repeat(seg_start[pieces] - piece_start, tok_len)
    trainable = np.repeat(np.asarray(train, dtype=bool), tok_len)
    row_of_piece = np.repeat(np.arange(len(segs)), per_row)
    lengths = np.bincount(row_of_piece, weights=tok_len, minlength=len(segs)).astype(np.int64)
    return Encoded(flat[gather], trainable, lengths, engine)


def _encode_distinct(backend, texts: list[str], fast) -> tuple[np.ndarray, np.ndarray, str]:
    """(concatenated ids, ids per text, engine) of `texts`."""
    verified = _fast_if_verified(backend, texts, fast) if fast is not None and texts else None
    if verified is not None:
        return (*verified, "tiktoken")
    ids = encode_batch(backend, texts)
    seg_len = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(seg_len.sum()))
    return flat, seg_len, "tokenizers"


def _fast_if_verified(backend, texts: list[str], fast) -> tuple[np.ndarray, np.ndarray] | None:
    """`fast`'s (ids, lengths) if they equal the backend's on a spread-out sample, else None."""
    try:
        flat, seg_len = fast.encode(texts)
    except ValueError:  # a text holds the chunk separator
        return None
    sample = spread_sample(len(texts))
    want = encode_batch(backend, [texts[i] for i in sample])
    starts = np.concatenate([[0], np.cumsum(seg_len)])
    same = all(
        flat[starts[i] : starts[i + 1]].tolist() == w for i, w in zip(sample, want, strict=True)
    )
    return (flat, seg_len) if same else None


def encode_offsets(
    backend, segs: list[templates.Segments], prefix: list[int], suffix: list[int]
) -> Encoded:
    """Fallback: tokenise whole texts; a token is trainable if any of its characters lies in
    a trainable segment (see `boundary_labels`)."""
    texts = ["".join(t for t, _ in row) for row in segs]
    encs = backend.encode_batch(texts, add_special_tokens=False)
    values, trainable, lengths = [], [], []
    pre, post = np.zeros(len(prefix), dtype=bool), np.zeros(len(suffix), dtype=bool)
    for row, enc in zip(segs, encs, strict=True):
        mask = boundary_labels([(len(t), f) for t, f in row], enc.offsets)
        values.append(np.asarray(prefix + enc.ids + suffix, dtype=np.int32))
        trainable.append(np.concatenate([pre, mask, post]))
        lengths.append(len(values[-1]))
    return Encoded(
        np.concatenate(values), np.concatenate(trainable), np.asarray(lengths), "tokenizers"
    )


def boundary_labels(pieces: list[tuple[int, bool]], offsets) -> np.ndarray:
    """Which tokens are trained, given the text's (length, trainable) pieces and each token's
    (start, end) character offsets.

    The rule: a token is trained if ANY of its characters lies in a trainable piece. So a token
    that straddles the prompt/answer boundary (a Metaspace/SentencePiece '▁The' whose space
    comes from the prompt's newline, or a BPE merge of '\nThe') is trained: it carries answer
    text, and leaving it out would drop the answer's first token from the loss.
    """
    ends = np.cumsum([n for n, _ in pieces])
    flags = np.asarray([f for _, f in pieces] + [False], dtype=bool)
    spans = np.asarray(list(offsets), dtype=np.int64).reshape(-1, 2)
    first = np.searchsorted(ends, spans[:, 0], side="right")
    # An empty span (e.g. an added special token) counts by where it starts.
    last = np.searchsorted(ends, np.maximum(spans[:, 1] - 1, spans[:, 0]), side="right")
    trained_before = np.concatenate([[0], np.cumsum(flags)])
    return trained_before[last + 1] - trained_before[first] > 0


def spread_sample(n: int, k: int = CHECK_ROWS) -> np.ndarray:
    """Up to k row indices spread evenly over 0..n-1 (first and last included)."""
    return np.unique(np.linspace(0, n - 1, min(k, n)).astype(np.int64)) if n else np.zeros(0, int)


def segments_match(backend, segs: list[templates.Segments], enc: Encoded, affix: int) -> bool:
    """Does concatenating segment ids equal tokenising the whole text, on rows spread over the
    whole batch?"""
    sample = spread_sample(len(segs))
    whole = encode_batch(backend, ["".join(t for t, _ in segs[i]) for i in sample])
    starts = np.concatenate([[0], np.cumsum(enc.lengths)])
    for i, want in zip(sample, whole, strict=True):
        got = enc.values[starts[i] + affix : starts[i + 1]][: len(want)].tolist()
        if got != want or enc.lengths[i] - affix < len(want):
            return False
    return True


def to_table(enc: Encoded, cfg: TokenizeConfig) -> tuple[Any, dict[str, int]]:
    """Apply labels, truncation/drop, and build the pyarrow table; returns (table, counts)."""
    import pyarrow as pa

    n = len(enc.lengths)
    starts = np.concatenate([[0], np.cumsum(enc.lengths)[:-1]]).astype(np.int64)
    row_of = np.repeat(np.arange(n), enc.lengths)
    pos = np.arange(len(enc.values)) - starts[row_of]
    labels = np.where(enc.trainable | cfg.train_on_inputs, enc.values, IGNORE).astype(np.int32)
    too_long = enc.lengths > cfg.max_length
    keep_row = ~too_long if cfg.truncation == "drop" else np.ones(n, dtype=bool)
    keep_tok = keep_row[row_of] & (pos < cfg.max_length)
    # A row whose trained tokens were all cut off teaches nothing: drop it.
    trained = np.bincount(row_of[keep_tok], weights=labels[keep_tok] != IGNORE, minlength=n)
    no_target = keep_row & (trained == 0)
    keep_row &= ~no_target
    keep_tok &= keep_row[row_of]
    new_len = np.minimum(enc.lengths, cfg.max_length)[keep_row].astype(np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(new_len)]).astype(np.int32))
    table = pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(enc.values[keep_tok])),
            "labels": pa.ListArray.from_arrays(offsets, pa.array(labels[keep_tok])),
            "length": pa.array(new_len),
        }
    )
    counts = {
        "rows_in": n,
        "rows": int(keep_row.sum()),
        "dropped_too_long": int(too_long.sum()) if cfg.truncation == "drop" else 0,
        "truncated": int((too_long & keep_row).sum()) if cfg.truncation == "truncate" else 0,
        "dropped_no_target": int(no_target.sum()),
        "tokens": int(new_len.sum()),
        "trainable_tokens": int((labels[keep_tok] != IGNORE).sum()),
    }
    return table, counts


def encode_rows(
    rows: list[dict[str, Any]], tokenizer, cfg: TokenizeConfig, backend=None
) -> tuple[Any, dict[str, Any]]:
    """Rows -> (pyarrow table of input_ids/labels/length, counts incl. the method used)."""
    backend = backend or fast_backend(tokenizer)
    # A row's own text that spells a special token is encoded as text (special_text).
    special = SpecialText.of(tokenizer)
    segs, shielded = [], False
    for row in rows:
        safe = special.shield(row)
        shielded |= safe is not row
        try:
            segs.append(templates.segments(safe, cfg.template, tokenizer))
        except (KeyError, TypeError, templates.TemplateError) as exc:
            raise templates.TemplateError(f"row {row.get('id')}: {exc}") from None
    prefix, suffix = special_affixes(tokenizer, cfg.template)
    fast = fast_bpe.for_backend(backend) if cfg.engine == "auto" else None
    if shielded:  # tiktoken cannot read sentinels
        backend, fast = special.backend(backend), None
    enc = encode_segments(backend, segs, prefix, suffix, fast)
    method = "segments"
    if not segments_match(backend, segs, enc, len(prefix)):
        enc = encode_offsets(backend, segs, prefix, suffix)
        method = "offsets"
    table, counts = to_table(enc, cfg)
    # Every row's full length, kept or not: what a too-small max_length is judged against.
    return table, {**counts, "method": method, "engine": enc.engine, "input_lengths": enc.lengths}


def split_batches(path: Path, size: int) -> Iterator[list[dict[str, Any]]]:
    """iter_batches, but an empty file is one empty batch, as it always was: it saves an
    empty dataset."""
    batches = iter_batches(path, size)
    yield next(batches, [])
    yield from batches


def encoded_batches(
    path: Path, tokenizer, cfg: TokenizeConfig, backend, ray: RayConfig | None
) -> Iterator[tuple[Any, dict[str, Any], int]]:
    """encode_rows over a JSONL file's batches of cfg.batch_rows rows, in order, here or as
    Ray tasks RAY_WINDOW batches at a time: (table, counts, how many Ray nodes ran its window;
    0 for the local engine)."""
    batches = split_batches(path, cfg.batch_rows)
    if ray is None:
        for rows in batches:
            yield *encode_rows(rows, tokenizer, cfg, backend), 0
            del rows  # before the next batch is read: one batch of rows in memory, not two
        return
    from instructflow import ray_engine

    while window := list(islice(batches, RAY_WINDOW)):
        results, nodes = ray_engine.map_batches(encode_rows, window, (tokenizer, cfg), ray)
        del window  # as above: encoded rows go before the next window is read
        results.reverse()
        while results:  # popped, so a table is freed once saved, not after its whole window
            yield *results.pop(), nodes


def join_counts(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Batches' counts as one split's: numbers summed, methods/engines joined."""
    counts = {k: sum(c[k] for c in parts) for k, v in parts[0].items() if isinstance(v, int)}
    for k in ("method", "engine"):
        counts[k] = "+".join(sorted({c[k] for c in parts}))
    return counts


def tokenize_split(
    path: Path, out: Path, tokenizer, cfg: TokenizeConfig, backend, ray: RayConfig | None
) -> tuple[dict[str, Any], np.ndarray, int, np.ndarray]:
    """Encode one split file and save it to `out`, each batch as soon as it is encoded:
    (counts, kept rows' lengths, how many Ray nodes took part, every input row's length)."""
    writer = ShardedSave(out)
    counts, lengths, inputs, nodes = [], [], [], 0
    for table, batch_counts, used in encoded_batches(path, tokenizer, cfg, backend, ray):
        writer.add(table)
        inputs.append(np.asarray(batch_counts.pop("input_lengths")))
        counts.append(batch_counts)
        lengths.append(table.column("length").to_numpy())
        nodes = max(nodes, used)
        del table  # saved: free it before the next batch is encoded
    writer.close()
    return join_counts(counts), np.concatenate(lengths), nodes, np.concatenate(inputs)


class ShardedSave:
    """A save_to_disk directory written one table at a time, so only one is ever in memory.

    Each table is saved on its own into a scratch dir beside `path` (datasets sizes its shards:
    one, none for an empty table, more only past 500 MB); close() moves all the shards into
    `path`, renamed data-i-of-N in order, and writes the state naming them all. The fingerprint
    hashes every table's buffers in order, so equal data gives byte-equal artifacts, and one
    table gives exactly save_table's files."""

    def __init__(self, path: Path):
        self.path = path
        self.scratch = path.with_name(f".{path.name}.parts")
        self.hash = hashlib.sha256()
        self.parts: list[Path] = []

    def add(self, table) -> None:
        hash_buffers(self.hash, table)
        part = self.scratch / f"{len(self.parts):06d}"
        # The running fingerprint: the last part's state then holds the whole split's.
        save_dataset(table, part, self.hash.hexdigest()[:16])
        self.parts.append(part)

    def close(self) -> None:
        from datasets import config

        shards = [f for part in self.parts for f in sorted(part.glob("data-*.arrow"))]
        self.path.mkdir()
        names = [f"data-{i:05d}-of-{len(shards):05d}.arrow" for i in range(len(shards))]
        for shard, name in zip(shards, names, strict=True):
            shard.rename(self.path / name)
        last = self.parts[-1]
        state = json.loads((last / config.DATASET_STATE_JSON_FILENAME).read_text("utf-8"))
        state["_data_files"] = [{"filename": name} for name in names]
        # As save_to_disk writes it, so a single part's state comes out byte-identical.
        text = json.dumps(state, indent=2, sort_keys=True)
        (self.path / config.DATASET_STATE_JSON_FILENAME).write_text(text, encoding="utf-8")
        (last / config.DATASET_INFO_FILENAME).rename(self.path / config.DATASET_INFO_FILENAME)
        shutil.rmtree(self.scratch)  # write_artifact digests every file left in its tmp dir


def length_stats(lengths: np.ndarray) -> dict[str, float]:
    if len(lengths) == 0:
        return {"mean_length": 0.0, "p50_length": 0.0, "p95_length": 0.0, "max_length": 0}
    return {
        "mean_length": round(float(lengths.mean()), 2),
        "p50_length": float(np.percentile(lengths, 50)),
        "p95_length": float(np.percentile(lengths, 95)),
        "max_length": int(lengths.max()),
    }


def input_length_stats(lengths: np.ndarray) -> dict[str, float]:
    """The data's own token lengths, before anything is dropped or cut."""
    if len(lengths) == 0:
        return {"input_p95_length": 0.0, "input_p99_length": 0.0, "input_max_length": 0}
    return {
        "input_p95_length": float(np.percentile(lengths, 95)),
        "input_p99_length": float(np.percentile(lengths, 99)),
        "input_max_length": int(lengths.max()),
    }


def model_limit(tokenizer) -> int | None:
    """The tokenizer's model_max_length when it is a real limit (hub tokenizers without one
    carry a ~1e30 sentinel)."""
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, int) and 0 < limit < 1_000_000 else None


def _round_up(n: float) -> int:
    """A max_length worth typing: to 8 tokens while short, to 64 above 128."""
    step = 8 if n <= 128 else 64
    return int(-(-int(np.ceil(n)) // step) * step)


def length_note(
    lengths: np.ndarray, cfg: TokenizeConfig, total: dict[str, int], limit: int | None
) -> str | None:
    """One line when rows were dropped (or cut) for tokenize.max_length: how many, the
    limit, the data's lengths against it and the override that keeps them; None otherwise.
    The suggestion is the longest row rounded up, or the p99 when the longest is an outlier
    (over 1.5x the p99), never above the tokenizer's own limit."""
    hit = total["dropped_too_long"] or total["truncated"]
    if not hit or len(lengths) == 0:
        return None
    n, stats = len(lengths), input_length_stats(lengths)
    p95, p99, longest = stats["input_p95_length"], stats["input_p99_length"], int(lengths.max())
    suggest = _round_up(longest if longest <= 1.5 * p99 else p99)
    if limit and suggest > limit:
        suggest = limit
    kept = float((lengths <= suggest).mean())
    whole = "" if total["dropped_too_long"] else " whole"
    kept_txt = f"all of them{whole}" if kept == 1 else f"{100 * kept:.1f} % of all rows{whole}"
    cap = " (the tokenizer's limit)" if suggest == limit else ""
    how = "dropped" if total["dropped_too_long"] else "cut to fit"
    line = (
        f"{hit} of {n} rows ({100 * hit / n:.1f} %) {how}: longer than tokenize.max_length="
        f"{cfg.max_length} tokens (the data's token lengths: p95 {p95:.0f}, p99 {p99:.0f}, "
        f"max {longest}); --set tokenize.max_length={suggest}{cap} keeps {kept_txt}"
    )
    if suggest <= cfg.max_length:  # nothing longer fits the tokenizer
        line = line.rsplit("; ", 1)[0] + f"; the tokenizer reads at most {limit} tokens"
    if total["dropped_too_long"]:
        line += " (or --set tokenize.truncation=truncate cuts them instead of dropping them)"
    return line


def tokenize(
    splits: ArtifactRef, tokenizer: ArtifactRef, cfg: TokenizeConfig, ray: RayConfig | None = None
) -> ArtifactRef:
    """`ray`: run the batches as Ray tasks there (the same artifact as without)."""
    from transformers import AutoTokenizer

    # A saved tokenizer folder needs only this call: importing instructflow.loading would put
    # the model loaders into tokenize's code identity.
    tok = AutoTokenizer.from_pretrained(tokenizer.path)
    backend = fast_backend(tok)

    def write(tmp: Path) -> dict[str, Any]:
        report: dict[str, Any] = {
            "template": cfg.template,
            "max_length": cfg.max_length,
            "splits": {},
        }
        lengths: dict[str, np.ndarray] = {}
        inputs: list[np.ndarray] = []
        nodes = 0
        for name in SPLITS:
            path = splits.file(f"{name}.jsonl")
            counts, lengths[name], used, full = tokenize_split(
                path, tmp / name, tok, cfg, backend, ray
            )
            inputs.append(full)
            nodes = max(nodes, used)
            report["splits"][name] = {**counts, **length_stats(lengths[name])}
        parts = report["splits"].values()
        total = {k: sum(p[k] for p in parts) for k in ("rows", "tokens", "trainable_tokens")}
        for k in ("dropped_too_long", "truncated", "dropped_no_target"):
            total[k] = sum(p[k] for p in parts)
        all_lengths = np.concatenate(list(lengths.values()))
        metrics = {
            **total,
            **length_stats(all_lengths),
            "trainable_fraction": round(total["trainable_tokens"] / max(total["tokens"], 1), 4),
            **{f"rows_{name}": report["splits"][name]["rows"] for name in SPLITS},
        }
        input_lengths = np.concatenate(inputs)
        metrics.update(input_length_stats(input_lengths))
        report.update(metrics)
        note = length_note(input_lengths, cfg, total, model_limit(tok))
        report["method"] = sorted({p["method"] for p in parts})
        report["engine"] = sorted({p["engine"] for p in parts})
        (tmp / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
        plots.token_lengths(lengths, cfg.max_length, tmp / "token_hist.png")
        if total["rows"] == 0 or report["splits"]["train"]["rows"] == 0:
            why = note or (
                f"{total['dropped_too_long']} longer than tokenize.max_length={cfg.max_length}, "
                f"{total['dropped_no_target']} with no answer token to train on"
            )
            raise ValueError(f"no training examples left: {why}")
        summary = f"{total['rows']} examples, {total['tokens']} tokens"
        if note is None:
            summary += f" (p95 {metrics['p95_length']:.0f}), 0 too long"
        return {
            "figures": metrics,
            # Where it ran is meta, not content: the files are the same on either engine.
            "params": {
                "template_version": templates.TEMPLATE_VERSION,
                "engine": "ray" if ray else "local",
                **({"ray_nodes": nodes} if ray else {}),
            },
            "log_files": ["report.json", "token_hist.png"],
            "summary": f"{summary}; {note}" if note else summary,
            # Printed by the CLI (instructflow.pipeline forwards them), Cached runs included.
            "warnings": [note] if note else [],
        }

    return write_artifact("tokenize", write)


# The engine decides where batches run, never what they give: not part of the key.
tokenize_task = stage_task("tokenize", exclude=["ray"])(tokenize)
