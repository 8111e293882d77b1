"""Reading raw data files and mapping each row to the canonical conversation form.

Parsing (`read_file`): JSON array, JSON Lines, CSV/TSV, Parquet; UTF-8 with or without BOM,
UTF-16/32 with BOM, any line endings. A file that cannot be parsed at all raises `DataError`
with one line naming the file and the line/column or byte where parsing broke; a JSON Lines
file keeps its good lines and reports each bad one as a `Reject` with its line number.

Mapping (`detect_format`, `to_canonical`): Alpaca, ShareGPT, OpenAI messages, self-instruct,
or an explicit field mapping. Tool-calling turns (ShareGPT function_call/observation, OpenAI
tool messages or tool_calls) are rejected as `unsupported_role`: the canonical form has only
system/user/assistant turns, and flattening tool traffic into them would teach the model a
format nobody asked for.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from instructflow.config import ValidateConfig

ROLE_MAP = {
    "system": "system",
    "developer": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "bard": "assistant",
    "bing": "assistant",
}
CANONICAL_FIELDS = ("instruction", "input", "output", "system")
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


class DataError(RuntimeError):
    """Data that cannot be used at all; str() is one line naming the file (and where)."""


class RowReject(Exception):
    """One row cannot be used; `reason` is a short code, `detail` says which field/turn."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Record:
    """One parsed source record (a JSON value, a CSV row dict, a Parquet row)."""

    row: int  # 1-based: JSON Lines line number, else record number
    value: Any


@dataclass
class Reject:
    file: str
    row: int
    reason: str
    detail: str = ""
    data: Any = None
    id: str | None = None


@dataclass
class Parsed:
    records: list[Record] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    kind: str = "json"


# -- parsing ---------------------------------------------------------------------------------


def read_file(path: Path, name: str) -> Parsed:
    """Parse one raw file; DataError (one line, naming `name`) if it cannot be read at all."""
    data = path.read_bytes()
    suffix = path.suffix.lower()
    if suffix == ".parquet" or data[:4] == b"PAR1":
        return _read_parquet(path, name)
    for bom, enc in _BOMS:
        if data.startswith(bom):
            try:
                # Re-encoded as UTF-8 so that every later step handles one encoding.
                data = data.decode(enc).encode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{name}: not valid {enc.upper()} text at byte {exc.start}"
                ) from None
            break
    # Decoding line by line keeps the good lines of a JSONL file with a bad one.
    lines_mode = suffix in (".jsonl", ".ndjson") or data.lstrip()[:1] == b"{"
    if lines_mode and suffix not in (".csv", ".tsv"):
        parsed = _try_lines_first(data, name, suffix)
        if parsed is not None:
            return parsed
    text = _decode_strict(data, name)
    if not text.strip():
        raise DataError(
            f"{name}: no rows (the file is {'empty' if not text else 'only whitespace'})"
        )
    if suffix in (".csv", ".tsv"):
        return _read_csv(text, name, "\t" if suffix == ".tsv" else ",")
    stripped = text.lstrip()
    if stripped[:1] == "{":
        return _read_json_or_lines(text, name, suffix)
    return _read_json_document(text, name)


def _decode_strict(data: bytes, name: str) -> str:
    nul = data.find(b"\x00", 0, 1 << 16)
    if nul >= 0:
        raise DataError(
            f"{name}: binary data, not text (NUL byte at byte {nul}); "
            "expected UTF-8 JSON, JSONL, CSV or Parquet"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{name}: not valid UTF-8 at byte {exc.start} "
            "(re-save it as UTF-8, or UTF-16 with a BOM)"
        ) from None


def _try_lines_first(data: bytes, name: str, suffix: str) -> Parsed | None:
    """JSON Lines decoded per line; None when the file is not line-delimited after all."""
    if suffix not in (".jsonl", ".ndjson"):
        # A '{'-document in a .json file: one pretty-printed object (wrong top-level type)
        # or JSON Lines. Only the latter goes on from here.
        try:
            json.loads(data.decode("utf-8"))
            return None
        except (UnicodeDecodeError, ValueError):
            pass
    lines = _Lines(name)
    offset = 0
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        lines.parse(raw, lineno, offset)
        offset += len(raw) + 1
    lines.finish(empty=not data)
    return lines.take()


