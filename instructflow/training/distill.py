"""Knowledge distillation pieces the train machinery plugs in: the teacher's top-k logits per
response position (computed once, stored beside the tokenized data), the collator that
carries them into a batch, and the loss

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(labels)

on exactly the positions training scores (labels[t + 1] != -100: the model shifts labels by
one), averaged per scored token. The teacher distribution is its top-k logits renormalised
(exact when k covers the vocabulary); the student's log-probabilities are over the whole
vocabulary, taken at the teacher's k ids. The T^2 factor keeps the KL term's gradients on the
scale of the CE term's as T changes (Hinton et al., 2015).

Why by hand: TRL's GKDTrainer computes the teacher online in every step (and a generalised
JSD); here the teacher is run once and cached, so another alpha or T re-trains the student
only. The loss plugs into transformers' Trainer through `compute_loss_func`, so gradient
accumulation and DDP token averaging stay the Trainer's.
"""

from __future__ import annotations

from typing import Any

IGNORE = -100
TEACHER_IDS = "teacher_ids"
TEACHER_LOGITS = "teacher_logits"


class DistillError(RuntimeError):
    """A distillation that cannot go on; the message is one line."""


def require_same_vocabulary(tok, data_tok, what: str) -> None:
    """Token ids are compared one to one between teacher and student: same vocabulary only."""
    if tok.get_vocab() != data_tok.get_vocab():
        raise DistillError(
            f"{what}: its tokenizer's vocabulary differs from the data's ({len(tok)} vs "
            f"{len(data_tok)} tokens); teacher, student and data must share one tokenizer"
        )


def scored_positions(labels) -> list[int]:
    """Positions t of one example whose next label is scored (labels[t + 1] != -100)."""
    return [t for t in range(len(labels) - 1) if labels[t + 1] != IGNORE]


def distill_loss(logits, labels, teacher_ids, teacher_logits, alpha, temperature, n_items=None):
    """The distillation loss of a batch (see the module docstring).

    logits [B, L, V] (the student's); labels [B, L]; teacher_ids / teacher_logits [N, k] for
    the N scored positions, in row-major order of the batch. `n_items`: the Trainer's count of
    scored tokens over the whole accumulated batch (the divisor), else this batch's N."""
    import torch
    import torch.nn.functional as F

    shifted = labels[:, 1:]
    mask = shifted != IGNORE
    student = logits[:, :-1][mask].float()  # [N, V]
    targets = shifted[mask]
    n = student.shape[0]
    divisor = n_items if n_items is not None else max(n, 1)
    if isinstance(divisor, torch.Tensor):
        divisor = divisor.to(student.device)
    ce = F.cross_entropy(student, targets, reduction="sum") / divisor
    if alpha == 0 or teacher_ids is None:
        return ce
    if teacher_ids.shape[0] != n:
        raise ValueError(f"teacher logits for {teacher_ids.shape[0]} positions, batch scores {n}")
    t = temperature
    teacher_logp = F.log_softmax(teacher_logits.float() / t, dim=-1)  # over its top k
    student_logp = F.log_softmax(student / t, dim=-1).gather(1, teacher_ids.long())
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum() / divisor
    return alpha * t * t * kl + (1 - alpha) * ce


class TeacherCollator:
    """Wraps the training collator: the teacher columns leave the features before it runs and
    come back as [N, k] tensors in the batch's row-major order of scored positions (the order
    in which `distill_loss` selects the student's logits, padded or packed alike)."""

    def __init__(self, inner, top_k: int):
        self.inner = inner
        self.top_k = top_k
        self.stats = inner.stats  # the trainer pauses/reads the counting collator's stats

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        ids = [f.get(TEACHER_IDS) for f in features]
        vals = [f.get(TEACHER_LOGITS) for f in features]
        teacher_cols = (TEACHER_IDS, TEACHER_LOGITS)
        plain = [{k: v for k, v in f.items() if k not in teacher_cols} for f in features]
        batch = self.inner(plain)
        if any(x is None for x in ids):
            return batch
        k = self.top_k
        batch[TEACHER_IDS] = torch.tensor([i for row in ids for i in row]).view(-1, k)
        batch[TEACHER_LOGITS] = torch.tensor([v for row in vals for v in row]).view(-1, k)
        return batch


def trainer_class(base_class, alpha: float, temperature: float):
    """`base_class` (a transformers Trainer) whose training loss is `distill_loss`. Evaluation
    reports the plain CE (alpha 0), so eval_loss compares students trained with any alpha."""

    class DistillTrainer(base_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, compute_loss_func=self._loss, **kwargs)
            self._teacher: tuple = (None, None)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self._teacher = (inputs.pop(TEACHER_IDS, None), inputs.pop(TEACHER_LOGITS, None))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def _loss(self, outputs, labels, num_items_in_batch=None):
            ids, vals = self._teacher
            training = self.model.training
            return distill_loss(
                outputs.logits,
                labels,
                ids.to(outputs.logits.device) if training and ids is not None else None,
                vals.to(outputs.logits.device) if training and vals is not None else None,
                alpha if training else 0.0,
                temperature,
                num_items_in_batch,
            )

    return DistillTrainer


def join_teacher(train_ds, teacher_dir):
    """The tokenized train split with the teacher's columns beside it (same rows, same order:
    the teacher_logits artifact is keyed by the tokenized artifact's digest)."""
    import datasets

    teacher = datasets.load_from_disk(str(teacher_dir))
    if len(teacher) != len(train_ds):
        raise ValueError(
            f"{teacher_dir}: {len(teacher)} rows of teacher logits, {len(train_ds)} train rows"
        )
    return datasets.concatenate_datasets([train_ds, teacher], axis=1)


def teacher_top_k(model, examples: list[tuple[list[int], list[int]]], k: int, pad_id: int):
    """Per example: (ids, logits, kept) — ids and logits flattened [positions * k] of the
    teacher's top-k logits at its scored positions (`scored_positions`), and per position the
    share of the teacher's probability (T = 1) those k ids hold. One padded forward per call;
    the model's own logits (fp32), taken from the last L positions (prompt tuning returns its
    virtual ones first)."""
    import torch

    width = max(len(ids) for ids, _ in examples)
    batch = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, _) in enumerate(examples):
        batch[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(input_ids=batch.to(device), attention_mask=mask.to(device)).logits
    logits = logits[:, -width:].float()
    out = []
    for i, (_, labels) in enumerate(examples):
        pos = scored_positions(labels)
        scores = logits[i, pos]
        top = scores.topk(min(k, logits.shape[-1]), dim=-1)
        kept = (top.values - scores.logsumexp(-1, keepdim=True)).exp().sum(-1)
        out.append((top.indices.flatten().tolist(), top.values.flatten().tolist(), kept.tolist()))
    return out
