"""The promotion gate: does a challenger replace the champion? Rules as data.

Each champion-comparison rule is one row of `RULES`: the metric, which way is better, the
register config field holding the limit, and whether the limit is on the absolute or the
relative change. A new promotion metric is one row (and its config field). The judge rule is
apart: it reads the pairwise verdicts, only for a judge that proved itself
(instructflow.calibration), and also applies before there is a champion (vs the base model).
A tie is not a win: the rule reads the decisive win rate, wins / (wins + losses), and the lower
bound of its 95 % Wilson interval must be strictly above `register.min_win_rate`; with no
decisive comparison at all (every pair a tie) nothing shows the model better, so it fails.
When the length-controlled figure is evidence (instructflow.win_rate) and its interval and the
raw one do not overlap, the reasons say so and the length-controlled interval decides.

When the test split changed since the champion was measured, each model's gain over its own
base model is compared instead of raw values (a ratio for perplexity).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from instructflow.win_rate import wilson


@dataclass(frozen=True)
class Rule:
    metric: str
    label: str
    higher_is_better: bool
    limit_field: str  # the RegisterConfig field with the allowed worsening
    relative: bool  # the limit is on the relative change (new / old - 1), else the difference


RULES = (
    Rule("rougeL", "ROUGE-L", higher_is_better=True, limit_field="max_rougeL_drop", relative=False),
    Rule(
        "exact_match",
        "exact match",
        higher_is_better=True,
        limit_field="max_exact_match_drop",
        relative=False,
    ),
    Rule(
        "perplexity",
        "perplexity",
        higher_is_better=False,
        limit_field="max_perplexity_increase",
        relative=True,
    ),
)


def gate(
    challenger: dict[str, float],
    champion: dict[str, float] | None,
    cfg,
    same_split: bool = True,
    judge: dict[str, Any] | None = None,
) -> tuple[bool, list[str]]:
    """(promote?, reasons). `challenger` / `champion`: evaluate metrics (with `_base` twins);
    `judge`: the challenger's evaluate report judge section (usable, status)."""
    reasons: list[str] = []
    if champion is None:
        reasons.append(
            "no champion yet: the first version becomes champion unless a usable judge "
            "rejects it (the comparison rules need a champion)"
        )
    ok, reason = win_rate_rule(challenger, cfg, judge or {})
    reasons.append(reason)
    if champion is None:
        return ok, reasons
    for rule in RULES:
        passed, reason = _check(rule, challenger, champion, cfg, same_split)
        ok &= passed
        reasons.append(reason)
    return ok, reasons


def _check(rule: Rule, new_m: dict, old_m: dict, cfg, same_split: bool) -> tuple[bool, str]:
    new, old, how = comparable(new_m, old_m, rule.metric, same_split)
    if new is None or old is None or (rule.relative and old <= 0):
        return True, f"{rule.label}: not measured on both, rule skipped"
    limit = getattr(cfg, rule.limit_field)
    if rule.relative:
        worse = (new / old - 1.0) * (-1 if rule.higher_is_better else 1)
        change = f"{new / old - 1.0:+.1%}"
        bound = f"+{limit:.1%}"
    else:
        worse = (old - new) if rule.higher_is_better else (new - old)
        change = f"{'drop' if rule.higher_is_better else 'rise'} {worse:+.4f}"
        bound = f"{limit}"
    passed = worse <= limit
    return passed, (
        f"{rule.label}{how} {new:.4g} vs champion {old:.4g}: {change} "
        f"{'<=' if passed else '>'} {bound}"
    )


def win_rate_rule(metrics: dict[str, float], cfg, judge: dict[str, Any]) -> tuple[bool, str]:
    """The judge rule (see the module doc); only a usable judge counts."""
    counts = [metrics.get(k) for k in ("wins", "ties", "losses")]
    if None in counts:
        return True, "win rate: no pairwise judge result, rule skipped"
    wins, ties, losses = (int(c) for c in counts)
    if not judge.get("usable"):
        status = judge.get("status") or "judge not calibrated"
        return True, f"win rate: {status}; rule skipped"
    head = "win rate vs the base model"  # evaluate judges pairwise against the base only
    tally = f"{wins} wins, {ties} ties, {losses} losses"
    if wins + losses == 0:
        return False, (
            f"{head}: {tally}; a tie is not a win and no comparison was decisive, so nothing "
            f"shows it better (needs the lower bound > {cfg.min_win_rate})"
        )
    low, high = wilson(wins, wins + losses)
    figure = f"decisive {wins / (wins + losses):.3f}, 95 % interval [{low:.3f}, {high:.3f}]"
    lc = [metrics.get(k) for k in ("win_rate_lc", "win_rate_lc_low", "win_rate_lc_high")]
    note = judge.get("length_note") or ""
    notes = []
    if None not in lc and metrics.get("win_rate_lc_evidence") == 1.0:
        lc_figure = f"length-controlled {lc[0]:.3f}, 95 % interval [{lc[1]:.3f}, {lc[2]:.3f}]"
        if lc[1] > high or lc[2] < low:
            notes.append(f"raw {figure}: the two disagree beyond their intervals")
            figure, low = lc_figure + " (used: it and the raw figure disagree)", lc[1]
        else:
            notes.append(lc_figure)
    elif None not in lc:
        notes.append(f"length-controlled {lc[0]:.3f} is not evidence: {note}")
    elif note:
        notes.append(note)
    passed = low > cfg.min_win_rate
    verdict = f"lower bound {'>' if passed else '<='} {cfg.min_win_rate}"
    return passed, "; ".join([f"{head}: {tally}; {figure}: {verdict}", *notes])


def comparable(new: dict, old: dict, name: str, same_split: bool):
    """Raw values on the same test split; otherwise each one's gain over its base model."""
    if same_split:
        return new.get(name), old.get(name), ""
    nb, ob = new.get(f"{name}_base"), old.get(f"{name}_base")
    if None in (new.get(name), old.get(name), nb, ob):
        return None, None, ""
    if name == "perplexity":  # ratio to base, so a split change cancels out
        return new[name] / nb, old[name] / ob, " (relative to base, test splits differ)"
    return new[name] - nb, old[name] - ob, " (gain over base, test splits differ)"
