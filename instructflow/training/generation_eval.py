"""Generation metrics while training: at every evaluation, greedy answers to a fixed sample
of validation rows, scored with exact match and ROUGE-L (instructflow.metrics, as the
evaluate stage scores them), so a checkpoint can be chosen by what it answers, not only by
its validation loss (`train.best_by`).

The sample is the first `train.eval_generation` rows of the tokenized validation split:
each row's prompt is its token ids before the final trained run (the last assistant turn)
and its reference is that run decoded, cut at the template's stop strings. Decoding is the
evaluate stage's (instructflow.generation.generate, batched, the same stop rules), on the
model being trained: a packed model's per-example attention is switched to SDPA and the KV
cache on for the duration.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from instructflow import templates
from instructflow.templates import IGNORE_INDEX

# Names the Trainer logs them under (its metric_for_best_model adds the eval_ prefix).
METRICS = ("exact_match", "rougeL")


def prompts_and_references(
    dataset, tokenizer, n: int, stops: Sequence[str]
) -> tuple[list[list[int]], list[str]]:
    """(prompt ids, reference texts) of the first `n` rows of a tokenized split."""
    from instructflow.generation import cut_at_stop

    prompts, refs = [], []
    for row in dataset.select(range(min(n, len(dataset)))):
        ids, labels = list(row["input_ids"]), list(row["labels"])
        end = len(labels)
        while end > 0 and labels[end - 1] == IGNORE_INDEX:
            end -= 1
        start = end
        while start > 0 and labels[start - 1] != IGNORE_INDEX:
            start -= 1
        if start == end:  # nothing trained in this row
            continue
        prompts.append(ids[:start])
        refs.append(cut_at_stop(tokenizer.decode(ids[start:end]), stops).strip())
    return prompts, refs


class GenerationEval:
    """Callable by the Trainer's evaluate(): {eval_exact_match, eval_rougeL} of `model`."""

    def __init__(self, dataset, tokenizer, template: str, n: int, max_new_tokens: int):
        self.tokenizer = tokenizer
        self.stops = templates.stop_strings(template, tokenizer)
        self.stop_tokens = [templates.end_of_turn_token(template, tokenizer)]
        self.prompts, self.refs = prompts_and_references(dataset, tokenizer, n, self.stops)
        self.max_new_tokens = max_new_tokens

    def __call__(self, model) -> dict[str, float]:
        from instructflow import generation
        from instructflow.metrics import text_metrics
        from instructflow.training import packing

        if not self.prompts:
            return {}
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        attention, use_cache = inner.config._attn_implementation, inner.config.use_cache
        if attention == packing.VARLEN:
            inner.set_attn_implementation("sdpa")
        inner.config.use_cache = True
        began = time.perf_counter()
        try:
            answers = generation.generate(
                model,
                self.tokenizer,
                self.prompts,
                max_new_tokens=self.max_new_tokens,
                stop_strings=self.stops,
                stop_tokens=self.stop_tokens,
            )
        finally:
            inner.config.use_cache = use_cache
            if attention == packing.VARLEN:
                inner.set_attn_implementation(attention)
        scores, _ = text_metrics(answers, self.refs)
        out = {f"eval_{name}": scores[name] for name in METRICS}
        # What this costs each evaluation (decoding + scoring), a step metric beside them.
        return {**out, "eval_generation_s": round(time.perf_counter() - began, 3)}


def best_metric(best_by: str, early_stopping: bool) -> tuple[str | None, bool | None]:
    """(metric_for_best_model, greater_is_better) for `train.best_by`: "last" keeps the final
    weights unless early stopping is on, which watches the validation loss."""
    if best_by == "last":
        return ("eval_loss", False) if early_stopping else (None, None)
    if best_by == "eval_loss":
        return "eval_loss", False
    return f"eval_{best_by}", True


def summary(series: dict[str, Any], metric: str | None, kept_step: int | None) -> dict[str, Any]:
    """Figures for train.json: the best value of each generation metric and the kept step."""
    out: dict[str, Any] = {}
    for name in METRICS:
        values = series.get(f"eval_{name}")
        if values:
            step, best = max(values, key=lambda sv: sv[1])
            out[f"best_eval_{name}"], out[f"best_eval_{name}_step"] = best, step
    if metric and kept_step is not None:
        out["kept_step"] = kept_step
    return out
