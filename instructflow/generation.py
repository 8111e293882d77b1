"""Batched generation, streamed perplexity and model loading for evaluation and serving.

`generate` sorts prompts by length, left-pads them into batches, runs a KV-cached decode loop
and drops each row from the batch as soon as it finishes (EOS / end-of-turn / stop string), so
the compute follows the live rows. Outputs come back in the input order, stripped of the
prompt and cut at the first stop string. `perplexity` streams batches and keeps only running
sums, never the logits of the whole set.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

Progress = Callable[[int, int], None]


class LoadError(RuntimeError):
    pass


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


def _pick(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None):
    if temperature <= 0:
        return logits.argmax(-1)
    from transformers import TopPLogitsWarper

    scores = logits.float() / temperature
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.multinomial(scores.softmax(-1), 1, generator=gen).squeeze(1)


@torch.inference_mode()
def _generate_batch(
    model,
    prompts: list[list[int]],
    *,
    pad_id: int,
    stop_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    gen: torch.Generator | None,
    tail_hit: Callable[[list[list[int]]], list[bool]] | None,
) -> list[list[int]]:
    from transformers import DynamicCache

    n, width = len(prompts), max(len(p) for p in prompts)
    device = model.device
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = torch.tensor(p)
        attn[i, width - len(p) :] = 1
    input_ids, attn = input_ids.to(device), attn.to(device)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    out = model(
        input_ids=input_ids,
        attention_mask=attn,
        position_ids=pos,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    logits, next_pos = out.logits[:, -1, :], pos[:, -1:] + 1
    stop_ids = stop_ids.to(device)
    live = torch.arange(n, device=device)
    outs: list[list[int]] = [[] for _ in range(n)]
    for step in range(max_new_tokens):
        tokens = _pick(logits, temperature, top_p, gen)
        rows = live.tolist()
        for row, t in zip(rows, tokens.tolist(), strict=True):
            outs[row].append(t)
        done = torch.isin(tokens, stop_ids)
        if tail_hit is not None:
            done |= torch.tensor(tail_hit([outs[r] for r in rows]), device=device)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        if bool(done.any()):
            # Finished rows leave the batch (generate() would keep computing them as padding).
            keep = (~done).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            live, tokens, attn, next_pos = live[keep], tokens[keep], attn[keep], next_pos[keep]
        attn = torch.cat([attn, attn.new_ones((attn.shape[0], 1))], dim=1)
        out = model(
            input_ids=tokens[:, None],
            attention_mask=attn,
            position_ids=next_pos,
            cache=cache,
            use_cache=True,
        )
        logits, next_pos = out.logits[:, -1, :], next_pos + 1
    return outs


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
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
) -> list[str] | list[dict[str, Any]]:
    """Completions of `prompts` (prompt stripped, cut at the first stop string), input order.

    `details=True` gives {text, prompt_tokens, completion_tokens, finish_reason} per prompt."""
    if not prompts:
        return []
    encoded = _encode(tokenizer, prompts, add_special_tokens)
    if max_prompt_tokens:
        # Keep the end of an over-long prompt: the response cue is there.
        encoded = [p[-max_prompt_tokens:] for p in encoded]
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
    was_training = model.training
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    texts: list[Any] = [""] * len(encoded)
    ends = [*stops, *stop_tokens, tokenizer.eos_token or ""]
    stop_set = set(stop_ids.tolist())
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            outs = _generate_batch(
                model,
                [encoded[i] for i in idx],
                pad_id=pad_id,
                stop_ids=stop_ids,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                gen=gen,
                tail_hit=tail_hit,
            )
            decoded = tokenizer.batch_decode(outs, skip_special_tokens=False)
            for i, ids, text in zip(idx, outs, decoded, strict=True):
                texts[i] = cut_at_stop(text, ends)
                if details:
                    stopped = ids[-1] in stop_set or any(e and e in text for e in ends)
                    texts[i] = {
                        "text": texts[i],
                        "prompt_tokens": len(encoded[i]),
                        "completion_tokens": len(ids),
                        "finish_reason": "stop" if stopped else "length",
                    }
            if progress is not None:
                progress(min(start + batch_size, len(order)), len(order))
    finally:
        model.train(was_training)
    return texts


def response_tokens(
    tokenizer, prompt: str, pieces: Sequence[tuple[str, bool]], add_special_tokens: bool
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for a prompt followed by (text, scored) pieces; -100 = not scored."""
    ids = _encode(tokenizer, [prompt], add_special_tokens)[0]
    labels = [-100] * len(ids)
    for text, scored in pieces:
        piece = _encode(tokenizer, [text], False)[0]
        ids += piece
        labels += piece if scored else [-100] * len(piece)
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
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            attn = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, (x, y) in enumerate(chunk):
                ids[i, : len(x)], labels[i, : len(y)], attn[i, : len(x)] = (
                    torch.tensor(x),
                    torch.tensor(y),
                    1,
                )
            logits = model(input_ids=ids.to(model.device), attention_mask=attn.to(model.device))
            logits = logits.logits[:, :-1].float()
            target = labels[:, 1:].to(logits.device)
            nll += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                target.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            ).item()
            count += int((target != -100).sum())
            del logits  # only the running sums survive a batch
    finally:
        model.train(was_training)
    return (math.exp(nll / count) if count else float("nan")), count


