"""Batches without cross-contamination: padding-free packing, or length-grouped padding.

Packing uses transformers' `DataCollatorWithFlattening`: the examples of a step become one
row, `position_ids` restart at 0 per example, and the first label of every example is masked
so no token is predicted from the previous example. Transformers' masking detects the packed
layout from the restarting `position_ids` (only when no attention mask and no KV cache are
given, hence `use_cache=False`) and builds a block-diagonal causal mask. `packs_correctly`
checks that on the actual model, so an architecture that ignores it falls back to padding.

The examples of one step share a row, so attention costs ~(sum of lengths)^2 per row: the
number of examples per step (`train.per_device_batch_size`) is the token budget knob.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

IGNORE = -100


@dataclass
class BatchStats:
    """Per-batch counts the collator records and the metrics callback consumes (same process).

    The data loader collates ahead of the step that uses a batch (accelerate prefetches one),
    so counts queue up and each finished step pops the batches it used: figures per step are
    exact, not shifted by the prefetch.
    """

    pending: deque = field(default_factory=deque)  # (positions, tokens, useful) per batch
    seen: list[str] = field(default_factory=list)  # example hashes, to check DDP sharding
    record_seen: bool = True
    paused: bool = False  # during evaluation: eval batches are not training throughput
    excluded_s: float = 0.0  # evaluation seconds since the last log, kept out of tokens/s

    def add(self, positions: int, tokens: int, useful: int, features: list[dict[str, Any]]):
        if self.paused:
            return
        self.pending.append((positions, tokens, useful))
        if self.record_seen and features and "input_ids" in features[0]:
            self.seen += [example_hash(f["input_ids"]) for f in features]

    def pop(self, batches: int = 1) -> dict[str, int]:
        """Totals of the oldest `batches` collated batches (all queued ones if fewer)."""
        out = {"positions": 0, "tokens": 0, "useful": 0}
        for _ in range(min(batches, len(self.pending))):
            positions, tokens, useful = self.pending.popleft()
            out["positions"] += positions
            out["tokens"] += tokens
            out["useful"] += useful
        return out

    def drain(self) -> dict[str, int]:
        return self.pop(len(self.pending))


def example_hash(input_ids) -> str:
    ids = input_ids.tolist() if hasattr(input_ids, "tolist") else list(input_ids)
    return hashlib.sha1(",".join(map(str, ids)).encode()).hexdigest()[:16]


class CountingCollator:
    """Wraps any causal-LM collator and records slots, real tokens and loss-bearing tokens.

    Loss-bearing = labels[:, 1:] != -100 (the model shifts labels by one). Real tokens come
    from the attention mask when there is one; padding-free batches have no padding.
    """

    def __init__(self, inner, stats: BatchStats | None = None, plain: bool = True):
        self.inner = inner
        self.stats = stats if stats is not None else BatchStats()
        self.plain = plain

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        # Only the model's inputs: the dataset's `length` column must not reach forward().
        rows = [{k: f[k] for k in ("input_ids", "labels")} for f in features]
        batch = self.inner(rows if self.plain else features)
        n = int(batch["input_ids"].numel())
        mask = batch.get("attention_mask")
        tokens = int(mask.sum()) if mask is not None else n
        useful = int((batch["labels"][:, 1:] != IGNORE).sum())
        self.stats.add(n, tokens, useful, features)
        return batch


def PackingCollator(stats: BatchStats | None = None) -> CountingCollator:  # noqa: N802
    """Padding-free packing: `DataCollatorWithFlattening`, counted."""
    from transformers import DataCollatorWithFlattening

    inner = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE)
    return CountingCollator(inner, stats)


def PaddingCollator(tokenizer, stats: BatchStats | None = None) -> CountingCollator:  # noqa: N802
    """Fallback: dynamic padding to the batch's longest example (length-grouped sampler)."""
    from transformers import DataCollatorForSeq2Seq

    inner = DataCollatorForSeq2Seq(
        tokenizer, padding="longest", label_pad_token_id=IGNORE, return_tensors="pt"
    )
    return CountingCollator(inner, stats)


def packs_correctly(model, vocab_size: int, atol: float = 1e-4) -> bool:
    """Probe: do two packed sequences give the same logits as each run alone?

    Cheap (a few dozen tokens, no grad) and architecture-agnostic, so any model that ignores
    packed position_ids is caught rather than silently trained on contaminated attention.
    """
    import torch

    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    hi = max(2, min(vocab_size, 1000))
    a = torch.randint(1, hi, (7,), generator=gen)
    b = torch.randint(1, hi, (9,), generator=gen)
    packed = torch.cat([a, b])[None].to(device)
    pos = torch.cat([torch.arange(7), torch.arange(9)])[None].to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(input_ids=packed, position_ids=pos, use_cache=False).logits.float()
            alone = model(input_ids=b[None].to(device), use_cache=False).logits.float()
    except Exception:
        return False
    finally:
        model.train(was_training)
    return bool(torch.allclose(out[0, 7:], alone[0], atol=atol, rtol=1e-3))
