"""The distillation loss against a hand-written reference, and the collators that line the
teacher's logits up with the positions the loss scores (padded and packed batches)."""

from __future__ import annotations

import math

import pytest
import torch

from instructflow.training import packing
from instructflow.training.distill import (
    TEACHER_IDS,
    TEACHER_LOGITS,
    TeacherCollator,
    distill_loss,
    scored_positions,
    teacher_top_k,
)

VOCAB = 11


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 6, VOCAB, generator=g)
    labels = torch.tensor(
        [
            [-100, -100, 3, 4, 5, -100],  # prompt, then 3 response tokens, then padding
            [-100, 7, 8, -100, -100, -100],
        ]
    )
    n = int((labels[:, 1:] != -100).sum())
    teacher = torch.randn(n, VOCAB, generator=g) * 2
    return logits, labels, teacher


def reference(logits, labels, teacher, k, alpha, t):
    """Loops over the scored positions, written from the formula: teacher renormalised over
    its top k, student over the whole vocabulary, both at temperature t."""
    kls, ces, i = [], [], 0
    for b in range(labels.shape[0]):
        for pos in range(labels.shape[1] - 1):
            target = int(labels[b, pos + 1])
            if target == -100:
                continue
            s = [float(x) for x in logits[b, pos]]
            top = sorted(range(VOCAB), key=lambda j: -float(teacher[i, j]))[:k]
            z_t = [float(teacher[i, j]) / t for j in top]
            p = [math.exp(z - max(z_t)) for z in z_t]
            p = [x / sum(p) for x in p]
            z_s = [x / t for x in s]
            log_norm = max(z_s) + math.log(sum(math.exp(z - max(z_s)) for z in z_s))
            kls.append(
                sum(pj * (math.log(pj) - (z_s[j] - log_norm)) for pj, j in zip(p, top, strict=True))
            )
            log_norm1 = max(s) + math.log(sum(math.exp(z - max(s)) for z in s))
            ces.append(-(s[target] - log_norm1))
            i += 1
    return alpha * t * t * sum(kls) / len(kls) + (1 - alpha) * sum(ces) / len(ces)


def _top(teacher, k):
    top = teacher.topk(k, dim=-1)
    return top.indices, top.values


@pytest.mark.parametrize("k", [VOCAB, 4])
@pytest.mark.parametrize(("alpha", "t"), [(0.7, 2.0), (1.0, 1.0), (0.3, 4.0), (0.0, 2.0)])
def test_loss_equals_the_hand_written_reference(k, alpha, t):
    logits, labels, teacher = _batch()
    ids, values = _top(teacher, k)
    got = distill_loss(logits, labels, ids, values, alpha, t)
    assert float(got) == pytest.approx(reference(logits, labels, teacher, k, alpha, t), abs=1e-5)


def test_temperature_squared_scales_the_kl_term_and_alpha_zero_is_plain_ce():
    logits, labels, teacher = _batch(1)
    ids, values = _top(teacher, VOCAB)
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].flatten()
    )
    assert float(distill_loss(logits, labels, ids, values, 0.0, 3.0)) == pytest.approx(float(ce))
    for t in (1.0, 2.0, 5.0):
        kl_only = reference(logits, labels, teacher, VOCAB, 1.0, t) / (t * t)
        got = float(distill_loss(logits, labels, ids, values, 1.0, t))
        assert got == pytest.approx(t * t * kl_only, abs=1e-5)
    # A student equal to the teacher (full vocabulary) has KL 0 at any temperature.
    mask = labels[:, 1:] != -100
    same = logits.clone()
    same[:, :-1][mask] = teacher
    assert float(distill_loss(same, labels, ids, values, 1.0, 2.0)) == pytest.approx(0, abs=1e-6)


