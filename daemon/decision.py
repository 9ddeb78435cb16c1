"""The decision about one scored image: OK, NG or ERROR.

``decide`` is the one rule: an image whose score is finite and at least the threshold is
NG, below it OK; an image that could not be read or scored, or whose score is not finite,
is ERROR with the reason (never a guess). Scores and threshold are image-score units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .messages import Label


@dataclass(frozen=True)
class Scored:
    """The scorer's answer for one image: a score, or the reason there is none."""

    score: float | None = None
    error: str | None = None

    @staticmethod
    def failed(reason: str) -> Scored:
        return Scored(None, reason)


@dataclass(frozen=True)
class ItemDecision:
    """The verdict label, the score it rests on (None for ERROR) and the ERROR reason."""

    label: Label
    score: float | None
    reason: str | None


def decide(scored: Scored, threshold: float) -> ItemDecision:
    """OK/NG/ERROR for one image: NG when ``score >= threshold`` (see module docstring)."""
    if scored.error is not None or scored.score is None:
        return ItemDecision("ERROR", None, scored.error or "unscored")
    s = float(scored.score)
    if not math.isfinite(s):
        return ItemDecision("ERROR", None, "non_finite_score")
    return ItemDecision("NG" if s >= threshold else "OK", s, None)
