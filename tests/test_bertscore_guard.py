"""BERTScore's guard (instructflow.semantic): pairs with an empty answer or reference score 0
and are counted, so a mean pulled down by empty answers says so (the bert-score package
crashes on them instead)."""

from __future__ import annotations

from test_semantic import _save_tiny_bert

from instructflow import semantic


def test_empty_answers_score_zero_and_are_counted(tmp_path):
    encoder = _save_tiny_bert(tmp_path / "encoder")
    hyps = ["", "   ", "the cat sat on the mat", "a dog"]
    refs = ["the cat", "a dog ran", "the cat sat on the mat", ""]
    out = semantic.bertscore(hyps, refs, encoder)
    assert out["empty"] == 3
    assert [out["f1"][i] for i in (0, 1, 3)] == [0.0, 0.0, 0.0] and out["f1"][2] > 0.99
    assert semantic.bertscore(hyps[2:3], refs[2:3], encoder)["empty"] == 0
    assert "bert-score package" in semantic.PACKAGE_NOTE
