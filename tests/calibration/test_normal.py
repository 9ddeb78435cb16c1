"""Normal-only thresholds: conformal order statistic, tail fit, percentile baseline."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from ngcal.calibration import normal
from ngcal.core.errors import DataError

DISTS = {
    "normal": stats.norm(),
    "lognormal": stats.lognorm(0.8),
    "gamma": stats.gamma(2.0),
    "pareto": stats.pareto(3.0),
}


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    n=st.integers(min_value=100, max_value=1500),
    target=st.sampled_from([0.01, 0.02, 0.05, 0.1]),
    confidence=st.sampled_from([0.8, 0.9, 0.95]),
    dist=st.sampled_from(sorted(DISTS)),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_conformal_bound_holds_at_stated_rate(
    n: int, target: float, confidence: float, dist: str, seed: int
) -> None:
    """Over 400 simulated calibration samples, P(true FPR > target) is at most 1-confidence.

    The true FPR of each threshold is computed exactly from the known distribution; the
    allowed violation rate is 1-confidence plus three binomial standard errors. The examples
    are derandomized, so the check is the same on every run.
    """
    d = DISTS[dist]
    trials = 400
    k = normal.conformal_rank(n, target, confidence)
    if k is None:
        assert n < normal.min_normal_for(target, confidence)
        return
    rng = np.random.default_rng(seed)
    violations = 0
    for _ in range(trials):
        x = d.rvs(size=n, random_state=rng)
        t = normal.conformal_threshold(x, target_fpr=target, confidence=confidence)
        violations += bool(d.sf(t.value) > target)
    delta = 1.0 - confidence
    limit = delta + 3.0 * np.sqrt(delta * (1 - delta) / trials)
    assert violations / trials <= limit, (violations, trials, delta)


@given(
    n=st.integers(min_value=30, max_value=3000),
    target=st.floats(min_value=0.002, max_value=0.3),
    confidence=st.floats(min_value=0.5, max_value=0.999),
)
def test_conformal_rank_is_the_smallest_valid(n: int, target: float, confidence: float) -> None:
    """k satisfies P(Binom(n,1-a) >= k) <= 1-confidence and k-1 does not."""
    k = normal.conformal_rank(n, target, confidence)
    delta = 1.0 - confidence
    if k is None:
        assert normal.violation_probability(n, n, target) > delta
        return
    assert normal.violation_probability(n, k, target) <= delta
    if k > 1:
        assert normal.violation_probability(n, k - 1, target) > delta


def test_conformal_threshold_discrete_ties_stay_safe() -> None:
    """With heavily tied (rounded) scores the threshold sits strictly above x_(k)."""
    rng = np.random.default_rng(1)
    x = np.round(rng.normal(size=800), 1)
    t = normal.conformal_threshold(x, target_fpr=0.05, confidence=0.9)
    assert t.k is not None
    assert t.value > np.sort(x)[t.k - 1]
    assert normal.empirical_fpr(x, t.value) <= 0.05


def test_tail_fit_used_beyond_sample_and_is_above_max() -> None:
    """For a target below what n supports, the GPD tail fit extrapolates past the max."""
    rng = np.random.default_rng(2)
    x = rng.exponential(size=200)
    assert normal.conformal_rank(200, 0.001, 0.95) is None
    t = normal.conformal_threshold(x, target_fpr=0.001, confidence=0.95)
    assert t.method == "gpd_tail" and not t.guaranteed
    assert t.value > x.max()
    # exponential true quantile at 1 - 0.001 is ln(1000) ~ 6.9; the bootstrapped upper
    # estimate errs high (fewer false rejects) but stays finite
    assert np.log(1000) * 0.8 < t.value < np.log(1000) * 5


def test_tail_fit_is_close_on_a_large_sample() -> None:
    """With 5000 exponential scores the GPD estimate of the 1e-4 quantile is near ln(1e4)."""
    x = np.random.default_rng(4).exponential(size=5000)
    t = normal.tail_threshold(x, target_fpr=1e-4, confidence=0.5, n_boot=50)
    assert 0.8 * np.log(1e4) < t.value < 1.5 * np.log(1e4)


def test_percentile_baseline_matches_numpy() -> None:
    """The percentile baseline is numpy's 'higher' quantile of the scores."""
    x = np.random.default_rng(3).normal(size=301)
    t = normal.percentile_threshold(x, q=0.99)
    assert t.value == float(np.quantile(x, 0.99, method="higher"))
    assert not t.guaranteed


def test_too_few_normal_scores_is_a_data_error() -> None:
    """Fewer than MIN_NORMAL scores are refused, naming the count."""
    with pytest.raises(DataError, match="only 3 normal scores"):
        normal.conformal_threshold(np.ones(3), target_fpr=0.1)


def test_degenerate_gpd_fit_is_a_data_error() -> None:
    """A tail of identical exceedances cannot be fitted: DataError (inside NgcalError)."""
    with pytest.raises(DataError, match="degenerate"):
        normal.gpd_pwm(np.zeros(12))
