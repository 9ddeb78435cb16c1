"""NG-aware estimators: weighted curves, F1 and cost optima, miss-rate quantile."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ngcal.calibration import ng
from ngcal.core.metrics import f1_max, min_expected_cost, rates_at


@settings(max_examples=30, deadline=None)
@given(
    n_ok=st.integers(5, 80),
    n_ng=st.integers(2, 60),
    seed=st.integers(0, 10_000),
    prevalence=st.floats(0.01, 0.6),
    cost=st.floats(0.5, 200.0),
)
def test_cost_optimum_matches_brute_force(
    n_ok: int, n_ng: int, seed: int, prevalence: float, cost: float
) -> None:
    """The cost threshold reaches the minimum expected cost over every possible threshold."""
    rng = np.random.default_rng(seed)
    x = np.round(rng.normal(0, 1, n_ok), 2)
    y = np.round(rng.normal(1.5, 1, n_ng), 2)
    t = ng.cost_threshold(
        x, ng.groups_of([y], [1.0]), prevalence=prevalence, cost_ratio=cost, n_boot=0
    )
    labels = np.r_[np.zeros(n_ok), np.ones(n_ng)]
    scores = np.r_[x, y]
    r = rates_at(labels, scores, t.value)
    realised = (1 - prevalence) * r.fpr + prevalence * cost * r.fnr
    assert np.isclose(realised, t.objective)
    # metrics.min_expected_cost scans the same ROC points
    best, _ = min_expected_cost(labels, scores, prevalence=prevalence, cost_ratio=cost)
    assert realised <= best + 1e-12


def test_f1_at_sample_prevalence_matches_oracle() -> None:
    """At the sample's own NG share the F1 threshold reaches metrics.f1_max."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(0, 1, 300), rng.normal(2, 1, 200)
    t = ng.f1_threshold(x, ng.groups_of([y], [1.0]), prevalence=200 / 500, n_boot=20)
    labels = np.r_[np.zeros(300), np.ones(200)]
    oracle = f1_max(labels, np.r_[x, y])
    assert np.isclose(rates_at(labels, np.r_[x, y], t.value).f1, oracle.f1)
    assert t.value_low <= t.value <= t.value_high


def test_weights_decide_between_groups() -> None:
    """Weighted TPR: a group with all the weight decides the miss rate; the other is ignored."""
    x = np.zeros(50)
    easy, hard = np.full(20, 10.0), np.full(20, 1.0)
    both = ng.groups_of([easy, hard], [1.0, 0.0])
    assert ng.weighted_fnr(both, 5.0) == 0.0
    both = ng.groups_of([easy, hard], [0.5, 0.5])
    assert np.isclose(ng.weighted_fnr(both, 5.0), 0.5)
    t = ng.miss_rate_threshold(x, both, miss_rate=0.4, n_boot=0)
    assert t.value == 1.0 and t.fnr == 0.0


@given(m=st.floats(0.0, 0.9), n=st.integers(1, 200), seed=st.integers(0, 1000))
def test_miss_rate_threshold_respects_target(m: float, n: int, seed: int) -> None:
    """The estimated miss rate at the chosen threshold is at most the target."""
    y = np.random.default_rng(seed).normal(size=n)
    t = ng.miss_rate_threshold(np.zeros(3), ng.groups_of([y], [1.0]), miss_rate=m, n_boot=0)
    assert np.mean(y < t.value) <= m + 1e-12


def test_jeffreys_interval_contains_rate() -> None:
    """The Jeffreys interval brackets the observed rate and narrows with n."""
    lo1, hi1 = ng.jeffreys_interval(0.1, 50)
    lo2, hi2 = ng.jeffreys_interval(0.1, 5000)
    assert lo1 < 0.1 < hi1 and lo2 < 0.1 < hi2 and hi2 - lo2 < hi1 - lo1
    assert ng.jeffreys_interval(0.0, 20)[0] == 0.0
