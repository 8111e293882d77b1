"""A model on the test split: perplexity over the tokenize stage's own ids and labels, and its
answers to the test prompts. The evaluate and distill_report stages both score with it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from instructflow import templates
from instructflow.artifacts import ArtifactRef
from instructflow.config import EvaluateConfig, TokenizeConfig
from instructflow.rows import read_jsonl


class EvaluateError(RuntimeError):
    pass


def load_rows(splits: ArtifactRef, limit: int | None) -> list[dict[str, Any]]:
    path = splits.file("test.jsonl")
    if not path.is_file():
        raise EvaluateError(f"{path}: split artifact has no test.jsonl")
    rows = read_jsonl(path)
    if not rows:
        raise EvaluateError(f"{path}: the test split is empty (raise split.test)")
    return rows[:limit] if limit else rows


def scored_examples(tokenized: ArtifactRef, limit: int | None) -> list[tuple[list, list]]:
    """(input_ids, labels) of the tokenize stage's test split, first `limit` rows: perplexity
    scores exactly the ids and labels training uses, never a re-tokenisation (which differs
    for SentencePiece-style tokenizers, where '▁The' is not the 'The' that training saw)."""
    import datasets

    path = tokenized.file("test")
    if not path.is_dir():
        raise EvaluateError(f"{tokenized.path}: tokenized artifact has no test split")
    ds = datasets.load_from_disk(str(path))
    part = ds[: min(limit, len(ds))] if limit else ds[:]
    return list(zip(part["input_ids"], part["labels"], strict=True))


def score_model(
    m,
    tok,
    scored: list[tuple[list, list]],
    prompts: list[str],
    template: str,
    tokenize_cfg: TokenizeConfig,
    cfg: EvaluateConfig,
    tick: Callable[[str], Callable[[int, int], None]],
    label: str,
) -> tuple[float, int, list[str], float]:
    """(perplexity, scored tokens, greedy/sampled outputs, generated tokens/s) of one model
    on the test split (the distill report scores its students with it too)."""
    from instructflow import generation

    ppl, n_tok = generation.perplexity(
        m,
        scored,
        pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
        batch_size=max(1, cfg.batch_size // 4),
        max_length=tokenize_cfg.max_length,
    )
    tick(f"perplexity {label}")(len(prompts), len(prompts))
    started = time.perf_counter()
    outs = generation.generate(
        m,
        tok,
        prompts,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        seed=cfg.seed,
        stop_strings=[*templates.stop_strings(template, tok), *cfg.stop_strings],
        stop_tokens=[templates.end_of_turn_token(template, tok)],
        add_special_tokens=templates.add_special_tokens(template),
        max_prompt_tokens=tokenize_cfg.max_length,
        progress=tick(f"generating {label}"),
        details=True,
    )
    seconds = time.perf_counter() - started
    made = sum(o["completion_tokens"] for o in outs)
    return ppl, n_tok, [o["text"] for o in outs], made / seconds if seconds > 0 else float("nan")