@torch.inference_mode()
def next_token_logprobs(
    model, tokenizer, prompts: Sequence[str], candidates: Sequence[int], batch_size: int = 16
) -> torch.Tensor:
    """[n_prompts, n_candidates] log-probabilities of the next token (left-padded batches)."""
    encoded = _encode(tokenizer, prompts, True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    cand = torch.tensor(list(candidates), dtype=torch.long)
    rows: list[torch.Tensor] = []
    model.eval()
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, width - len(p) :], attn[i, width - len(p) :] = torch.tensor(p), 1
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        out = model(
            input_ids=ids.to(model.device),
            attention_mask=attn.to(model.device),
            position_ids=pos.to(model.device),
            logits_to_keep=1,
        )
        rows.append(out.logits[:, -1, :].float().log_softmax(-1)[:, cand.to(model.device)].cpu())
    return torch.cat(rows) if rows else torch.empty((0, len(cand)))


# -- loading a model for serving / judging ------------------------------------------------
def load_model(spec: str) -> tuple[Any, Any, str]:
    """(model, tokenizer, template) from builtin:tiny, a models:/ URI, a train artifact dir,
    a PEFT adapter dir or a plain HF model dir / hub id."""
    from tasks.base_model import BUILTIN_TINY

    if spec == BUILTIN_TINY:
        model, tok = _builtin()
        return model, tok, "chat_template"
    if spec.startswith("models:/"):
        try:
            from instructflow.registry import load_for_inference
        except ImportError:
            raise LoadError(f"{spec}: model registry support is not available") from None
        return load_for_inference(spec)
    path = Path(spec)
    if path.is_dir() and (path / "train.json").is_file():
        return _train_artifact(path)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return _adapter_dir(path)
    return _plain(spec)


def _builtin():
    from instructflow.config import ModelConfig
    from tasks.base_model import (
        load_base_model,
        load_tokenizer,
        prepare_base_model,
        prepare_tokenizer,
    )

    tok_ref = prepare_tokenizer(ModelConfig())
    return load_base_model(prepare_base_model(ModelConfig(), tok_ref)), load_tokenizer(tok_ref)


def _plain(spec: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(spec)
        model = AutoModelForCausalLM.from_pretrained(spec, use_safetensors=True)
    except Exception as exc:
        raise LoadError(f"{spec}: could not load a model ({type(exc).__name__})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok, "chat_template" if tok.chat_template else "alpaca"


def _base_for(info: dict[str, Any]):
    """The base model a train artifact was trained on (workspace artifact, or rebuilt)."""
    from instructflow import workspace
    from instructflow.artifacts import ArtifactRef
    from tasks.base_model import BUILTIN_TINY, load_base_model

    for model_json in sorted((workspace.artifacts_dir() / "base_model").glob("*/model.json")):
        if json.loads(model_json.read_text()) == info:
            d = model_json.parent
            return load_base_model(ArtifactRef(stage="base_model", path=str(d), digest=d.name))
    if info.get("name_or_path") == BUILTIN_TINY:
        return _builtin()[0]  # deterministic: rebuilding gives the same weights
    return _plain(info["name_or_path"])[0]


def _train_artifact(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = json.loads((path / "train.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    template = info.get("template", "alpaca")
    if (path / "merged").is_dir():
        return AutoModelForCausalLM.from_pretrained(str(path / "merged")), tok, template
    if (path / "model").is_dir():
        return AutoModelForCausalLM.from_pretrained(str(path / "model")), tok, template
    from peft import PeftModel

    base = _base_for(info["base_model"])
    return PeftModel.from_pretrained(base, str(path / "adapter")), tok, template


def _adapter_dir(path: Path):
    from peft import PeftConfig, PeftModel

    base_id = PeftConfig.from_pretrained(str(path)).base_model_name_or_path
    base, tok, template = load_model(base_id) if base_id else (None, None, "")
    if base is None:
        raise LoadError(f"{path}: adapter_config.json names no base model")
    if (path / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path))
    return PeftModel.from_pretrained(base, str(path)), tok, template
