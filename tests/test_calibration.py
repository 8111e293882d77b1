"""Judge calibration (instructflow.calibration) against scripted judges: real OpenAI-compatible
endpoints on 127.0.0.1 (tests/judge_stub.py) that decide by one rule each. A judge that knows
the right answer must be trusted; one that decides by length, by position, at random or always
says "tie" must not, in any mode, on varied references and on the demo's one-word ones."""

from __future__ import annotations

import pytest
from evaluate_fixtures import canonical_rows
from judge_stub import RULES, FakeJudge

from instructflow import calibration, judge
from instructflow.config import JudgeConfig

VARIED = [
    ("Name the capital of Serbia.", "Belgrade"),
    ("What is 12 plus 30? Answer with the number only.", "42"),
    ("Tom is taller than Ann, and Ann is taller than Bob. Who is the shortest?", "Bob"),
    ("Write winter in all caps.", "WINTER"),
    ("Why was the meeting moved?", "The meeting moved to Friday because the room was booked."),
    ("Give the whole number between 6 and 8.", "7"),
    ("A pen costs 3 dollars. How much do 4 pens cost?", "12 dollars"),
    ("Give a five-letter palindrome.", "level"),
    ("List the first three primes, separated by commas.", "2, 3, 5"),
    ("Translate 'thank you' into French.", "merci"),
    ("Describe the water cycle in one sentence.", "Water evaporates, forms clouds and rains."),
    ("Give the plural of shelf.", "shelves"),
]
DEMO = [(f"{r['instruction']} {r['input']}".strip(), r["output"]) for r in canonical_rows(12)]
ITEMS = [judge.Item(i, "", ref) for i, ref in VARIED + DEMO]
SIDES = (int.__lt__, int.__gt__, int.__eq__)  # shorter, longer, as long as the reference


def _run(rule: str, mode: str) -> judge.JudgeResult:
    with FakeJudge(rule) as endpoint:
        cfg = JudgeConfig(
            backend="openai",
            base_url=endpoint.url,
            model=f"fake-{rule}",  # judge replies are cached per model
            mode=mode,
            calibration_examples=len(ITEMS),
            bootstrap_samples=50,
        )
        refs = [it.reference for it in ITEMS]
        return judge.run_judge(cfg, ITEMS, refs, ["I do not know."] * len(refs))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_reference_has_as_many_shorter_longer_and_equal_wrong_answers(seed):
    triples = calibration.sanity_set(ITEMS, len(ITEMS), seed)
    assert {it.reference for it, _, _ in triples} == {it.reference for it in ITEMS}
    for item in ITEMS:
        ref = item.reference
        wrong = [(w, kind) for it, w, kind in triples if it is item]
        sides = [sum(1 for w, _ in wrong if cmp(len(w), len(ref))) for cmp in SIDES]
        assert sides[0] == sides[1] >= 1, (ref, wrong)
        assert sides[2] in (0, sides[0]), (ref, wrong)
        for w, kind in wrong:
            assert ref.casefold() not in w.casefold() and w == w.strip(), (ref, w)
            side = next(i for i, kinds in enumerate(calibration.SIDES) if kind in kinds)
            assert SIDES[side](len(w), len(ref)), (ref, w, kind)


def test_the_oracle_judge_is_trusted_in_every_mode(home):
    for mode in ("single", "pairwise", "both"):
        res = _run("oracle", mode)
        m = res.metrics
        assert res.usable and m["judge_trusted"] == 1.0, res.status
        assert m["calibration_accuracy"] == 1.0
        if mode != "single":
            assert m["calibration_accuracy_pairwise"] == m["position_consistency"] == 1.0
            # Every candidate answer is the reference, every baseline answer is not.
            assert m["wins"] == len(ITEMS) and m["decisive_win_rate"] == 1.0
        if mode != "pairwise":
            assert m["calibration_accuracy_single"] == 1.0 and m["judge_score"] == 9.0


@pytest.mark.parametrize("rule", [r for r in RULES if r != "oracle"])
def test_judges_that_do_not_read_the_answers_are_untrusted(home, rule):
    res = _run(rule, "both")
    m, cal = res.metrics, res.calibration
    assert not res.usable and m["judge_trusted"] == 0.0
    assert res.status.startswith("judge untrusted: calibration accuracy")
    assert cal["reference_longer"] == 0.5  # the set itself is balanced for length
    table = cal["table"]
    longer = sum(row["reference_longer"] is True for row in table) / len(table)
    equal = sum(row["reference_longer"] is None for row in table) / len(table)
    pair, single = m["calibration_accuracy_pairwise"], m["calibration_accuracy_single"]
    pc = m["position_consistency"]
    if rule == "length":
        # Right exactly on the pairs where the reference is the longer answer (a third).
        assert pair == pytest.approx(longer) and longer == pytest.approx(1 / 3)
        assert pc == pytest.approx(1 - equal)  # equal lengths: "tie" in both orders
        assert single <= longer  # grades in length buckets: ties count as wrong
    elif rule == "shorter":
        assert pair == pytest.approx(longer) and single <= longer
    elif rule == "closest":
        # Right wherever the lengths differ, never on the equal-length wrong answers.
        assert pair == pytest.approx(1 - equal) and equal == pytest.approx(1 / 3)
    elif rule == "position":
        assert pair == 0.0 and pc == 0.0 and "position consistency 0.00 <" in res.status
        assert single == 0.0  # the same grade for every answer
    elif rule == "random":
        assert pair < 0.3 and pc < 0.5 and single < 0.7
    elif rule == "tie":
        assert pair == single == pc == 0.0
    assert f"pairwise {pair:.2f} < judge.min_calibration 0.80" in res.status
    assert m["calibration_accuracy"] == min(pair, single) < 0.8


@pytest.mark.parametrize("mode", ["single", "pairwise"])
@pytest.mark.parametrize("rule", ["length", "position", "random", "tie"])
def test_each_mode_alone_rejects_the_fake_judges(home, rule, mode):
    res = _run(rule, mode)
    assert not res.usable and res.metrics["judge_trusted"] == 0.0
    assert res.metrics[f"calibration_accuracy_{mode}"] < 0.8
    other = "pairwise" if mode == "single" else "single"
    assert f"calibration_accuracy_{other}" not in res.metrics  # scored apart, not pooled


def test_no_usable_reference_means_no_trust(home):
    items = [judge.Item("Say nothing.", "", "  ")] * 3
    with FakeJudge("oracle") as endpoint:
        cfg = JudgeConfig(backend="openai", base_url=endpoint.url, model="fake", mode="both")
        res = judge.run_judge(cfg, items, ["x"] * 3, ["y"] * 3)
    assert not res.usable and "no sanity pairs" in res.status
    assert res.calibration["pairs"] == 0 and res.metrics["calibration_accuracy"] == 0.0
