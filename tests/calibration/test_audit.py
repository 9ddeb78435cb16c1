"""The audited miss rate anchors the NG evidence (decision 0304), on a line whose truth is known.

Good parts score N(10, 1), defects N(12, 1); at prevalence 0.02 and cost ratio 10 the
cost optimum is t* = 11 + ln(4.9) / 2 (about 11.79). The threshold in force is t0 = 12.3,
too high. An operator confirms every flagged part, downstream finds 10% of the escapes:
the confirmed NG read as a line that misses about 15% where it misses 62%. Random audits
of passed parts measure the miss rate without that selection.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from ngcal.calibration import audit, estimate, fusion, policy, statements
from ngcal.core.errors import ConfigError
from ngcal.core.scoresets import ScoreSet
from ngcal.core.thresholds import Interval, ThresholdFile

NOW = "2026-01-01T00:00:00+00:00"
T0 = 12.3
T_STAR = 11.0 + math.log(4.9) / 2.0


def _set(source: str, x: np.ndarray) -> ScoreSet:
    ids = tuple(f"{source}/{i}" for i in range(x.size))
    return ScoreSet(source=source, scores=x, item_ids=ids)  # type: ignore[arg-type]


def _line(seed: int, *, t0: float = T0) -> tuple[list[ScoreSet], audit.AuditAnchor]:
    """Normal scores, selected confirmations, the audit (20% of passed parts) of 6000 parts."""
    rng = np.random.default_rng(seed)
    n = 6000
    y = rng.random(n) < 0.05
    s = np.where(y, rng.normal(12.0, 1.0, n), rng.normal(10.0, 1.0, n))
    passed = s < t0
    audited = passed & (rng.random(n) < 0.2)
    found = passed & y & (rng.random(n) < 0.1)
    confirmed_ng = y & (~passed | found | audited)
    evidence = [
        _set("normal_loo", rng.normal(10.0, 1.0, 1000)),
        _set("real_ng", s[confirmed_ng]),
    ]
    miss = statements.audit_miss_rate(
        escaped=int(np.sum(audited & y)),
        checked=int(np.sum(audited)),
        passed=int(np.sum(passed)),
        caught=int(np.sum(~passed & y)),
    )
    assert miss is not None
    return evidence, audit.AuditAnchor(t0, miss, int(np.sum(audited & y)))


def _true_regret(t: float) -> float:
    """Expected cost per part of ``t`` minus t*'s on the simulated line (exact)."""
    from scipy.stats import norm

    def cost(x: float) -> float:
        return float(0.98 * norm.sf(x - 10.0) + 0.2 * norm.cdf(x - 12.0))

    return cost(t) - cost(T_STAR)


def test_audit_moves_the_cost_threshold_toward_the_true_optimum() -> None:
    """Over six lines, the anchored threshold's true regret is a fraction of the unanchored."""
    alone, anchored = [], []
    for seed in range(6):
        evidence, anchor = _line(seed)
        a = estimate.calibrate(evidence, mode="cost", n_boot=0)
        b = estimate.calibrate(evidence, mode="cost", n_boot=0, audit=anchor)
        assert b.notes["audit_anchor"] == "reweighted"
        alone.append(_true_regret(a.value))
        anchored.append(_true_regret(b.value))
        # the fused miss rate at t0 is now the audited one
        ev, _ = audit.anchor(fusion.fuse(evidence), anchor)
        assert anchor.miss.value is not None
        assert ev.ng.tpr(np.asarray([T0]))[0] == pytest.approx(1.0 - anchor.miss.value, abs=1e-9)
    assert np.mean(anchored) < 0.5 * np.mean(alone)
    assert np.median(anchored) < np.median(alone)


def test_policy_moves_down_with_the_audit_and_not_without() -> None:
    """The daemon's policy: the same evidence, with and without the audit anchor."""
    evidence, anchor = _line(3)
    state = policy.PolicyState.initial(
        ThresholdFile(value=T0, version=1, mode="cost", method="test", created_at=NOW)
    )
    cfg = policy.PolicyConfig(n_boot=0, max_step=1.0)
    without = policy.recalibrate(state, evidence, cfg, actor="t", now=NOW)
    with_audit = policy.recalibrate(state, evidence, cfg, actor="t", now=NOW, audit=anchor)
    assert with_audit.applied
    new = with_audit.new_state.current.value
    assert new < T0 and abs(new - T_STAR) < 0.3
    assert not without.applied or without.new_state.current.value > new + 0.3
    assert with_audit.audit["audit_anchor"]["threshold"] == T0


def test_an_uninformative_audit_changes_nothing() -> None:
    """Few checks and no escape: the fused miss rate lies inside the interval, kept as is."""
    evidence, _ = _line(0)
    weak = statements.audit_miss_rate(escaped=0, checked=5, passed=1000, caught=40)
    assert weak is not None
    anchor = audit.AuditAnchor(T0, weak, 0)
    a = estimate.calibrate(evidence, mode="cost", n_boot=0)
    b = estimate.calibrate(evidence, mode="cost", n_boot=0, audit=anchor)
    assert b.notes["audit_anchor"] == "agrees"
    assert a.value == b.value


def test_projection_onto_the_interval_without_an_escape() -> None:
    """No escape found but many checks: the miss rate is pulled down to the interval's top."""
    rng = np.random.default_rng(5)
    evidence = [
        _set("normal_loo", rng.normal(10.0, 1.0, 1000)),
        _set("real_ng", rng.normal(11.0, 1.0, 40)),  # half of them below t0 = 11
    ]
    iv = statements.audit_miss_rate(escaped=0, checked=400, passed=2000, caught=40)
    assert iv is not None and iv.high is not None and iv.high < 0.4
    ev, notes = audit.anchor(fusion.fuse(evidence), audit.AuditAnchor(11.0, iv, 0))
    assert notes["audit_anchor"] == "reweighted"
    assert 1.0 - ev.ng.tpr(np.asarray([11.0]))[0] == pytest.approx(iv.high, abs=1e-9)


def test_anchor_rejects_an_inconsistent_interval() -> None:
    with pytest.raises(ValueError):
        audit.AuditAnchor(1.0, Interval(value=0.5, low=0.6, high=0.7), 1)


@pytest.mark.parametrize(
    "spec",
    [
        "threshold=1,passed=10,caught=1,checked=5",  # missing escaped
        "threshold=1,passed=10,caught=1,checked=5,escaped=6",  # more escapes than checks
        "threshold=1,passed=10,caught=1,checked=0,escaped=0",  # no check
        "threshold=1,passed=10,caught=1.5,checked=5,escaped=0",  # not a count
        "threshold=x,passed=10,caught=1,checked=5,escaped=0",
        "threshold=1,passed=10,caught=1,checked=5,escaped=0,extra=1",
    ],
)
def test_parse_audit_names_a_malformed_figure(spec: str) -> None:
    with pytest.raises(ConfigError, match="--audit"):
        audit.parse_audit(spec)


def test_parse_audit_gives_the_audited_miss_rate() -> None:
    a = audit.parse_audit("threshold=2.5,passed=1000,caught=40,checked=100,escaped=2")
    assert a.threshold == 2.5 and a.escaped == 2
    assert a.miss.value == pytest.approx(0.02 * 1000 / (0.02 * 1000 + 40))