class _Lines:
    """JSON Lines parsing, line by line: records and rejects of the lines so far (`take`
    hands them over), and the counts that decide the file-level errors at the end."""

    def __init__(self, name: str):
        self.name = name
        self.parsed = Parsed(kind="jsonl")
        self.good = 0
        self.first_bad: int | None = None
        self.first_reject: Reject | None = None

    def parse(self, raw: bytes, lineno: int, start: int) -> None:
        """One line (without its newline) that starts at byte `start` of the file."""
        name = self.name
        if not raw.strip():
            return
        try:
            line = raw.decode("utf-8")
            if "\x00" in line:
                raise UnicodeDecodeError("utf-8", raw, raw.index(b"\x00"), 0, "NUL byte")
        except UnicodeDecodeError as exc:
            if self.first_bad is None:
                self.first_bad = start + exc.start
            text = raw[:200].decode("utf-8", "replace")
            detail = f"not UTF-8 at byte {start + exc.start}"
            self._reject(Reject(name, lineno, "undecodable", detail, text))
            return
        try:
            value = json.loads(line)
        except ValueError as exc:
            col = getattr(exc, "colno", None)
            where = f" column {col}" if col else ""
            msg = getattr(exc, "msg", str(exc))
            self._reject(Reject(name, lineno, "invalid_json", f"line {lineno}{where}: {msg}", line))
            return
        self.good += 1
        self.parsed.records.append(Record(lineno, value))

    def _reject(self, reject: Reject) -> None:
        self.first_reject = self.first_reject or reject
        self.parsed.rejects.append(reject)

    def size(self) -> int:
        return len(self.parsed.records) + len(self.parsed.rejects)

    def take(self) -> Parsed:
        parsed, self.parsed = self.parsed, Parsed(kind="jsonl")
        return parsed

    def finish(self, empty: bool) -> None:
        """DataError when no line of the whole file parsed."""
        if self.good:
            return
        name = self.name
        if self.first_bad is not None:
            raise DataError(f"{name}: not valid UTF-8 at byte {self.first_bad} (binary data?)")
        if self.first_reject is None:
            raise DataError(
                f"{name}: no rows (the file is {'empty' if empty else 'only whitespace'})"
            )
        raise DataError(f"{name}: invalid JSON Lines, no line parses ({self.first_reject.detail})")


def iter_parsed(path: Path, name: str, batch_rows: int) -> Iterator[Parsed]:
    """`read_file` in pieces of about `batch_rows` rows. UTF-8 JSON Lines and Parquet are read
    piece by piece, so a file of millions of rows never sits in memory whole; every other
    kind (a JSON array, CSV, UTF-16 text) is read whole, as one piece. The pieces together
    hold what read_file returns, and the same errors are raised (after the last piece). A
    JSON Lines file with a byte-order mark is read whole, as read_file decodes it."""
    suffix = path.suffix.lower()
    with open(path, "rb") as fh:
        head = fh.read(4)
    # A BOM makes read_file decode the whole file at once (one bad byte fails it): kept so.
    bom = any(head.startswith(b) for b, _ in _BOMS)
    if suffix == ".parquet" or head == b"PAR1":
        yield from _iter_parquet(path, name, batch_rows)
    elif suffix in (".jsonl", ".ndjson") and not bom:
        yield from _iter_lines(path, name, batch_rows)
    else:
        yield read_file(path, name)


def _iter_lines(path: Path, name: str, batch_rows: int) -> Iterator[Parsed]:
    lines = _Lines(name)
    offset = 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            raw = raw[:-1] if raw.endswith(b"\n") else raw
            lines.parse(raw, lineno, offset)
            offset += len(raw) + 1
            if lines.size() >= batch_rows:
                yield lines.take()
    lines.finish(empty=offset == 0)
    if lines.size():
        yield lines.take()


def _read_json_or_lines(text: str, name: str, suffix: str) -> Parsed:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _json_error(name, exc) from None
    if suffix in (".jsonl", ".ndjson") and isinstance(value, dict):
        return Parsed([Record(1, value)], kind="jsonl")
    return _from_document(value, name)


def _read_json_document(text: str, name: str) -> Parsed:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _json_error(name, exc) from None
    return _from_document(value, name)


def _json_error(name: str, exc: json.JSONDecodeError) -> DataError:
    hint = ""
    if exc.doc.lstrip()[:1] == "<":
        hint = " (this looks like HTML or XML, not JSON)"
    return DataError(
        f"{name}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}{hint}"
    )


