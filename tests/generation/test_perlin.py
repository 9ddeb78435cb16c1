"""Perlin noise and GLASS anomaly masks: shapes, determinism, pooling, foreground."""

from __future__ import annotations

import numpy as np
import pytest

from ngcal.core.errors import ConfigError
from ngcal.generation.perlin import (
    perlin_2d,
    perlin_mask,
    pool_to_grid,
)


def test_perlin_noise_is_bounded_and_deterministic() -> None:
    """Same seed -> identical noise, bounded within [-1.5, 1.5]; any shape works."""
    a = perlin_2d((37, 53), (4, 8), np.random.default_rng(3))
    b = perlin_2d((37, 53), (4, 8), np.random.default_rng(3))
    c = perlin_2d((37, 53), (4, 8), np.random.default_rng(4))
    assert a.shape == (37, 53)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.abs(a).max() < 1.5
    assert a.std() > 0.05


def test_pool_to_grid_marks_cells_with_any_pixel() -> None:
    """A single set pixel marks exactly its cell in the max-pooled grid."""
    m = np.zeros((64, 64), dtype=bool)
    m[17, 40] = True
    cells = pool_to_grid(m, (8, 8))
    assert cells.sum() == 1 and cells[2, 5]


@pytest.mark.parametrize("mode", ["union", "intersection", "single"])
def test_perlin_mask_non_empty_and_pooled(mode: str) -> None:
    """Every mode yields a non-empty pixel mask whose pooled cells cover every set pixel."""
    rng = np.random.default_rng(0)
    am = perlin_mask((64, 64), (8, 8), rng, mode=mode)  # type: ignore[arg-type]
    assert am.pixels.dtype == bool and am.pixels.any()
    assert am.mode == mode
    ys, xs = np.nonzero(am.pixels)
    assert am.cells[ys // 8, xs // 8].all()
    assert np.array_equal(am.cells, pool_to_grid(am.pixels, (8, 8)))


def test_perlin_mask_respects_foreground() -> None:
    """No anomaly pixel falls outside the foreground; an empty foreground is an error."""
    fg = np.zeros((64, 64), dtype=bool)
    fg[:, :32] = True
    for seed in range(5):
        am = perlin_mask((64, 64), (8, 8), np.random.default_rng(seed), foreground=fg)
        assert not (am.pixels & ~fg).any()
    with pytest.raises(ConfigError):
        perlin_mask(
            (64, 64),
            (8, 8),
            np.random.default_rng(0),
            foreground=np.zeros((64, 64), bool),
            max_tries=3,
        )


def test_modes_are_all_drawn() -> None:
    """Without a forced mode, union, intersection and single all occur (about 1/3 each)."""
    rng = np.random.default_rng(1)
    modes = {perlin_mask((32, 32), (4, 4), rng).mode for _ in range(30)}
    assert modes == {"union", "intersection", "single"}
