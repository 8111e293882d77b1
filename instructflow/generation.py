"""Batched generation, streamed perplexity and adapter folding for evaluation and serving.

`generate` sorts prompts by length and runs a KV-cached, left-padded decode loop with
continuous batching: a row leaves the batch as soon as it finishes (EOS / end-of-turn / stop
string) and the next queued prompts are prefilled into the freed slots. Outputs come back in
the input order, stripped of the prompt and cut at the first stop string. `perplexity` streams
batches and keeps only running sums, never the logits of the whole set.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from instructflow.templates import IGNORE_INDEX

Progress = Callable[[int, int], None]
# on_token(prompt index, token id), called for each generated token as it is appended.
OnToken = Callable[[int, int], None]
# Rows per prefill call: prompts are length-sorted, and a wider call pads every row to its
# longest; 16 rows of ~100 tokens still make matmuls big enough to run at full speed.
PREFILL_ROWS = 16


def _encode(tokenizer, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]


def eos_ids(tokenizer, extra_tokens: Sequence[str] = ()) -> list[int]:
    """Token ids that end a generation: the tokenizer's EOS plus single-token stop markers."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids |= {vocab[t] for t in extra_tokens if t in vocab}
    return sorted(ids)


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=len(text))
    return text[:cut].strip()


def fold_adapter(model):
    """For inference: a PEFT model whose method can merge (instructflow.training.methods) with
    its adapter merged into the base weights, so each linear layer is one matmul instead of
    three (generation 1.3x faster on CPU, same greedy outputs in bench/eval_generation.py).
    Changes `model` in place: use it last. Anything else comes back as it is, a quantized base
    too: folding into 4-bit weights would round the adapter away."""
    from instructflow.training import methods

    method = methods.of_adapter(model)
    if method is None or not method.mergeable:
        return model
    quantized = any(
        "4bit" in type(m).__name__ or "8bit" in type(m).__name__ for m in model.modules()
    )
    if quantized or getattr(model.config, "quantization_config", None):
        return model
    return model.merge_and_unload()


def _pick(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None):
    if temperature <= 0:
        return logits.argmax(-1)
    from transformers import TopPLogitsWarper

    scores = logits.float() / temperature
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.multinomial(scores.softmax(-1), 1, generator=gen).squeeze(1)


