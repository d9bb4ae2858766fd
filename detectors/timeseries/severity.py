"""Severity of a segment from its duration, magnitude and simple operator rules.

A score in [0, 1] is built from two saturating terms, then rules can only raise
the level. Why these rules: a long excursion that also leaves the range seen in
normal data is what an operator pages on; a one-point blip just above threshold is
what they triage later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LEVELS = ("low", "medium", "high", "critical")


@dataclass(frozen=True)
class Severity:
    """Level plus the numbers it came from (all JSON-ready)."""

    level: str
    score: float
    magnitude: float
    duration: int
    out_of_range: bool
    rules: tuple[str, ...] = ()


def severity(peak_score: float, threshold: float, duration: int, *, out_of_range: bool = False,
             n_vars_out_of_range: int = 0, long_duration: int = 60) -> Severity:
    """Grade one segment.

    Args:
        peak_score: Largest point score in the segment.
        threshold: The detector's threshold (magnitude is ``peak / threshold``).
        duration: Segment length in points.
        out_of_range: Some variable left the normal range learned at fit.
        n_vars_out_of_range: How many did (a spread fault is more serious).
        long_duration: Points at which the duration term saturates.
    """
    thr = threshold if threshold > 0 else 1.0
    magnitude = max(peak_score / thr, 0.0)
    mag_term = 1.0 - math.exp(-max(magnitude - 1.0, 0.0))  # 0 at threshold, ->1
    dur_term = min(math.log1p(max(duration, 1)) / math.log1p(long_duration), 1.0)
    score = 0.6 * mag_term + 0.4 * dur_term
    idx = 0 if score < 0.3 else 1 if score < 0.55 else 2 if score < 0.8 else 3
    rules: list[str] = []
    if out_of_range and duration >= long_duration and idx < 3:
        idx, _ = 3, rules.append("long excursion outside the normal range")
    elif out_of_range and idx < 1:
        idx, _ = 1, rules.append("value outside the normal range")
    if n_vars_out_of_range >= 3 and idx < 2:
        idx, _ = 2, rules.append(f"{n_vars_out_of_range} variables outside their normal range")
    if magnitude >= 5.0 and idx < 2:
        idx, _ = 2, rules.append("peak at least 5x the threshold")
    return Severity(LEVELS[idx], round(score, 4), round(magnitude, 4), int(duration), bool(out_of_range), tuple(rules))
