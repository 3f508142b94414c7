"""How right the blacklist was, by the annotators' verdicts: the human-confirmed precision.

A reviewed flag is a blacklisted image that has a verdict (``overrides.parquet`` keeps the flag's score
and reason from ``blacklist.parquet`` at import time: the next run no longer lists a checked image). It
is confirmed when annotators relabelled or dropped it, and a false alarm when they kept its label. The
precision is the confirmed share of reviewed flags: overall, per reason, per band of the score the list is
ranked by (the estimated probability that the label is wrong), and at each score threshold; the lowest
threshold whose flags reach a chosen precision tells a team how far down the next list to review.

Numbers go to the ``review`` section of ``OUT/metrics.json`` and to the report's summary page.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

CONFIRMED = ("relabel", "drop")
BAND = 0.1  # width of a score band
Z95 = 1.959964  # two-sided 95% normal quantile, for the Wilson interval
DEFAULT_TARGET = 0.9
SECTION = "review"


def wilson(confirmed: int, reviewed: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion: honest at a few dozen reviews, where the plain
    estimate's interval is not."""
    if reviewed <= 0:
        return None
    p = confirmed / reviewed
    centre = (p + z * z / (2 * reviewed)) / (1 + z * z / reviewed)
    half = z * math.sqrt(p * (1 - p) / reviewed + z * z / (4 * reviewed * reviewed)) / (1 + z * z / reviewed)
    return round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)


def _counts(confirmed: pd.Series) -> dict[str, Any]:
    n, k = len(confirmed), int(confirmed.sum())
    interval = wilson(k, n)
    return {"reviewed": n, "confirmed": k, "precision": round(k / n, 4) if n else None,
            "interval95": list(interval) if interval else None}  # fmt: skip


def _band(score: float) -> float:
    # Floor to the band's lower edge; scores of 1.0 join the top band rather than one of their own.
    return round(min(math.floor(score / BAND + 1e-9), math.ceil(1 / BAND) - 1) * BAND, 4)


def threshold_for(scores: pd.Series, confirmed: pd.Series, target: float) -> dict[str, Any] | None:
    """The lowest score threshold at which the reviewed flags scoring at or above it reach ``target``
    precision (the deepest cut of the list that would have been that right), with its counts; None when
    no threshold does."""
    order = scores.sort_values(ascending=False, kind="stable").index
    s, c = scores[order].to_numpy(), confirmed[order].to_numpy()
    best = None
    k = 0
    for i in range(len(s)):
        k += int(c[i])
        if i + 1 < len(s) and s[i + 1] == s[i]:  # a threshold takes every flag of its score
            continue
        if k / (i + 1) >= target:
            best = {"score": round(float(s[i]), 4), "reviewed": i + 1, "confirmed": k,
                    "precision": round(k / (i + 1), 4)}  # fmt: skip
    return best


def blacklist_precision(overrides: pd.DataFrame, target: float = DEFAULT_TARGET) -> dict[str, Any]:
    """The ``review`` section: verdict counts, and the precision of the reviewed flags overall, per
    reason, per score band, and the threshold for ``target``."""
    verdicts = overrides["verdict"].value_counts()
    section: dict[str, Any] = {
        "verdicts": {v: int(verdicts.get(v, 0)) for v in ("keep", "relabel", "drop")},
        "target_precision": target,
    }
    scores = overrides["flag_score"] if "flag_score" in overrides else pd.Series(None, overrides.index)
    has_flag = scores.notna()
    flags = overrides[has_flag]
    section["unflagged_verdicts"] = int((~has_flag).sum())  # verdicts on images the list did not flag
    confirmed = flags["verdict"].isin(CONFIRMED)
    section.update(_counts(confirmed))
    section["per_reason"] = {str(r): _counts(confirmed[g.index]) for r, g in flags.groupby("flag_reason")}
    bands = flags["flag_score"].astype(float).map(_band)
    section["per_band"] = [
        {"low": low, "high": round(low + BAND, 4), **_counts(confirmed[g.index])}
        for low, g in sorted(flags.groupby(bands), key=lambda kv: -kv[0])
    ]
    section["threshold"] = threshold_for(flags["flag_score"].astype(float), confirmed, target)
    return section


def format_review(section: dict[str, Any]) -> str:
    """A few lines for the terminal: the precision, and the threshold for the target."""
    if not section or not section.get("reviewed"):
        return "blacklist precision: no flagged image has a verdict yet"
    lo, hi = section["interval95"]
    lines = [
        f"human-confirmed precision of the blacklist: {section['precision']:.2f} ({section['confirmed']} of "
        f"{section['reviewed']} reviewed flags relabelled or dropped; 95% interval {lo:.2f} to {hi:.2f})"
    ]
    for reason, c in section["per_reason"].items():
        lines.append(f"  {reason}: {c['precision']:.2f} ({c['confirmed']} of {c['reviewed']})")
    t, target = section.get("threshold"), section["target_precision"]
    if t:
        lines.append(
            f"  flags scoring {t['score']:.3f} or more reach precision {target:g}: {t['precision']:.2f} "
            f"({t['confirmed']} of {t['reviewed']}); review the next list down to that score"
        )
    else:
        lines.append(f"  no score threshold reaches precision {target:g} on the reviewed flags")
    return "\n".join(lines)