def test_only_scored_positions_count_and_a_misaligned_teacher_is_refused():
    logits, labels, teacher = _batch(2)
    ids, values = _top(teacher, 5)
    before = float(distill_loss(logits, labels, ids, values, 0.7, 2.0))
    changed = logits.clone()
    changed[0, 0, 3] += 100  # predicts a prompt token: not scored
    changed[1, 3:, 0] -= 50  # padding
    changed[:, -1, 1] += 7  # the last position predicts nothing
    assert float(distill_loss(changed, labels, ids, values, 0.7, 2.0)) == pytest.approx(before)
    changed[0, 2, 4] += 1  # predicts the response token 4: scored
    assert float(distill_loss(changed, labels, ids, values, 0.7, 2.0)) != pytest.approx(before)
    with pytest.raises(ValueError, match="teacher logits for 4 positions, batch scores 5"):
        distill_loss(logits, labels, ids[:4], values[:4], 0.7, 2.0)


def test_the_trainer_divisor_is_the_accumulated_token_count():
    logits, labels, teacher = _batch(3)
    ids, values = _top(teacher, VOCAB)
    mean = float(distill_loss(logits, labels, ids, values, 0.7, 2.0))
    # Over two accumulated micro-batches of 5 scored tokens each, this one's share is half.
    summed = float(distill_loss(logits, labels, ids, values, 0.7, 2.0, torch.tensor(10)))
    assert summed == pytest.approx(mean / 2)


def _features(k: int = 3):
    """Examples whose teacher ids at each scored position are (target token, example, pos):
    after collation, column 0 must equal the batch's own scored labels in loss order."""
    rows = [
        ([5, 6, 7, 8, 9], [-100, -100, 7, 8, 9]),
        ([5, 6, 10], [-100, -100, 10]),
        ([5, 11, 12, 13], [-100, 11, 12, 13]),
    ]
    out = []
    for e, (ids, labels) in enumerate(rows):
        pos = scored_positions(labels)
        teacher_ids = [v for t in pos for v in (labels[t + 1], e, t)][: len(pos) * k]
        out.append(
            {
                "input_ids": ids,
                "labels": labels,
                "length": len(ids),
                TEACHER_IDS: teacher_ids,
                TEACHER_LOGITS: [float(x) for x in teacher_ids],
            }
        )
    return out


@pytest.mark.parametrize("packed", [True, False])
def test_teacher_columns_line_up_with_scored_positions(packed):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    if packed:
        inner = packing.PackingCollator()
    else:
        vocab = {f"t{i}": i for i in range(20)}
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, "t0")))
        tok.pad_token = "t0"
        inner = packing.PaddingCollator(tok)
    batch = TeacherCollator(inner, 3)(_features())
    shifted = batch["labels"][:, 1:]
    scored = shifted[shifted != -100]
    assert batch[TEACHER_IDS].shape == (len(scored), 3)
    assert batch[TEACHER_IDS][:, 0].tolist() == scored.tolist()
    assert batch[TEACHER_IDS][:, 1].tolist() == [0, 0, 0, 1, 2, 2, 2]


def test_teacher_top_k_reports_the_probability_mass_it_keeps():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    ids = [3, 5, 7, 9, 11]
    labels = [-100, -100, 7, 9, 11]  # scored: the positions predicting 7, 9, 11
    with torch.no_grad():
        full = model(input_ids=torch.tensor([ids])).logits[0].float()
    scored = full[[1, 2, 3]]
    probs = scored.softmax(-1)

    ((top_ids, top_logits, kept),) = teacher_top_k(model, [(ids, labels)], k=4, pad_id=0)
    expected = probs.topk(4, dim=-1)
    assert top_ids == expected.indices.flatten().tolist()
    assert torch.allclose(torch.tensor(top_logits), scored.topk(4, -1).values.flatten())
    assert kept == pytest.approx(expected.values.sum(-1).tolist(), abs=1e-6)
    assert all(0 < share < 1 for share in kept)
    ((_, _, everything),) = teacher_top_k(model, [(ids, labels)], k=32, pad_id=0)
    assert everything == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)
