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
from dataclasses import dataclass, field
from typing import Any

IGNORE = -100


@dataclass
class BatchStats:
    """Counters the collator fills and the metrics callback drains (same process)."""

    positions: int = 0  # every slot of the batch tensors
    tokens: int = 0  # real (non-pad) tokens
    useful: int = 0  # tokens that carry a loss
    examples: int = 0
    seen: list[str] = field(default_factory=list)  # example hashes, to check DDP sharding
    record_seen: bool = True
    paused: bool = False  # during evaluation: eval batches are not training throughput

    def add(self, positions: int, tokens: int, useful: int, features: list[dict[str, Any]]):
        if self.paused:
            return
        self.positions += positions
        self.tokens += tokens
        self.useful += useful
        self.examples += len(features)
        if self.record_seen:
            self.seen += [example_hash(f["input_ids"]) for f in features]

    def drain(self) -> dict[str, int]:
        out = {"positions": self.positions, "tokens": self.tokens, "useful": self.useful}
        self.positions = self.tokens = self.useful = 0
        return out


def example_hash(input_ids) -> str:
    ids = input_ids.tolist() if hasattr(input_ids, "tolist") else list(input_ids)
    return hashlib.sha1(",".join(map(str, ids)).encode()).hexdigest()[:16]


def _plain(features: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Only the model's inputs: the dataset's `length` column must not reach forward().
    return [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features]


class PackingCollator:
    """`DataCollatorWithFlattening` plus padding / useful-token accounting."""

    def __init__(self, stats: BatchStats | None = None):
        from transformers import DataCollatorWithFlattening

        self.inner = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE)
        self.stats = stats if stats is not None else BatchStats()

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(_plain(features))
        n = int(batch["input_ids"].numel())
        useful = int((batch["labels"][:, 1:] != IGNORE).sum())
        self.stats.add(n, n, useful, features)
        return batch


class PaddingCollator:
    """Dynamic padding to the longest example of the batch (with length-grouped sampling)."""

    def __init__(self, tokenizer, stats: BatchStats | None = None):
        from transformers import DataCollatorForSeq2Seq

        self.inner = DataCollatorForSeq2Seq(
            tokenizer, padding="longest", label_pad_token_id=IGNORE, return_tensors="pt"
        )
        self.stats = stats if stats is not None else BatchStats()

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(_plain(features))
        mask = batch["attention_mask"]
        useful = int((batch["labels"][:, 1:] != IGNORE).sum())
        self.stats.add(int(mask.numel()), int(mask.sum()), useful, features)
        return batch


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
