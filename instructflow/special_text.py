"""User text that spells a special token is encoded as text, never as the token.

A message holding "<|im_end|>" or the EOS text, encoded as it is, becomes the real special
token: the user ends the turn and writes the next one himself (template injection). So a row's
own text is `shield`ed before rendering: each special string (and each stray sentinel mark) in
it becomes a sentinel, "\\ufdd0" + one private-use character + "\\ufdd1" (noncharacters:
Unicode reserves them for internal use, and no template touches them, Jinja ones included).
`encode` then splits the rendered text at the template's own special tokens, turns sentinels
back into their strings and encodes those stretches with the special tokens split. A text
without sentinels is encoded exactly as before, so normal rows keep their token ids.
"""

from __future__ import annotations

import functools
import re
import weakref
from typing import Any

MARK, END = "\ufdd0", "\ufdd1"
_BASE = 0xF0000  # plane-15 private use: sentinel k carries chr(_BASE + k)
_FIELDS = ("instruction", "input", "output")
_SENTINEL = re.compile(f"{MARK}(.){END}", re.S)
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Encoding:
    """What a Rust tokenizer's Encoding gives the tokenize stage: ids and char offsets."""

    def __init__(self, ids: list[int], offsets: list[tuple[int, int]]):
        self.ids, self.offsets = ids, offsets


class SpecialText:
    """One tokenizer's special strings, and its encoder that reads them as plain text."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        found = {t.content for t in decoder.values() if t.special}
        found |= set(getattr(tokenizer, "all_special_tokens", []) or [])
        self.specials = sorted((s for s in found if s), key=lambda s: (-len(s), s))
        self.ids = {s: tokenizer.convert_tokens_to_ids(s) for s in self.specials}
        alternation = "|".join(map(re.escape, self.specials))
        self.split_re = re.compile(f"({alternation})") if alternation else None
        self.find_re = re.compile("|".join([*map(re.escape, self.specials), MARK, END]))

    @functools.cached_property
    def plain(self):
        """The Rust tokenizer that splits special tokens: made when a text first needs it."""
        return _split_specials_copy(self.tok)

    @classmethod
    def of(cls, tokenizer) -> SpecialText:
        try:
            return _CACHE[tokenizer]
        except (KeyError, TypeError):
            made = cls(tokenizer)
        try:
            _CACHE[tokenizer] = made
        except TypeError:  # not weak-referenceable: built each time
            pass
        return made

    # -- before rendering ------------------------------------------------------------------
    def shield_text(self, text: str) -> str:
        if not isinstance(text, str) or not self.find_re.search(text):
            return text

        def swap(m: re.Match) -> str:
            s = m.group(0)
            if s in (MARK, END):  # a stray mark would be misread: it is not text anyone typed
                return "\ufffd"
            return f"{MARK}{chr(_BASE + self.specials.index(s))}{END}"

        return self.find_re.sub(swap, text)

    def shield(self, row: dict[str, Any]) -> dict[str, Any]:
        """`row` with its own text shielded; the row itself when there is nothing to shield."""
        msgs = row.get("messages") or []
        fields = {k: self.shield_text(row[k]) for k in _FIELDS if k in row}
        contents = [self.shield_text(m.get("content")) for m in msgs]
        if all(fields[k] is row[k] for k in fields) and all(
            c is m.get("content") for c, m in zip(contents, msgs, strict=True)
        ):
            return row
        out = {**row, **fields}
        if msgs:
            out["messages"] = [{**m, "content": c} for m, c in zip(msgs, contents, strict=True)]
        return out

    # -- encoding --------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """The ids of a rendered text; the tokenizer's own encoding when it holds no sentinel."""
        if MARK not in text:
            return self.tok(text, add_special_tokens=add_special_tokens)["input_ids"]
        ids = self.encode_offsets(text).ids
        if not add_special_tokens:
            return ids
        core = self.tok("x", add_special_tokens=False)["input_ids"]
        full = self.tok("x")["input_ids"]
        k = next((i for i in range(len(full)) if full[i : i + len(core)] == core), 0)
        return [*full[:k], *ids, *full[k + len(core) :]]

    def encode_offsets(self, text: str) -> Encoding:
        """Ids and (start, end) offsets in `text` (a sentinel's tokens span the sentinel)."""
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        pos = 0
        parts = self.split_re.split(text) if self.split_re else [text]
        for k, part in enumerate(parts):
            if k % 2:  # a special token the template wrote
                ids.append(self.ids[part])
                offsets.append((pos, pos + len(part)))
            elif part:
                real, spans = self._unshield(part, pos)
                got_ids, got_offsets = self._plain(real)
                ids += got_ids
                for s, e in got_offsets:
                    last = min(max(e - 1, s), len(spans) - 1)
                    offsets.append((spans[min(s, last)][0], spans[last][1]))
            pos += len(part)
        return Encoding(ids, offsets)

    def _unshield(self, part: str, pos: int) -> tuple[str, list[tuple[int, int]]]:
        """The real text of a shielded stretch, and each real character's span in the
        shielded text (a sentinel's characters all get the sentinel's span)."""
        chunks: list[str] = []
        spans: list[tuple[int, int]] = []
        at = 0
        for m in _SENTINEL.finditer(part):
            chunks.append(part[at : m.start()])
            spans += [(pos + i, pos + i + 1) for i in range(at, m.start())]
            index = ord(m.group(1)) - _BASE
            literal = self.specials[index] if 0 <= index < len(self.specials) else "\ufffd"
            chunks.append(literal)
            spans += [(pos + m.start(), pos + m.end())] * len(literal)
            at = m.end()
        chunks.append(part[at:])
        spans += [(pos + i, pos + i + 1) for i in range(at, len(part))]
        return "".join(chunks), spans

    def _plain(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        if self.plain is not None:
            enc = self.plain.encode(text, add_special_tokens=False)
            return enc.ids, enc.offsets
        # A slow tokenizer splits specials per call (no shared state to race on).
        ids = self.tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return ids, [(0, len(text))] * len(ids)

    def backend(self, backend) -> LiteralBackend:
        return LiteralBackend(backend, self)


class LiteralBackend:
    """A Rust tokenizer's batch calls (as the tokenize stage makes them) that read sentinels
    as text; texts without one go to the tokenizer itself, in one batch as before."""

    def __init__(self, backend, special: SpecialText):
        self.backend, self.special = backend, special

    def _batch(self, method: str, texts: list[str], add_special_tokens: bool) -> list[Any]:
        out: list[Any] = [None] * len(texts)
        plain = [i for i, t in enumerate(texts) if MARK not in t]
        got = getattr(self.backend, method)([texts[i] for i in plain], add_special_tokens)
        for i, enc in zip(plain, got, strict=True):
            out[i] = enc
        for i, t in enumerate(texts):
            if out[i] is None:
                out[i] = self.special.encode_offsets(t)
        return out

    def encode_batch_fast(self, texts: list[str], add_special_tokens: bool = False) -> list[Any]:
        return self._batch("encode_batch_fast", texts, add_special_tokens)

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[Any]:
        return self._batch("encode_batch", texts, add_special_tokens)


def _split_specials_copy(tokenizer):
    """A copy of the fast tokenizer's Rust backend that encodes special strings as text (the
    shared one is never switched: another thread may be encoding with it)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    copy.encode_special_tokens = True
    copy.no_truncation()
    copy.no_padding()
    return copy
