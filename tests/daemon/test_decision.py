"""``decide``: the OK/NG/ERROR rule of one scored image."""

from __future__ import annotations

import math

from ngcal.daemon.decision import ItemDecision, Scored, decide


def test_ng_at_or_above_the_threshold_ok_below():
    """The threshold itself is NG (score >= threshold), just below it is OK."""
    assert decide(Scored(0.5), 0.5) == ItemDecision("NG", 0.5, None)
    assert decide(Scored(math.nextafter(0.5, 0)), 0.5).label == "OK"


def test_errors_and_non_finite_scores_are_error_without_a_score():
    """A read/score failure keeps its reason; NaN and inf are never OK or NG."""
    assert decide(Scored.failed("truncated"), 0.5) == ItemDecision("ERROR", None, "truncated")
    assert decide(Scored(float("nan")), 0.5) == ItemDecision("ERROR", None, "non_finite_score")
    assert decide(Scored(float("inf")), 0.5).label == "ERROR"
    assert decide(Scored(), 0.5).label == "ERROR"
