"""Win rates (instructflow.win_rate): the decisive win rate's Wilson interval against scipy's,
the length-controlled fit against scikit-learn's, what the length control recovers from a
simulated length-biased judge, and when it must not be read as evidence."""

from __future__ import annotations

import numpy as np
import pytest

from instructflow import report, win_rate


def simulate(n: int, quality: float, bias: float, seed: int = 0):
    """Outcomes of a judge that prefers the candidate with probability
    sigmoid(logit(quality) + bias * tanh(length difference / its std)); the candidate is
    longer than the baseline on average, so a length bias inflates its raw win rate."""
    rng = np.random.default_rng(seed)
    diffs = rng.normal(40, 60, n).round().astype(int)
    x = np.tanh(diffs / diffs.std())
    p = 1 / (1 + np.exp(-(np.log(quality / (1 - quality)) + bias * x)))
    wins = rng.random(n) < p
    cand = ["c" * (200 + d) for d in diffs]
    return ["win" if w else "loss" for w in wins], cand, ["b" * 200] * n


def figures(outcomes, cand, base, lc_min_comparisons=80):
    return win_rate.pairwise_figures(
        outcomes, cand, base, samples=400, seed=0, lc_min_comparisons=lc_min_comparisons
    )


def test_wilson_interval_matches_scipy():
    from scipy.stats import binomtest

    for k, n in ((0, 5), (1, 1), (4, 4), (12, 16), (37, 80), (80, 80)):
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert win_rate.wilson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_fit_matches_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    outcomes, cand, base = simulate(300, 0.6, 1.5)
    y = np.array([o == "win" for o in outcomes], dtype=float)
    d = np.array([len(c) - len(b) for c, b in zip(cand, base, strict=True)], dtype=float)
    x = np.tanh(d / d.std())
    # lbfgs leaves the intercept unpenalised: the same objective as the ridge on the slope.
    ref = LogisticRegression(C=1 / win_rate.RIDGE).fit(x[:, None], y).intercept_[0]
    assert win_rate._fit(x[None], y[None])[0] == pytest.approx(ref, abs=1e-3)


def test_length_control_recovers_the_quality_under_a_length_bias():
    outcomes, cand, base = simulate(400, 0.6, 1.5)
    m, lc = figures(outcomes, cand, base)
    assert lc.evidence and lc.note == "" and m["win_rate_lc_evidence"] == 1.0
    assert m["decisive_win_rate"] > 0.7  # the raw figure is inflated by length
    assert abs(m["win_rate_lc"] - 0.6) < 0.05 < abs(m["decisive_win_rate"] - 0.6)
    assert m["win_rate_lc_low"] < 0.6 < m["win_rate_lc_high"]
    # Without a length bias the two agree.
    m, _ = figures(*simulate(400, 0.6, 0.0))
    assert abs(m["win_rate_lc"] - m["decisive_win_rate"]) < 0.03


def test_a_judge_that_decides_by_length_alone_is_flagged():
    # The candidate wins exactly when it is longer (here 84 of 100 times).
    cand = ["x" * 80] * 84 + ["y" * 10] * 16
    base = ["z" * 40] * 100
    outcomes = ["win"] * 84 + ["loss"] * 16
    m, lc = figures(outcomes, cand, base)
    assert m["longer_answer_won"] == 1.0 and not lc.evidence
    assert m["win_rate_lc_evidence"] == 0.0
    assert lc.note.startswith("length alone explains the outcome: the longer answer won 100%")
    # The shorter answer always winning is explained by length just as well.
    _, lc = figures(["loss"] * 84 + ["win"] * 16, cand, base)
    assert "the shorter answer won 100%" in lc.note and not lc.evidence


def test_too_few_comparisons_are_not_evidence_and_ties_are_not_wins():
    outcomes, cand, base = simulate(16, 0.6, 0.0)
    m, lc = figures(outcomes, cand, base)
    assert not lc.evidence and "16 decisive comparisons < judge.lc_min_comparisons 80" in lc.note
    # Ties count half in win_rate, not at all in the decisive or length-controlled figures.
    tied = ["tie"] * 20
    m, lc = figures(["win"] * 3 + ["loss"] * 1 + tied, ["a"] * 24, ["b"] * 24, 2)
    assert (m["wins"], m["ties"], m["losses"]) == (3, 20, 1)
    assert m["win_rate"] == pytest.approx(13 / 24) and m["decisive_win_rate"] == 0.75
    assert lc.decisive == 4
    m, lc = figures(["tie"] * 10 + ["failed"], ["a"] * 11, ["b"] * 11)
    assert m["win_rate"] == 0.5 and "decisive_win_rate" not in m and "win_rate_lc" not in m
    assert lc.note == "no decisive comparison"


def test_the_console_line_says_what_is_not_evidence():
    cand, base = ["x" * 80] * 12 + ["y" * 10] * 4, ["z" * 40] * 16
    m, lc = figures(["win"] * 12 + ["loss"] * 4, cand, base)
    rep = {
        "metrics": m,
        "judge": {
            "judge_backend": "openai",
            "judge_model": "fake",
            "usable": True,
            "status": "judge trusted: calibration accuracy 1.00",
            "pairwise_opponent": "base",
            "length_note": lc.note,
        },
    }
    line = report.judge_line(rep)
    assert "decisive 0.75 [" in line and "(12/0/4 W/T/L)" in line
    assert "length-controlled" in line and "NOT EVIDENCE (length alone explains" in line
    assert "16 decisive comparisons < judge.lc_min_comparisons 80" in line
    assert "[bold yellow]warning[/]: length alone explains" in line
    rep["metrics"] = figures(["tie"] * 16, cand, base)[0]
    rep["judge"]["length_note"] = "no decisive comparison"
    line = report.judge_line(rep)
    assert "no decisive comparison (0/16/0 W/T/L): a tie is not a win" in line