def _from_document(value: Any, name: str) -> Parsed:
    if isinstance(value, list):
        if not value:
            raise DataError(f"{name}: no rows (an empty JSON array)")
        return Parsed([Record(i, v) for i, v in enumerate(value, start=1)], kind="json")
    if isinstance(value, dict):
        keys = ", ".join(list(value)[:8])
        raise DataError(
            f"{name}: top level is a JSON object (keys: {keys}); "
            "expected an array of row objects or JSON Lines"
        )
    raise DataError(
        f"{name}: top level is a JSON {_type_name(value)}; "
        "expected an array of row objects or JSON Lines"
    )


def _read_csv(text: str, name: str, delimiter: str) -> Parsed:
    # A 10 MB cell is legal CSV; the default 128 KB limit would make it a parse error.
    csv.field_size_limit(1 << 30)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    parsed = Parsed(kind="csv")
    try:
        header = next(reader, None)
        if not header or not any(h.strip() for h in header):
            raise DataError(f"{name}: no rows (no CSV header)")
        header = [h.strip().lstrip("\ufeff") for h in header]
        for i, cells in enumerate(reader, start=1):
            if not cells or not any(c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                parsed.rejects.append(
                    Reject(
                        name,
                        i,
                        "bad_csv_row",
                        f"line {reader.line_num}: {len(cells)} cells, header has {len(header)}",
                        cells,
                    )
                )
                continue
            parsed.records.append(Record(i, dict(zip(header, cells, strict=True))))
    except csv.Error as exc:
        raise DataError(f"{name}: invalid CSV at line {reader.line_num}: {exc}") from None
    if not parsed.records and not parsed.rejects:
        raise DataError(f"{name}: no rows (only a CSV header)")
    return parsed


def _read_parquet(path: Path, name: str) -> Parsed:
    records, rejects = [], []
    for piece in _iter_parquet(path, name, 1 << 62):
        records += piece.records
        rejects += piece.rejects
    return Parsed(records, rejects, kind="parquet")


def _iter_parquet(path: Path, name: str, batch_rows: int) -> Iterator[Parsed]:
    import pyarrow.parquet as pq

    row = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=min(batch_rows, 1 << 30)):
            values = batch.to_pylist()
            yield Parsed([Record(row + i, v) for i, v in enumerate(values, 1)], kind="parquet")
            row += len(values)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"{name}: not a readable Parquet file ({first})") from None
    if not row:
        raise DataError(f"{name}: no rows (an empty Parquet table)")


# -- format detection ------------------------------------------------------------------------


def detect_format(
    records: list[Record], name: str, configured: str, mapping: dict[str, str]
) -> str:
    """The format of a file's rows: the configured one, or guessed from its fields."""
    if configured == "mapping" or (configured == "auto" and mapping):
        missing = [k for k in ("instruction", "output") if k not in mapping]
        if missing:
            raise DataError(
                f"{name}: validate.field_mapping must map {' and '.join(missing)} "
                "(e.g. {instruction: instruction, input: context, output: response})"
            )
        return "mapping"
    if configured != "auto":
        return configured
    sample = [r.value for r in records[:500] if isinstance(r.value, dict)]
    if not sample:
        first = records[0].value if records else None
        raise DataError(f"{name}: rows are not JSON objects (row 1 is a {_type_name(first)})")
    keys: Counter[str] = Counter(k for row in sample for k in row)
    half = len(sample) / 2

    def has(*names: str) -> bool:
        return all(keys[n] >= half for n in names)

    if has("conversations"):
        return "sharegpt"
    if has("messages"):
        return "openai"
    if has("instruction", "instances"):
        return "self_instruct"
    if has("instruction", "output"):
        return "alpaca"
    seen = ", ".join(k for k, _ in keys.most_common(12))
    raise DataError(
        f"{name}: unknown format (fields seen: {seen}); set validate.format=mapping with "
        "validate.field_mapping, e.g. {instruction: <field>, input: <field>, output: <field>}"
    )


# -- mapping to canonical rows ---------------------------------------------------------------


