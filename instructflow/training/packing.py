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

from instructflow.templates import IGNORE_INDEX

IGNORE = IGNORE_INDEX  # the name the packing code and its tests use


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
    """Padding-free packing: `DataCollatorWithFlattening` (with sequence bounds), counted."""
    from transformers import DataCollatorWithFlattening

    inner = DataCollatorWithFlattening(
        return_position_ids=True, separator_id=IGNORE, return_flash_attn_kwargs=True
    )
    return CountingCollator(inner, stats)


VARLEN = "instructflow_varlen"


def varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
    """Causal attention run per packed example, like flash-attn's varlen kernels.

    SDPA with the block-diagonal mask of a packed row still computes all (sum of lengths)^2
    scores (measured on CPU: half the step time at 4 examples a row); per example it is the
    sum of length^2. Without sequence bounds (generation, padded batches) it is plain SDPA.
    """
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    cu = kw.get("cu_seq_lens_q")
    if cu is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kw
        )
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    bounds = cu.tolist()
    parts = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, s:e], key[:, :, s:e], value[:, :, s:e],
            dropout_p=dropout, scale=scaling, is_causal=True,
        )
        for s, e in zip(bounds[:-1], bounds[1:], strict=True)
    ]  # fmt: skip
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def use_varlen_attention(model) -> None:
    """Switch a model to `varlen_attention` (registered once; masks as for SDPA)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, sdpa_mask)
    model.set_attn_implementation(VARLEN)


def PaddingCollator(tokenizer, stats: BatchStats | None = None) -> CountingCollator:  # noqa: N802
    """Fallback: dynamic padding to the batch's longest example (length-grouped sampler)."""
    from transformers import DataCollatorForSeq2Seq

    inner = DataCollatorForSeq2Seq(
        tokenizer, padding="longest", label_pad_token_id=IGNORE, return_tensors="pt"
    )
    return CountingCollator(inner, stats)


def packs_correctly(model, vocab_size: int, atol: float = 1e-4) -> bool:
    """Probe: does a packed batch give the same logits as each example run alone?

    Cheap (a few dozen tokens, no grad) and architecture-agnostic: it runs the model exactly
    as training will (the collator's batch), so a model that ignores the packed layout is
    caught rather than silently trained on contaminated attention.
    """
    import torch

    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    hi = max(2, min(vocab_size, 1000))
    a = torch.randint(1, hi, (7,), generator=gen).tolist()
    b = torch.randint(1, hi, (9,), generator=gen).tolist()
    batch = PackingCollator()([{"input_ids": x, "labels": x} for x in (a, b)])
    batch.pop("labels")
    batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(**batch, use_cache=False).logits.float()
            alone = model(input_ids=torch.tensor([b], device=device), use_cache=False)
    except Exception:
        return False
    finally:
        model.train(was_training)
    return bool(torch.allclose(out[0, 7:], alone.logits.float()[0], atol=atol, rtol=1e-3))
