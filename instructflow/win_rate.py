"""Pairwise win rates and how far they can be trusted: ties, intervals, answer length.

`win_rate` counts a tie as half a win (AlpacaEval's convention, kept for the charts). The gate
reads the *decisive* win rate instead, wins / (wins + losses), because a tie is not a win: a
model the judge cannot tell from its opponent must not pass as better. Its 95 % interval is
Wilson's score interval, which stays honest at small counts and at 0 or 1 (a percentile
bootstrap of 1/1 decisive comparisons would be [1, 1]).

The length-controlled figure follows AlpacaEval 2's idea (Dubois et al. 2024) on the decisive
comparisons: a logistic regression of win (1) / loss (0) on tanh(length difference / its std)
with an intercept, read at equal length: sigmoid(intercept). It differs from AlpacaEval 2's:
there is no instruction-difficulty term (that needs many models answering the same
instructions; here there are two), and instead of its regularisation towards deliberately
verbose / concise variants of a baseline it puts a fixed ridge penalty on the length slope, so
a judge whose verdicts are all explained by length gives a finite fit. Its interval is a
percentile bootstrap of the refit. It is evidence only with at least `min_comparisons`
decisive comparisons and when length alone does not explain the outcome (the longer answer
winning at least LENGTH_EXPLAINS, or at most 1 - LENGTH_EXPLAINS, of those with unequal
lengths): then quality and length cannot be told apart and the fit only extrapolates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Z95 = 1.959963984540054
# Share of decisive comparisons won by the longer answer beyond which length alone explains
# the outcome (and symmetrically for the shorter one).
LENGTH_EXPLAINS = 0.9
# Penalty on the length slope (features lie in [-1, 1]); small next to any real sample.
RIDGE = 1.0


def bootstrap_ci(values: Sequence[float], samples: int, seed: int) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the mean (numpy; scipy's BCa breaks on ties)."""
    import numpy as np

    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, arr.size, size=(samples, arr.size))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def wilson(wins: int, n: int) -> tuple[float, float]:
    """95 % Wilson score interval of wins / n (n > 0)."""
    p, z2 = wins / n, Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * (p * (1 - p) / n + z2 / (4 * n * n)) ** 0.5 / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _fit(x, y):
    """Intercepts of ridge-penalised logistic fits, one per row of x / y (shape (B, n)).

    Newton steps on the convex loss, clipped so that a separable sample cannot overshoot; a
    tiny penalty on the intercept keeps an all-win sample finite (its rate reads as ~1)."""
    import numpy as np

    theta = np.zeros((x.shape[0], 2))
    penalty = np.array([1e-4, RIDGE])
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(theta[:, :1] + theta[:, 1:] * x)))
        r, w = p - y, p * (1 - p)
        grad = np.stack([r.sum(1), (r * x).sum(1)], 1) + penalty * theta
        hess = np.empty((x.shape[0], 2, 2))
        hess[:, 0, 0] = w.sum(1) + penalty[0]
        hess[:, 0, 1] = hess[:, 1, 0] = (w * x).sum(1)
        hess[:, 1, 1] = (w * x * x).sum(1) + penalty[1]
        step = np.clip(np.linalg.solve(hess, grad[..., None])[..., 0], -2.0, 2.0)
        theta -= step
        if np.abs(step).max() < 1e-9:
            break
    return theta[:, 0]


@dataclass
class LengthControl:
    value: float | None  # decisive win rate at equal length; None without decisive outcomes
    low: float | None
    high: float | None
    decisive: int
    longer_won: float | None  # share of unequal-length decisive comparisons the longer won
    evidence: bool
    note: str  # why it is not evidence / the length warning; "" when neither applies


def length_controlled(
    outcomes: Sequence[str],
    cand: Sequence[str],
    base: Sequence[str],
    *,
    min_comparisons: int,
    samples: int,
    seed: int,
) -> LengthControl:
    """The length-controlled decisive win rate of `cand` over `base` (see the module doc)."""
    import numpy as np

    pairs = [
        (o == "win", len(c) - len(b))
        for o, c, b in zip(outcomes, cand, base, strict=True)
        if o in ("win", "loss")
    ]
    n = len(pairs)
    if n == 0:
        return LengthControl(None, None, None, 0, None, False, "no decisive comparison")
    y = np.array([float(w) for w, _ in pairs])
    diffs = np.array([d for _, d in pairs], dtype=float)
    unequal = [(w, d) for w, d in pairs if d]
    longer_won = sum(w == (d > 0) for w, d in unequal) / len(unequal) if unequal else None
    x = np.tanh(diffs / (diffs.std() or 1.0))
    value = float(1.0 / (1.0 + np.exp(-_fit(x[None], y[None])[0])))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(samples, n))
    boot = 1.0 / (1.0 + np.exp(-_fit(x[idx], y[idx])))
    low, high = (float(v) for v in np.percentile(boot, [2.5, 97.5]))
    notes = []
    if longer_won is not None and max(longer_won, 1 - longer_won) >= LENGTH_EXPLAINS:
        side = "longer" if longer_won >= 0.5 else "shorter"
        share = max(longer_won, 1 - longer_won)
        notes.append(
            f"length alone explains the outcome: the {side} answer won {share:.0%} of "
            f"{len(unequal)} decisive comparisons with unequal lengths"
        )
    if n < min_comparisons:
        notes.append(f"{n} decisive comparisons < judge.lc_min_comparisons {min_comparisons}")
    return LengthControl(value, low, high, n, longer_won, not notes, "; ".join(notes))


def pairwise_figures(
    outcomes: Sequence[str],
    cand: Sequence[str],
    base: Sequence[str],
    *,
    samples: int,
    seed: int,
    lc_min_comparisons: int,
) -> tuple[dict[str, float], LengthControl]:
    """Metrics of pairwise outcomes ("win" / "tie" / "loss" / "failed"; failed ones left
    out): counts, `win_rate` (tie = half) with a bootstrap interval, `decisive_win_rate` with
    Wilson's interval, and the length-controlled figures (`win_rate_lc*`,
    `win_rate_lc_evidence` 1/0, `longer_answer_won`)."""
    wins, ties, losses = (outcomes.count(k) for k in ("win", "tie", "loss"))
    out: dict[str, float] = {"wins": wins, "ties": ties, "losses": losses}
    points = [{"win": 1.0, "tie": 0.5, "loss": 0.0}[o] for o in outcomes if o != "failed"]
    if points:
        low, high = bootstrap_ci(points, samples, seed)
        out.update(win_rate=sum(points) / len(points), win_rate_low=low, win_rate_high=high)
    if wins + losses:
        low, high = wilson(wins, wins + losses)
        out.update(
            decisive_win_rate=wins / (wins + losses),
            decisive_win_rate_low=low,
            decisive_win_rate_high=high,
        )
    lc = length_controlled(
        outcomes, cand, base, min_comparisons=lc_min_comparisons, samples=samples, seed=seed
    )
    if lc.value is not None:
        out.update(
            win_rate_lc=lc.value,
            win_rate_lc_low=lc.low,
            win_rate_lc_high=lc.high,
            win_rate_lc_evidence=float(lc.evidence),
        )
    if lc.longer_won is not None:
        out["longer_answer_won"] = lc.longer_won
    return out, lc