def to_canonical(
    value: Any, fmt: str, mapping: dict[str, str], input_placeholders: list[str]
) -> Iterator[dict[str, Any] | RowReject]:
    """Canonical rows (without id/file/row/group) or RowRejects; self-instruct yields several."""
    if not isinstance(value, dict):
        yield RowReject("not_an_object", f"row is a {_type_name(value)}")
        return
    try:
        if fmt == "self_instruct":
            yield from _self_instruct(value, input_placeholders)
            return
        if fmt == "sharegpt":
            yield _conversation(value, "conversations", "from", "value")
        elif fmt == "openai":
            yield _conversation(value, "messages", "role", "content")
        elif fmt == "mapping":
            yield _alpaca(value, mapping, input_placeholders)
        else:
            yield _alpaca(value, {k: k for k in CANONICAL_FIELDS}, input_placeholders)
    except RowReject as rej:
        yield rej


def _alpaca(row: dict[str, Any], fields: dict[str, str], input_placeholders: list[str]) -> dict:
    instruction = _text(row, fields["instruction"])
    output = _text(row, fields["output"])
    inp = _text(row, fields["input"], required=False) if "input" in fields else ""
    if is_placeholder(inp, input_placeholders):
        inp = ""  # '<noinput>' means "no input", not a bad row
    messages = []
    system = _text(row, fields["system"], required=False) if "system" in fields else ""
    if system.strip():
        messages.append({"role": "system", "content": system})
    messages += _history(row.get("history"))
    prompt = f"{instruction}\n\n{inp}" if inp.strip() else instruction
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    used = set(fields.values()) | {"history"}
    meta = _meta(row, used)
    for key, src in fields.items():
        if key not in CANONICAL_FIELDS and src in row:
            meta[key] = _scalar(row[src])
    return {
        "messages": messages,
        "instruction": instruction,
        "input": inp,
        "output": output,
        "meta": meta,
    }


def _history(history: Any) -> list[dict[str, str]]:
    """LLaMA-Factory's Alpaca `history`: [[user, assistant], ...] before the final turn."""
    if history is None:
        return []
    if not isinstance(history, list):
        raise RowReject("wrong_type", f"'history' is a {_type_name(history)}, expected a list")
    out = []
    for k, pair in enumerate(history):
        ok = isinstance(pair, list | tuple) and len(pair) == 2
        if not ok or not all(isinstance(p, str) for p in pair):
            raise RowReject("wrong_type", f"'history'[{k}] is not a [user, assistant] pair")
        out += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return out


def _self_instruct(row: dict[str, Any], input_placeholders: list[str]) -> Iterator:
    try:
        instruction = _text(row, "instruction")
        instances = row.get("instances")
        if instances is None:
            raise RowReject("missing_field", "'instances'")
        if not isinstance(instances, list):
            raise RowReject("wrong_type", f"'instances' is a {_type_name(instances)}")
        if not instances:
            raise RowReject("missing_field", "'instances' is empty")
    except RowReject as rej:
        yield rej
        return
    meta = _meta(row, {"instruction", "instances"})
    for k, inst in enumerate(instances):
        if not isinstance(inst, dict):
            yield RowReject("wrong_type", f"'instances'[{k}] is a {_type_name(inst)}")
            continue
        try:
            merged = {
                "instruction": instruction,
                **{f: inst[f] for f in ("input", "output") if f in inst},
            }
            out = _alpaca(
                merged, {k2: k2 for k2 in ("instruction", "input", "output")}, input_placeholders
            )
        except RowReject as rej:
            rej.detail = f"instances[{k}]: {rej.detail}"
            yield rej
            continue
        out["meta"] = {**meta, "instance": k} if len(instances) > 1 else dict(meta)
        yield out


def _conversation(row: dict[str, Any], key: str, role_key: str, content_key: str) -> dict:
    turns = row.get(key)
    if turns is None:
        raise RowReject("missing_field", f"'{key}'")
    if not isinstance(turns, list):
        raise RowReject("wrong_type", f"'{key}' is a {_type_name(turns)}, expected a list")
    messages: list[dict[str, str]] = []
    system = row.get("system")
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowReject("wrong_type", f"'{key}'[{k}] is a {_type_name(turn)}")
        raw_role = turn.get(role_key)
        if not isinstance(raw_role, str):
            raise RowReject("missing_field", f"'{key}'[{k}].{role_key}")
        role = ROLE_MAP.get(raw_role.strip().lower())
        if role is None or turn.get("tool_calls") or turn.get("function_call"):
            raise RowReject("unsupported_role", f"'{key}'[{k}] role '{raw_role}'")
        content = _content(turn, content_key, f"'{key}'[{k}].{content_key}")
        if role == "system" and not content.strip():
            continue  # an empty system prompt says nothing; dropping it loses nothing
        messages.append({"role": role, "content": content})
    users = [m for m in messages if m["role"] == "user"]
    if not users:
        raise RowReject("no_user_turn", f"'{key}' has no user turn")
    if messages[-1]["role"] != "assistant":
        raise RowReject("no_assistant_turn", f"'{key}' does not end with an assistant turn")
    empty = next((m for m in messages[:-1] if not m["content"].strip()), None)
    if empty is not None:
        raise RowReject("empty_turn", f"an empty {empty['role']} turn in '{key}'")
    return {
        "messages": messages,
        "instruction": users[0]["content"],
        "input": "",
        "output": messages[-1]["content"],
        "meta": _meta(row, {key, "system"}),
    }


