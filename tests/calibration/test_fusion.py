"""Fusion: synthetic weight n0/(n0+k) and severity matching by mixture EM."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ngcal.calibration import fusion
from ngcal.core.errors import ConfigError
from ngcal.core.scoresets import ScoreSet


@given(n0=st.floats(0.1, 50.0), k=st.integers(0, 1000))
def test_synthetic_weight_decreases_with_real_ng(n0: float, k: int) -> None:
    """w_syn = n0/(n0+k): 1 at k=0, 1/2 at k=n0, monotone decreasing."""
    w = fusion.synthetic_weight(k, n0)
    assert np.isclose(w, n0 / (n0 + k))
    assert fusion.synthetic_weight(k + 1, n0) < w
    assert fusion.synthetic_weight(0, n0) == 1.0


def test_severity_matching_prefers_the_matching_component() -> None:
    """Real NG drawn like severity 2 pull the mixture weight to severity 2."""
    rng = np.random.default_rng(0)
    comps = [rng.normal(2, 0.5, 300), rng.normal(5, 0.5, 300), rng.normal(8, 0.5, 300)]
    w0 = fusion.severity_weights(comps, np.zeros(0))
    assert np.allclose(w0, 1 / 3)
    w = fusion.severity_weights(comps, rng.normal(5, 0.5, 5))
    assert np.argmax(w) == 1 and w[1] > 0.6
    assert np.isclose(w.sum(), 1.0) and np.all(w > 0)  # the prior keeps every component


def test_fuse_weights_real_and_synthetic(simulated: Callable[..., list[ScoreSet]]) -> None:
    """With k real NG, real items weigh k/(n0+k) in total and the rest is synthetic."""
    ev = fusion.fuse(simulated(n_real=6), prior_pseudo_count=2.0)
    assert ev.n_real_ng == 6 and np.isclose(ev.synthetic_weight, 0.25)
    y, w = ev.ng.flat()
    assert np.isclose(w.sum(), 1.0)
    assert np.isclose(ev.ng.weights[-1], 0.75)  # the real group
    assert np.isclose(sum(ev.components.values()), 0.25)
    assert ev.normal.size == 500


def test_weakest_required_severity(simulated: Callable[..., list[ScoreSet]]) -> None:
    """The weakest required severity is the lowest at or above the request."""
    sets = simulated()
    assert fusion.weakest_required(sets, 1.5) == 2.0
    assert fusion.weakest_required(sets, 0.0) == 1.0
    assert fusion.weakest_required(sets, 3.0) is None


def test_negative_pseudo_count_is_a_config_error() -> None:
    """A negative prior is a ConfigError naming the value (inside NgcalError)."""
    with pytest.raises(ConfigError, match="-1"):
        fusion.synthetic_weight(3, -1.0)
