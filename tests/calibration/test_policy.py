"""Recalibration policy: evidence minimum, hysteresis, exact max step, dry run, rollback."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ngcal.calibration import estimate, policy
from ngcal.core.scoresets import ScoreSet
from ngcal.core.thresholds import ThresholdFile

NOW = "2026-01-01T00:00:00+00:00"


def _threshold(value: float, version: int = 1) -> ThresholdFile:
    return ThresholdFile(value=value, version=version, mode="fixed", method="test", created_at=NOW)


def _set(source: str, x: np.ndarray, severity: float | None = None) -> ScoreSet:
    ids = tuple(f"{source}/{i}" for i in range(x.size))
    return ScoreSet(source=source, scores=x, item_ids=ids, severity=severity)  # type: ignore[arg-type]


def _evidence(seed: int, n_real: int, shift: float = 0.0) -> list[ScoreSet]:
    rng = np.random.default_rng(seed)
    return [
        _set("normal_loo", rng.normal(shift, 1.0, 200)),
        _set("glass_feature", rng.normal(shift + 3.0, 1.0, 100), 1.0),
        _set("real_ng", rng.normal(shift + 2.5, 1.0, n_real)),
    ]


@settings(max_examples=60, deadline=None)
@given(
    old=st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_subnormal=False),
    proposed=st.floats(min_value=-1e7, max_value=1e7, allow_nan=False),
    max_step=st.floats(min_value=0.0, max_value=2.0),
)
def test_clamp_never_exceeds_max_step(old: float, proposed: float, max_step: float) -> None:
    """|clamp - old| <= max_step*|old| exactly in floats, and the clamp moves towards proposed."""
    v = policy.clamp_step(old, proposed, max_step)
    assert abs(v - old) <= max_step * abs(old)
    assert (v - old) * (proposed - old) >= 0
    if abs(proposed - old) <= max_step * abs(old):
        assert v == proposed


@settings(max_examples=25, deadline=None)
@given(
    start=st.floats(min_value=0.05, max_value=50.0),
    shift=st.floats(min_value=-3.0, max_value=3.0),
    max_step=st.floats(min_value=0.001, max_value=0.5),
    seed=st.integers(0, 1000),
)
def test_recalibrate_never_moves_further_than_max_step(
    start: float, shift: float, max_step: float, seed: int
) -> None:
    """Applied recalibrations move by at most max_step * |current|, however far the proposal."""
    state = policy.PolicyState.initial(_threshold(start))
    # the cost-gain check is off here: this test is about the step limit alone
    cfg = policy.PolicyConfig(max_step=max_step, hysteresis=0.0, n_boot=0, gain_level=0.0)
    for i in range(3):
        d = policy.recalibrate(state, _evidence(seed + i, 4, shift), cfg, actor="t", now=NOW)
        assert d.applied, d.reason
        new = d.new_state.current
        assert abs(new.value - state.current.value) <= max_step * abs(state.current.value)
        assert new.version == state.current.version + 1
        assert new.parent_version == state.current.version
        state = d.new_state


@settings(max_examples=30, deadline=None)
@given(values=st.lists(st.floats(0.01, 100.0), min_size=2, max_size=6), pick=st.integers(0, 5))
def test_rollback_restores_the_exact_value(values: list[float], pick: int) -> None:
    """Rolling back to any earlier version restores its value bit for bit as a new version."""
    state = policy.PolicyState.initial(_threshold(values[0]))
    for i, v in enumerate(values[1:], start=2):
        t = _threshold(v, version=i)
        state = policy.PolicyState(current=t, history=(*state.history, t))
    target = state.history[pick % (len(values) - 1)]  # never the current one
    d = policy.rollback(state, target.version, actor="op", now=NOW)
    assert d.applied
    cur = d.new_state.current
    assert cur.value == target.value
    assert cur.version == len(values) + 1
    assert cur.parent_version == target.version
    assert d.new_state.history[:-1] == state.history  # append-only


def test_rollback_unknown_version_is_refused() -> None:
    """An unknown version gives a refused decision (no exception) and leaves the state."""
    state = policy.PolicyState.initial(_threshold(1.0))
    d = policy.rollback(state, 7, actor="op", now=NOW)
    assert not d.applied and d.outcome == "refused" and "unknown version 7" in d.reason
    assert d.new_state is state and d.audit["applied"] is False


def test_insufficient_real_ng_is_refused(simulated: Callable[..., list[ScoreSet]]) -> None:
    """Fewer real NG than min_real_ng: refused, nothing calibrated, reason names the counts."""
    state = policy.PolicyState.initial(_threshold(2.0))
    d = policy.recalibrate(state, simulated(n_real=2), policy.PolicyConfig(), actor="a", now=NOW)
    assert not d.applied and d.proposed is None
    assert "2 real NG (need 3)" in d.reason


def test_hysteresis_blocks_small_moves(simulated: Callable[..., list[ScoreSet]]) -> None:
    """A proposal within hysteresis of the current value is not applied."""
    ev = simulated(n_real=5)
    cfg = policy.PolicyConfig(n_boot=0)
    proposal = estimate.calibrate(ev, mode="cost", n_boot=0)
    state = policy.PolicyState.initial(_threshold(proposal.value * 1.001))
    d = policy.recalibrate(state, ev, cfg, actor="a", now=NOW)
    assert not d.applied and d.outcome == "unchanged" and "hysteresis" in d.reason
    assert d.proposed is not None


def test_dry_run_computes_but_does_not_apply(simulated: Callable[..., list[ScoreSet]]) -> None:
    """Dry run: same proposal and audited new value, state unchanged, applied False."""
    state = policy.PolicyState.initial(_threshold(10.0))
    cfg = policy.PolicyConfig(dry_run=True, n_boot=0)
    d = policy.recalibrate(state, simulated(n_real=5), cfg, actor="a", now=NOW)
    assert not d.applied and d.outcome == "dry_run" and d.new_state is state
    assert d.audit["dry_run"] is True and d.audit["new_value"] == 9.0  # clamped 10%


def test_state_and_audit_round_trip_through_json(simulated: Callable[..., list[ScoreSet]]) -> None:
    """State JSON parses back to an equal state; the audit entry is JSON-serialisable."""
    state = policy.PolicyState.initial(_threshold(3.0))
    d = policy.recalibrate(
        state, simulated(n_real=4), policy.PolicyConfig(n_boot=0), actor="a", now=NOW
    )
    assert d.applied
    text = json.dumps(d.new_state.to_json())
    assert policy.PolicyState.from_json(json.loads(text)) == d.new_state
    audit = json.loads(json.dumps(d.audit))
    assert audit["evidence"]["real_ng"] == 4 and audit["old_version"] == 1
    assert audit["new_version"] == 2 and audit["actor"] == "a"


def test_evidence_from_another_model_is_refused() -> None:
    """Score sets naming a different model sha256 than the current threshold are refused."""
    t = _threshold(1.0).model_copy(update={"model_sha256": "a" * 64})
    ev = _evidence(0, 5)
    ev[0] = ScoreSet(
        source="normal_loo", scores=ev[0].scores, item_ids=ev[0].item_ids, model_sha256="b" * 64
    )
    d = policy.recalibrate(
        policy.PolicyState.initial(t), ev, policy.PolicyConfig(n_boot=0), actor="a", now=NOW
    )
    assert not d.applied and d.outcome == "refused" and "another model" in d.reason


def test_growing_evidence_from_an_unchanged_line_does_not_make_the_threshold_swing() -> None:
    """The truth never changes and the threshold starts near its optimum; evidence grows
    by 3 confirmed NG and 30 good parts per round, as on a line. With the cost-gain check
    the threshold moves at most once in 12 rounds (five seeds); without it (any move above
    the hysteresis) it flip-flops on the flat cost curve."""

    def moves(seed: int, gain_level: float) -> int:
        rng = np.random.default_rng(seed)
        normal, syn = rng.normal(0.0, 1.0, 300), rng.normal(3.0, 1.0, 100)
        real, good = rng.normal(3.0, 1.0, 36), rng.normal(0.0, 1.0, 360)
        state = policy.PolicyState.initial(_threshold(2.0))
        cfg = policy.PolicyConfig(min_real_ng=1, max_step=0.5, n_boot=0, gain_level=gain_level)
        n = 0
        for i in range(1, 13):
            ev = [
                _set("normal_loo", normal),
                _set("glass_feature", syn, 1.0),
                _set("real_ng", real[: 3 * i]),
                _set("real_ok", good[: 30 * i]),
            ]
            d = policy.recalibrate(state, ev, cfg, actor="t", now=NOW)
            n += d.applied
            state = d.new_state
        return n

    assert all(moves(seed, 0.9) <= 1 for seed in range(5))
    assert sum(moves(seed, 0.0) for seed in range(5)) >= 15


def test_clear_cost_gain_is_applied() -> None:
    """A threshold far inside the normal scores: moving up saves many false rejects surely."""
    ev = _evidence(1, 6)
    cfg = policy.PolicyConfig(min_real_ng=1, hysteresis=0.0, max_step=0.5, n_boot=0)
    d = policy.recalibrate(policy.PolicyState.initial(_threshold(1.0)), ev, cfg, actor="t", now=NOW)
    assert d.outcome == "applied", d.reason
    g = policy.cost_gain(ev, 1.0, d.new_state.current.value, cfg)
    assert g.low > 0.0 and g.mean > g.low
