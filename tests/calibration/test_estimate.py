"""calibrate(): modes, evidence counts, expected rates, errors."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from ngcal.calibration.estimate import calibrate
from ngcal.core.errors import ConfigError, DataError
from ngcal.core.scoresets import ScoreSet
from ngcal.core.thresholds import OperatingPoint


def test_every_mode_produces_a_threshold_file(simulated: Callable[..., list[ScoreSet]]) -> None:
    """Each mode returns value, method, evidence counts and expected rates with intervals."""
    sets = simulated(n_real=3)
    for mode in ("target_fpr", "f1", "cost", "miss_rate"):
        t = calibrate(sets, mode=mode, n_boot=20)
        assert t.mode == mode and np.isfinite(t.value)
        assert t.evidence == {"glass_feature": 400, "normal_loo": 500, "real_ng": 3}
        assert t.expected_fpr is not None and t.expected_fpr.value is not None
        assert t.expected_fpr.low <= t.expected_fpr.value <= t.expected_fpr.high  # type: ignore[operator]
        assert t.expected_fnr is not None and t.expected_fnr.value is not None


def test_cost_threshold_drops_as_misses_cost_more(simulated: Callable[..., list[ScoreSet]]) -> None:
    """A higher cost of a miss never raises the cost-optimal threshold."""
    sets = simulated(n_real=3)
    values = [
        calibrate(
            sets,
            mode="cost",
            n_boot=0,
            operating_point=OperatingPoint(prevalence=0.02, cost_ratio=c),
        ).value
        for c in (1.0, 10.0, 100.0, 1000.0)
    ]
    assert values == sorted(values, reverse=True) and values[0] > values[-1]


def test_real_ng_moves_the_threshold_toward_real_defects(
    simulated: Callable[..., list[ScoreSet]],
) -> None:
    """Real NG that score lower than synthetic pull the cost threshold down as k grows."""
    op = OperatingPoint(prevalence=0.02, cost_ratio=100.0)
    v = [
        calibrate(simulated(n_real=k, real_mu=1.2), mode="cost", operating_point=op, n_boot=0).value
        for k in (0, 5, 50)
    ]
    assert v[0] > v[1] > v[2]


def test_target_fpr_is_guaranteed_and_marked(simulated: Callable[..., list[ScoreSet]]) -> None:
    """target_fpr mode: conformal method, guarantee noted, sample FPR under target."""
    t = calibrate(simulated(), mode="target_fpr", target_fpr=0.05, confidence=0.9)
    assert t.method == "conformal_order_statistic" and t.notes["guaranteed"] == 1
    assert t.expected_fpr is not None and (t.expected_fpr.value or 0) <= 0.05


def test_errors_name_the_problem(simulated: Callable[..., list[ScoreSet]]) -> None:
    """Unknown mode -> ConfigError; cost without NG evidence -> DataError."""
    with pytest.raises(ConfigError, match="mode='nope'"):
        calibrate(simulated(), mode="nope")
    normal_only = [s for s in simulated() if s.source == "normal_loo"]
    with pytest.raises(DataError, match="needs NG evidence"):
        calibrate(normal_only, mode="cost")


def test_max_rule_bounds_a_drifted_normal_source(make_set: Callable[..., ScoreSet]) -> None:
    """Line OK parts scoring higher than training: the max rule bounds their FPR, pooled not."""
    rng = np.random.default_rng(5)
    train = make_set("normal_loo", rng.normal(0.0, 1.0, 2000))
    line = make_set("real_ok", rng.normal(1.0, 1.0, 400))
    fresh_line = rng.normal(1.0, 1.0, 100_000)
    t_max = calibrate([train, line], mode="target_fpr", target_fpr=0.05, normal_rule="max")
    t_pool = calibrate([train, line], mode="target_fpr", target_fpr=0.05, normal_rule="pooled")
    assert np.mean(fresh_line >= t_max.value) <= 0.05
    assert np.mean(fresh_line >= t_pool.value) > 0.05
    assert t_max.notes["normal_groups"] == 3


def test_options_and_keyword_overrides_agree(simulated: Callable[..., list[ScoreSet]]) -> None:
    """calibrate(sets, CalibrationOptions(...)) equals calibrate(sets, **same keywords)."""
    from ngcal.calibration.estimate import CalibrationOptions, Provenance

    sets = simulated(n_real=2)
    o = CalibrationOptions(mode="f1", n_boot=0)
    a = calibrate(sets, o, provenance=Provenance(now="t"))
    b = calibrate(sets, mode="f1", n_boot=0, provenance=Provenance(now="t"))
    assert a == b
    with pytest.raises(ConfigError, match="unknown option"):
        calibrate(sets, modes="f1")


def test_mostly_synthetic_cost_threshold_is_at_most_the_normal_99th_percentile(
    make_set: Callable[..., ScoreSet],
) -> None:
    """While synthetic NG weigh at least half (k <= n0 = 2 real NG), a cost optimum above
    the normal p99 is brought down to it; from k = 3 the cost optimum stands (decision 0303)."""
    rng = np.random.default_rng(1)
    normal = rng.normal(0.0, 1.0, 1000)
    sets = [
        make_set("normal_loo", normal),
        make_set("glass_feature", rng.normal(8.0, 0.5, 200), 1.0),
        make_set("glass_feature", rng.normal(9.0, 0.5, 200), 2.0),
    ]
    op = OperatingPoint(prevalence=0.02, cost_ratio=10.0)
    k0 = calibrate(sets, mode="cost", operating_point=op, n_boot=0)
    q99 = float(np.quantile(normal, 0.99))
    assert k0.value == pytest.approx(q99)
    assert k0.method == "min_expected_cost_synthetic_ceiling"
    assert float(k0.notes["cost_optimum"] or 0) > q99 + 2.0  # the optimum sat above it
    real = rng.normal(8.5, 0.5, 3)
    k2 = calibrate([*sets, make_set("real_ng", real[:2])], mode="cost", operating_point=op)
    assert k2.value == pytest.approx(q99)
    k3 = calibrate([*sets, make_set("real_ng", real)], mode="cost", operating_point=op, n_boot=0)
    assert k3.method == "min_expected_cost" and k3.value > q99 + 2.0


def test_the_synthetic_only_ceiling_never_raises_a_threshold(
    simulated: Callable[..., list[ScoreSet]],
) -> None:
    """Where the synthetic cost optimum is already below the normal p99 it is kept as is."""
    sets = simulated()
    op = OperatingPoint(prevalence=0.02, cost_ratio=1000.0)
    t = calibrate(sets, mode="cost", operating_point=op, n_boot=0)
    normal = np.concatenate([s.scores for s in sets if s.source == "normal_loo"])
    assert t.method == "min_expected_cost" and t.value < float(np.quantile(normal, 0.99))
