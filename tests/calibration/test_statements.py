"""Stated rates: what each rests on, and whether it is true at its stated level."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import stats

from ngcal.calibration import statements
from ngcal.calibration.estimate import calibrate
from ngcal.core.scoresets import ScoreSet
from ngcal.core.thresholds import Interval


def test_fpr_guarantee_holds_at_its_level_for_a_cost_threshold(
    make_set: Callable[..., ScoreSet],
) -> None:
    """Normal N(0,1): the stated FPR bound is >= the true FPR in >= 95% of 200 samples."""
    rng = np.random.default_rng(0)
    held = 0
    for _ in range(200):
        sets = [
            make_set("normal_loo", rng.normal(0, 1, 150)),
            make_set("glass_feature", rng.normal(2.5, 1, 100), 1.0),
        ]
        t = calibrate(sets, mode="cost", n_boot=0)
        assert t.expected_fpr is not None and t.expected_fpr.kind == "guarantee"
        held += float(stats.norm.sf(t.value)) <= (t.expected_fpr.high or 0.0)
    assert held / 200 >= 0.95


def test_real_ng_interval_covers_the_true_miss_rate(make_set: Callable[..., ScoreSet]) -> None:
    """Real NG harder than the synthetic: the leave-one-out interval on k covers the true
    miss rate in >= 90% of repeats for k = 1, 2, 5 (the in-sample count would not)."""
    for k in (1, 2, 5):
        rng = np.random.default_rng(k)
        covered = 0
        for _ in range(60):
            sets = [
                make_set("normal_loo", rng.normal(0, 1, 200)),
                make_set("glass_feature", rng.normal(4.0, 1, 100), 1.0),
                make_set("real_ng", rng.normal(2.0, 1, k)),
            ]
            t = calibrate(sets, mode="cost", n_boot=0)
            fnr = t.expected_fnr
            assert (
                fnr is not None and fnr.kind == "interval" and "leave-one-out" in (fnr.basis or "")
            )
            truth = float(stats.norm.cdf(t.value, loc=2.0))
            covered += (fnr.low or 0.0) <= truth <= (fnr.high or 1.0)
        assert covered / 60 >= 0.9, (k, covered)


def test_synthetic_only_miss_rate_is_a_marked_estimate_spanning_components(
    simulated: Callable[..., list[ScoreSet]],
) -> None:
    """With no real NG the miss rate is kind 'estimate', spanning both severities."""
    t = calibrate(simulated(), mode="cost", n_boot=0)
    fnr = t.expected_fnr
    assert fnr is not None and fnr.kind == "estimate"
    by = t.miss_rate_by_source["synthetic"]
    y1 = simulated()[1].scores
    assert (fnr.high or 0) >= float(np.mean(y1 < t.value))  # the weaker severity's miss rate
    assert by.low is not None and by.low <= float(np.mean(simulated()[2].scores < t.value))


def test_sentence_says_what_each_rate_rests_on(simulated: Callable[..., list[ScoreSet]]) -> None:
    """One line: defects passed (a guess, from synthetic) and good parts rejected (guarantee)."""
    t = calibrate(simulated(), mode="cost", n_boot=0)
    line = statements.sentence(t)
    assert "\n" not in line
    assert "of defects to pass" in line and "a guess from synthetic look-alikes" in line
    assert "of good parts to be rejected" in line and "guarantee" in line
    assert line.endswith("based on 400 glass_feature, 500 normal_loo.")


def test_clopper_pearson_edges() -> None:
    """x = 0 and x = n give one-sided intervals; the middle matches scipy's exact test."""
    assert statements.clopper_pearson(0, 5, 0.95)[0] == 0.0
    assert statements.clopper_pearson(5, 5, 0.95)[1] == 1.0
    lo, hi = statements.clopper_pearson(3, 10, 0.95)
    ci = stats.binomtest(3, 10).proportion_ci(0.95, method="exact")
    assert np.isclose(lo, ci.low) and np.isclose(hi, ci.high)


def test_audit_miss_rate_covers_the_line_truth() -> None:
    """A line with a true miss rate of 30% at 2% defects; 1% of passed parts audited: the
    audit interval covers the truth in >= 90% of simulated periods, and the headline
    prefers it over the synthetic guess."""
    rng = np.random.default_rng(3)
    covered, trials = 0, 200
    for _ in range(trials):
        n, prev, miss = 20000, 0.02, 0.3
        defect = rng.random(n) < prev
        passed = ~defect | (rng.random(n) < miss)
        caught = int(np.sum(defect & ~passed))
        audited = passed & (rng.random(n) < 0.01)
        iv = statements.audit_miss_rate(
            escaped=int(np.sum(audited & defect)),
            checked=int(np.sum(audited)),
            passed=int(np.sum(passed)),
            caught=caught,
        )
        assert iv is not None and iv.kind == "interval"
        covered += (iv.low or 0.0) <= miss <= (iv.high or 1.0)
    assert covered / trials >= 0.9
    syn = Interval(value=0.1, low=0.0, high=1.0, kind="estimate")
    fused = Interval(value=0.1)
    assert statements.headline({"synthetic": syn, "audit": iv}, fused).basis == iv.basis
    assert statements.audit_miss_rate(escaped=0, checked=0, passed=10, caught=1) is None