def _content(turn: dict[str, Any], key: str, where: str) -> str:
    if key not in turn:
        raise RowReject("missing_field", where)
    content = turn[key]
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        # OpenAI / LLaMA-Factory v1 content parts: [{type: text, text|value: ...}].
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type", "text") != "text":
                kind = part.get("type") if isinstance(part, dict) else _type_name(part)
                raise RowReject("unsupported_content", f"{where}: a '{kind}' part")
            text = part.get("text", part.get("value"))
            if not isinstance(text, str):
                raise RowReject("wrong_type", f"{where}: a text part without a string")
            texts.append(text)
        return "".join(texts)
    raise RowReject("wrong_type", f"{where} is a {_type_name(content)}")


def _text(row: dict[str, Any], key: str, required: bool = True) -> str:
    if key not in row:
        if required:
            raise RowReject("missing_field", f"'{key}'")
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise RowReject("wrong_type", f"'{key}' is a {_type_name(value)}, expected a string")
    return value


def _meta(row: dict[str, Any], used: set[str]) -> dict[str, Any]:
    """Extra scalar fields (task, category, label, id...) ride along for split/stratify."""
    return {
        k: _scalar(v)
        for k, v in row.items()
        if k not in used and isinstance(v, str | int | float | bool) and v is not None
    }


def _scalar(value: Any) -> Any:
    if isinstance(value, str) and len(value) > 200:
        return value[:200]
    return (
        value if isinstance(value, str | int | float | bool) or value is None else str(value)[:200]
    )


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


# -- text helpers ----------------------------------------------------------------------------

_WS = re.compile(r"\s+")


def normalise(text: str) -> str:
    """Whitespace- and case-insensitive form used for duplicate keys."""
    return _WS.sub(" ", text).strip().lower()


def _squash(text: str) -> str:
    return _WS.sub("", text).lower().rstrip(".")


def is_placeholder(text: str, placeholders: list[str]) -> bool:
    """'<nooutput>', '<No Output>', 'n/a.'... match ignoring case, spaces and <brackets>;
    a bracketed placeholder also matches as a prefix ('<no output - a visual task>')."""
    if not text.strip():
        return False
    t = _squash(text)
    for p in placeholders:
        pc = _squash(p)
        if t.strip("<>") == pc.strip("<>"):
            return True
        if pc.startswith("<") and t.startswith(pc.rstrip(">")):
            return True
    return False


def undecodable(text: str) -> bool:
    """Lone surrogates (from \\udXXX escapes) or U+FFFD (text already lost in decoding)."""
    if "\ufffd" in text:
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def quality_problem(row: dict[str, Any], cfg: ValidateConfig) -> tuple[str, str] | None:
    """(reason, detail) for a mapped row that should not be trained on, else None."""
    total = sum(len(m["content"]) for m in row["messages"])
    if total > cfg.max_chars:
        return "too_long", f"{total} chars > validate.max_chars={cfg.max_chars}"
    bad = next((m for m in row["messages"] if undecodable(m["content"])), None)
    if bad is not None:
        return "undecodable", f"{bad['role']} text holds U+FFFD or a lone surrogate"
    instruction, output = row["instruction"].strip(), row["output"].strip()
    if not instruction:
        return "empty_instruction", "'instruction' is empty"
    if not output:
        return "empty_output", "'output' is empty"
    if is_placeholder(output, cfg.placeholders):
        return "placeholder_output", f"output is {output[:40]!r}"
    if len(instruction) < cfg.min_instruction_chars:
        return (
            "too_short",
            f"instruction < validate.min_instruction_chars={cfg.min_instruction_chars}",
        )
    if len(output) < cfg.min_output_chars:
        return "too_short", f"output < validate.min_output_chars={cfg.min_output_chars}"
    return None