def _new_cache(model, kv: list | None = None, rows: int = 1):
    """An empty KV cache, or one holding `kv` (per-layer (keys, values)) for `rows` rows."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for layer_idx, (keys, values) in enumerate(kv or []):
        cache.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1), layer_idx)
    return cache


def virtual_prefix(model) -> tuple[Any, tuple | None]:
    """(model to decode with, prefix) for a prompt- or prefix-tuned PeftModel: its base model
    and the KV of its virtual tokens as a prefix of 0 prompt tokens (see `_prefill`), which
    every row then starts from, exactly as PEFT's forward puts them in front of the input.
    Any other model comes back as it is, with None."""
    config = getattr(model, "active_peft_config", None)
    if config is None or not getattr(config, "is_prompt_learning", False):
        return model, None
    base = model.get_base_model()
    if getattr(model, "_adapters_disabled", False):  # inside `with model.disable_adapter()`
        return base, None
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        prompt = model.get_prompt(batch_size=1)
        if isinstance(prompt, torch.Tensor):  # prompt tuning: virtual input embeddings
            cache = _new_cache(base)
            base(inputs_embeds=prompt.to(base.dtype), cache=cache, use_cache=True, logits_to_keep=1)
        else:  # prefix tuning: the keys and values themselves
            cache = prompt
    model.train(was_training)
    return base, (0, [(layer.keys, layer.values) for layer in cache.layers])


def _prefill(model, prompts: list[list[int]], pad_id: int, prefix: tuple | None = None):
    """Left-padded prefill of new rows: (cache, attention mask, next positions, last logits).

    `prefix` = (tokens, per-layer (keys, values)) of what every row starts with: the first
    `tokens` prompt tokens (a shared header), after any virtual tokens (whose KV it also
    holds); its KV is copied in and only the rest of each row is computed."""
    skip = prefix[0] if prefix else 0
    kv_len = prefix[1][0][0].shape[2] if prefix else 0
    rests = [p[skip:] for p in prompts]
    n, width = len(rests), max(len(p) for p in rests)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros((n, kv_len + width), dtype=torch.long)
    attn[:, :kv_len] = 1
    for i, p in enumerate(rests):
        input_ids[i, width - len(p) :] = torch.tensor(p)
        attn[i, kv_len + width - len(p) :] = 1
    input_ids, attn = input_ids.to(model.device), attn.to(model.device)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)[:, kv_len:]
    cache = _new_cache(model, prefix[1] if prefix else None, rows=n)
    out = model(
        input_ids=input_ids,
        attention_mask=attn,
        position_ids=pos,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return cache, attn, pos[:, -1:] + 1, out.logits[:, -1, :]


def _prefix_kv(model, tokens: list[int], virtual: tuple | None = None) -> tuple | None:
    """(length, per-layer (keys, values)) of one shared prompt prefix (after the `virtual`
    prefix's tokens, if any), or None when the model's cache is not a plain growing KV cache
    (sliding windows, hybrid layers)."""
    cache = _new_cache(model, virtual[1] if virtual else None)
    start = virtual[1][0][0].shape[2] if virtual else 0
    ids = torch.tensor([tokens], device=model.device)
    pos = torch.arange(start, start + len(tokens), device=model.device)[None]
    attn = torch.ones((1, start + len(tokens)), dtype=torch.long, device=model.device)
    model(
        input_ids=ids,
        attention_mask=attn,
        position_ids=pos,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    if not _can_splice(cache):
        return None
    return len(tokens), [(layer.keys, layer.values) for layer in cache.layers]


def shared_prefixes(encoded: list[list[int]], min_tokens: int = 16) -> list[int]:
    """Per prompt, the length of the token prefix it shares with its group (0 = none).

    Prompts rendered from one template share a header (a system prompt, Alpaca's preamble);
    its KV is computed once per group instead of once per row. Groups are runs of the
    lexicographically sorted prompts whose neighbours share >= `min_tokens` tokens; a group's
    prefix is the common prefix of all its members, less one token so that every row still
    has a token to compute its next-token logits from."""
    order = sorted(range(len(encoded)), key=lambda i: encoded[i])
    lengths = [0] * len(encoded)
    run: list[int] = []
    common = 0

    def close() -> None:
        if len(run) > 1:
            cut = min(common, *(len(encoded[i]) - 1 for i in run))
            for i in run:
                lengths[i] = cut if cut >= min_tokens else 0

    for i in order:
        if run:
            a, b = encoded[run[-1]], encoded[i]
            same = next(
                (k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)),
            )
            if same >= min_tokens:
                run.append(i)
                common = min(common, same)
                continue
            close()
        run, common = [i], len(encoded[i])
    close()
    return lengths


def _can_splice(cache) -> bool:
    """Rows can join a running batch only when every layer is a plain growing KV cache."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None]))


def _lpad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _join(parts: list[tuple]) -> dict[str, Any]:
    """One running batch from prefilled parts (cache, attn, next_pos, logits), left-padding the
    narrower ones; one concatenation per layer however many parts join."""
    caches, attns, next_pos, logits = zip(*parts, strict=True)
    width = max(a.shape[1] for a in attns)
    cache = caches[0]
    for i, layer in enumerate(cache.layers):
        group = [c.layers[i] for c in caches]
        layer.keys = torch.cat([_lpad(x.keys, width, 2) for x in group])
        layer.values = torch.cat([_lpad(x.values, width, 2) for x in group])
    return {
        "cache": cache,
        "attn": torch.cat([_lpad(a, width, 1) for a in attns]),
        "next_pos": torch.cat(next_pos),
        "logits": torch.cat(logits),
    }


def _trim(state: dict[str, Any]) -> None:
    """Drop leading columns no live row attends to (left by rows that finished)."""
    start = int(state["attn"].any(0).to(torch.int8).argmax())
    if start > 0:
        state["attn"] = state["attn"][:, start:]
        for layer in state["cache"].layers:
            layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]


_STATE = ("cache", "attn", "next_pos", "logits")


@torch.inference_mode()
def _decode(
    model,
    encoded: list[list[int]],
    order: list[int],
    *,
    batch_size: int,
    pad_id: int,
    stop_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    gen: torch.Generator | None,
    tail_hit: Callable[[list[list[int]]], list[bool]] | None,
    progress: Progress | None,
    prefix_keys: list[tuple[int, ...]],
    virtual: tuple | None = None,
    on_token: OnToken | None = None,
    admit: Callable[[int], list[int]] | None = None,
    on_row_done: Callable[[int, list[int]], None] | None = None,
) -> dict[int, list[int]]:
    """Continuous batching over a KV cache: finished rows leave the batch at once and queued
    prompts are prefilled into the freed slots, so every decode step runs a full batch.
    (generate() keeps finished rows as padding until the whole batch ends; transformers'
    own continuous batching ran 8x slower than this on CPU.) `admit(room)`: rows that arrived
    since (their indices, already in `encoded`/`prefix_keys`), asked each step while there is
    room; `on_row_done(i, tokens)`: row i is finished."""
    device = model.device
    stop_ids = stop_ids.to(device)
    queue, outs = list(order), {}
    prefixes: dict[tuple[int, ...], tuple | None] = {}
    state: dict[str, Any] = {}
    live: list[int] = []
    refill_at = max(1, batch_size // 4)
    splice = _can_splice(_new_cache(model))
    while True:
        if admit is not None and (room := batch_size - len(live) - len(queue)) > 0:
            queue += admit(room)
        if not (queue or live):
            break
        free = batch_size - len(live)
        if queue and (not live or (splice and free >= refill_at)):
            take, queue = queue[:free], queue[free:]
            parts = [tuple(state[k] for k in _STATE)] if live else []
            if splice:
                by_key = sorted(take, key=prefix_keys.__getitem__)
                for key, rows_of_key in itertools.groupby(by_key, key=prefix_keys.__getitem__):
                    group = list(rows_of_key)
                    if key and key not in prefixes:
                        prefixes[key] = _prefix_kv(model, list(key), virtual)
                    prefix = prefixes.get(key) or virtual
                    # Small length-sorted chunks: a wide prefill pads every row to its longest.
                    for at in range(0, len(group), PREFILL_ROWS):
                        rows = [encoded[i] for i in group[at : at + PREFILL_ROWS]]
                        parts.append(_prefill(model, rows, pad_id, prefix))
                        live += group[at : at + PREFILL_ROWS]
            else:
                parts.append(_prefill(model, [encoded[i] for i in take], pad_id, virtual))
                live += take
            state = _join(parts) if len(parts) > 1 else dict(zip(_STATE, parts[0], strict=True))
            outs.update({i: [] for i in take})
        tokens = _pick(state["logits"], temperature, top_p, gen)
        for row, t in zip(live, tokens.tolist(), strict=True):
            outs[row].append(t)
            if on_token is not None:
                on_token(row, t)
        done = torch.isin(tokens, stop_ids)
        done |= torch.tensor([len(outs[r]) >= max_new_tokens for r in live], device=device)
        if tail_hit is not None:
            done |= torch.tensor(tail_hit([outs[r] for r in live]), device=device)
        if bool(done.any()):
            if on_row_done is not None:
                for k in done.nonzero().squeeze(1).tolist():
                    on_row_done(live[k], outs[live[k]])
            keep = (~done).nonzero().squeeze(1)
            live = [live[k] for k in keep.tolist()]
            if progress is not None:
                progress(len(outs) - len(live), len(order))
            if not live:
                state = {}
                continue
            state["cache"].batch_select_indices(keep)
            for key in ("attn", "next_pos"):
                state[key] = state[key][keep]
            tokens = tokens[keep]
            if splice:
                _trim(state)
        attn = torch.cat([state["attn"], state["attn"].new_ones((len(live), 1))], dim=1)
        out = model(
            input_ids=tokens[:, None],
            attention_mask=attn,
            position_ids=state["next_pos"],
            cache=state["cache"],
            use_cache=True,
        )
        state.update(attn=attn, next_pos=state["next_pos"] + 1, logits=out.logits[:, -1, :])
    return outs


def generate(
    model,
    tokenizer,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_strings: Sequence[str] = (),
    stop_tokens: Sequence[str] = (),
    add_special_tokens: bool = True,
    max_prompt_tokens: int | None = None,
    progress: Progress | None = None,
    details: bool = False,
    share_prefix: bool = True,
    on_token: OnToken | None = None,
    admit: Callable[[int], Sequence[str]] | None = None,
    on_done: Callable[[int, Any], None] | None = None,
) -> list[str] | list[dict[str, Any]]:
    """Completions of `prompts` (prompt stripped, cut at the first stop string), input order.
    A prompt is a text, or its token ids as they are (no special tokens added, no re-encoding).

    `details=True` gives {text, prompt_tokens, completion_tokens, finish_reason} per prompt.
    `on_token(i, token_id)` hears each token of prompts[i] as it is generated (streaming).
    Serving: `admit(room)` returns up to `room` prompts that arrived meanwhile (same settings);
    they join the running batch and are numbered on after `prompts`; `on_done(i, result)`
    hears each result as soon as its row finishes. The return value then holds them all."""
    if not prompts:
        return []

    def encode(texts: Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
        if texts and not isinstance(texts[0], str):
            out = [list(ids) for ids in texts]
        else:
            out = _encode(tokenizer, texts, add_special_tokens)
        # Keep the end of an over-long prompt: the response cue is there.
        return [p[-max_prompt_tokens:] for p in out] if max_prompt_tokens else out

    encoded = encode(prompts)
    stops = [s for s in stop_strings if s]
    stop_ids = torch.tensor(eos_ids(tokenizer, [*stop_tokens, *stops]), dtype=torch.long)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tail_hit = None
    if stops:
        # Each token adds at least one character, so this many tokens cover any stop string.
        span = max(len(s) for s in stops) + 1

        def tail_hit(rows: list[list[int]]) -> list[bool]:
            tails = tokenizer.batch_decode([r[-span:] for r in rows])
            return [any(s in t for s in stops) for t in tails]

    gen = torch.Generator().manual_seed(seed) if temperature > 0 else None
    # Prompt/prefix tuning: their virtual tokens go first in every row, never dropped.
    model, virtual = virtual_prefix(model)
    was_training = model.training
    model.eval()
    shared = shared_prefixes(encoded) if share_prefix else [0] * len(encoded)
    prefix_keys = [tuple(p[:n]) for p, n in zip(encoded, shared, strict=True)]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    ends = [*stops, *stop_tokens, tokenizer.eos_token or ""]
    stop_set = set(stop_ids.tolist())

    def result(i: int, ids: list[int], text: str) -> Any:
        answer = cut_at_stop(text, ends)
        if not details:
            return answer
        stopped = ids[-1] in stop_set or any(e and e in text for e in ends)
        return {
            "text": answer,
            "prompt_tokens": len(encoded[i]),
            "completion_tokens": len(ids),
            "finish_reason": "stop" if stopped else "length",
        }

    def admit_rows(room: int) -> list[int]:
        arrived = list(admit(room))
        if not arrived:
            return []
        new = encode(arrived)
        known = {k for k in prefix_keys if k}
        for p in new:  # a header already computed is reused; no new groups mid-run
            fits = [k for k in known if len(k) < len(p) and tuple(p[: len(k)]) == k]
            prefix_keys.append(max(fits, key=len, default=()))
        encoded.extend(new)
        return list(range(len(encoded) - len(new), len(encoded)))

    done_early: dict[int, Any] = {}

    def row_done(i: int, ids: list[int]) -> None:
        done_early[i] = result(i, ids, tokenizer.decode(ids, skip_special_tokens=False))
        on_done(i, done_early[i])

    try:
        outs = _decode(
            model,
            encoded,
            order,
            batch_size=batch_size,
            pad_id=pad_id,
            stop_ids=stop_ids,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            gen=gen,
            tail_hit=tail_hit,
            progress=progress,
            prefix_keys=prefix_keys,
            virtual=virtual,
            on_token=on_token,
            admit=admit_rows if admit is not None else None,
            on_row_done=row_done if on_done is not None else None,
        )
        if on_done is not None:
            return [done_early[i] for i in range(len(encoded))]
        decoded = tokenizer.batch_decode([outs[i] for i in order], skip_special_tokens=False)
        texts: list[Any] = [""] * len(encoded)
        for i, text in zip(order, decoded, strict=True):
            texts[i] = result(i, outs[i], text)
    finally:
        model.train(was_training)
    return texts


def response_tokens(
    tokenizer, prompt: str, pieces: Sequence[tuple[str, bool]], add_special_tokens: bool
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for a prompt followed by (text, scored) pieces; -100 = not scored."""
    ids = _encode(tokenizer, [prompt], add_special_tokens)[0]
    labels = [IGNORE_INDEX] * len(ids)
    for text, scored in pieces:
        piece = _encode(tokenizer, [text], False)[0]
        ids += piece
        labels += piece if scored else [IGNORE_INDEX] * len(piece)
    return ids, labels


@torch.inference_mode()
def perplexity(
    model,
    examples: Sequence[tuple[list[int], list[int]]],
    *,
    pad_id: int,
    batch_size: int = 8,
    max_length: int | None = None,
) -> tuple[float, int]:
    """(exp of the token-weighted mean NLL over labelled tokens, number of labelled tokens)."""
    items = (
        [(ids[:max_length], lab[:max_length]) for ids, lab in examples]
        if max_length
        else list(examples)
    )
    items = sorted(items, key=lambda x: len(x[0]))
    nll, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
            attn = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, (x, y) in enumerate(chunk):
                ids[i, : len(x)], labels[i, : len(y)], attn[i, : len(x)] = (
                    torch.tensor(x),
                    torch.tensor(y),
                    1,
                )
            logits = model(input_ids=ids.to(model.device), attention_mask=attn.to(model.device))
            # Prompt tuning returns logits for its virtual tokens too: keep the input's own.
            logits = logits.logits[:, -width:-1].float()
            target = labels[:, 1:].to(logits.device)
            nll += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                target.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            ).item()
            count += int((target != IGNORE_INDEX).sum())
            del logits  # only the running sums survive a batch
    finally:
        model.train(was_training)
    return (math.exp(nll / count) if count else float("nan")), count


@torch.inference_mode()
def next_token_logprobs(
    model, tokenizer, prompts: Sequence[str], candidates: Sequence[int], batch_size: int = 16
) -> torch.Tensor:
    """[n_prompts, n_candidates] log-probabilities of the next token (left-padded batches;
    a prompt/prefix-tuned model's virtual tokens in front, as in `generate`)."""
    encoded = _encode(tokenizer, prompts, True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    cand = torch.tensor(list(candidates), dtype=torch.long)
    model, virtual = virtual_prefix(model)
    rows: list[torch.Tensor] = []
    model.eval()
    for start in range(0, len(encoded), batch_size):
        *_, logits = _prefill(model, encoded[start : start + batch_size], pad_id, virtual)
        rows.append(logits.float().log_softmax(-1)[:, cand.to(model.device)].cpu())
    return torch.cat(rows) if rows else torch.empty((0, len(cand)))
