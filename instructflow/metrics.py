"""Reference-based text metrics of the evaluate stage: BLEU (sacrebleu), ROUGE (rouge-score,
with a Unicode-aware tokenizer), exact match (strict) and its SQuAD-normalised twin, and the
same figures per group of rows (e.g. per task).

Definitions (also in docs/evaluation.md):
- `exact_match`: share of answers equal to the reference after collapsing whitespace runs and
  stripping the ends; case and punctuation count.
- `exact_match_normalized`: the same after SQuAD's normalisation (lower case, punctuation and
  the articles a/an/the removed).
- `rouge1/2/L/Lsum`: mean F1 over examples, rouge-score's scorer with `UnicodeTokenizer`.
- `bleu`: sacrebleu's corpus BLEU (its default 13a tokenisation), 0-100.
"""

from __future__ import annotations

import re
import string
from typing import Any

from instructflow.rows import column

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
# Scripts written without spaces between words: each character is a token, as in ROUGE
# implementations for Chinese/Japanese (Han, Hiragana, Katakana, CJK punctuation excluded).
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")
_ASCII_WORD = re.compile(r"^[a-z0-9]+$")


class UnicodeTokenizer:
    """rouge-score's tokenizer, extended past ASCII.

    rouge-score's default keeps only [a-z0-9] (an identical Chinese answer scores 0 and
    'café' loses its 'é'). This one keeps letters and digits of every script, splits CJK text
    into characters, lower-cases, and Porter-stems ASCII words longer than 3 letters exactly
    as rouge-score does, so ASCII text tokenises as before.
    """

    def __init__(self, use_stemmer: bool = True):
        from nltk.stem import porter

        self.stemmer = porter.PorterStemmer() if use_stemmer else None

    def tokenize(self, text: str) -> list[str]:
        tokens = _TOKEN.findall(text.lower())
        if self.stemmer is None:
            return tokens
        return [self.stemmer.stem(t) if len(t) > 3 and _ASCII_WORD.match(t) else t for t in tokens]


_ROUGE_L = None


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1 of two texts (symmetric), tokenised as `text_metrics` does: the one ROUGE-L
    of the project (synthesize's Self-Instruct novelty rule uses it too)."""
    global _ROUGE_L
    if _ROUGE_L is None:
        from rouge_score import rouge_scorer

        _ROUGE_L = rouge_scorer.RougeScorer(["rougeL"], tokenizer=UnicodeTokenizer())
    return _ROUGE_L.score(a, b)["rougeL"].fmeasure


def text_metrics(hyps: list[str], refs: list[str]) -> tuple[dict[str, float], dict[str, list]]:
    """Corpus BLEU, mean ROUGE F1s, exact match; and per-example BLEU / ROUGE-L."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=UnicodeTokenizer())
    pairs = list(zip(hyps, refs, strict=True))
    rouge = [scorer.score(r, h) for h, r in pairs]
    per_bleu = [sacrebleu.sentence_bleu(h, [r]).score for h, r in pairs]
    metrics = {"bleu": sacrebleu.corpus_bleu(hyps, [refs]).score}
    for t in ROUGE_TYPES:
        metrics[t] = sum(s[t].fmeasure for s in rouge) / len(rouge)
    metrics["exact_match"] = sum(same_text(h, r) for h, r in pairs) / len(refs)
    metrics["exact_match_normalized"] = sum(
        normalize_answer(h) == normalize_answer(r) for h, r in pairs
    ) / len(refs)
    # How long the answers run (whitespace words): a base that rambles scores low on ROUGE
    # and BLEU for its length alone, so the length is shown beside them.
    metrics["answer_words"] = sum(len(h.split()) for h in hyps) / len(hyps)
    return metrics, {"bleu": per_bleu, "rougeL": [s["rougeL"].fmeasure for s in rouge]}


BLEU_MIN_WORDS = 4


def bleu_signal_note(refs: list[str]) -> str | None:
    """Why corpus BLEU means nothing on these references, or None. BLEU multiplies 1- to
    4-gram precisions: when most references are shorter than 4 words it is 0 (or noise)
    whatever the answers, e.g. the demo's one-word answers give 0.00 at exact match 0.91."""
    import statistics

    median = statistics.median(len(r.split()) for r in refs) if refs else 0
    if median >= BLEU_MIN_WORDS:
        return None
    return (
        f"no signal: the references' median length is {median:g} words "
        f"(< {BLEU_MIN_WORDS}; corpus BLEU needs 4-grams)"
    )


def same_text(hyp: str, ref: str) -> bool:
    """Exact match: equal after collapsing whitespace runs, nothing else (case and punctuation
    count: an upper-case answer is not matched by copying the lower-case input)."""
    return " ".join(hyp.split()) == " ".join(ref.split())


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation (lower case, no punctuation, no a/an/the, single spaces)."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def per_group(
    rows: list[dict[str, Any]],
    by: str,
    outputs: dict[str, list[str]],
    refs: list[str],
) -> dict[str, dict[str, float]]:
    """Exact match and ROUGE-L per value of the column `by` (e.g. meta.task), for each set of
    outputs ({"": fine-tuned, "_base": base}); {} when no row has the column."""
    keys = [column(r, by) for r in rows]
    if not any(keys):
        return {}
    table: dict[str, dict[str, float]] = {}
    for key in sorted(set(keys)):
        idx = [i for i, k in enumerate(keys) if k == key]
        entry: dict[str, float] = {"n": len(idx)}
        for suffix, outs in outputs.items():
            m, _ = text_metrics([outs[i] for i in idx], [refs[i] for i in idx])
            entry[f"exact_match{suffix}"] = m["exact_match"]
            entry[f"rougeL{suffix}"] = m["rougeL"]
        table[key or "(none)"] = entry
    return table


def metric_key(value: str) -> str:
    """A group value as a metric-name part (MLflow allows letters, digits, _ - . / space)."""
    return re.sub(r"[^\w\-.]+", "_", value).strip("_")[:60] or "none"
