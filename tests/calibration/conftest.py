"""Shared fixtures for calibration tests: simulated score sets with known distributions."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from ngcal.core.scoresets import ScoreSet


def make_set(source: str, scores: np.ndarray, severity: float | None = None) -> ScoreSet:
    """A score set with synthetic item ids."""
    x = np.asarray(scores, dtype=np.float64)
    return ScoreSet(
        source=source,  # type: ignore[arg-type]
        scores=x,
        item_ids=tuple(f"{source}/{severity}/{i}" for i in range(x.size)),
        severity=severity,
    )


@pytest.fixture(name="make_set")
def make_set_fixture() -> Callable[..., ScoreSet]:
    """The :func:`make_set` helper as a fixture (conftest cannot be imported by tests)."""
    return make_set


@pytest.fixture
def simulated() -> Callable[..., list[ScoreSet]]:
    """Factory: normal N(0,1) scores, two synthetic severities and optional real NG N(mu,1)."""

    def build(
        *,
        n_normal: int = 500,
        n_syn: int = 200,
        n_real: int = 0,
        real_mu: float = 2.5,
        seed: int = 0,
    ) -> list[ScoreSet]:
        rng = np.random.default_rng(seed)
        sets = [
            make_set("normal_loo", rng.normal(0.0, 1.0, n_normal)),
            make_set("glass_feature", rng.normal(2.0, 1.0, n_syn), 1.0),
            make_set("glass_feature", rng.normal(5.0, 1.0, n_syn), 2.0),
        ]
        if n_real:
            sets.append(make_set("real_ng", rng.normal(real_mu, 1.0, n_real)))
        return sets

    return build
