"""Greedy k-center coreset: the fast lockstep version against a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ngcal.patchcore.coreset import (  # noqa: E402
    CoresetRun,
    coverage_radius,
    greedy_coreset,
    greedy_coresets,
    project,
)

pytestmark = pytest.mark.torch


def brute_force_greedy(x: np.ndarray, size: int, first: int) -> list[int]:
    """Textbook greedy k-center in float64: add the point farthest from the selection."""
    sel = [first]
    mind = ((x - x[first]) ** 2).sum(1)
    while len(sel) < size:
        i = int(np.argmax(mind))
        sel.append(i)
        mind = np.minimum(mind, ((x - x[i]) ** 2).sum(1))
    return sel


def test_matches_brute_force_without_projection() -> None:
    """Without projection the selection is identical to the float64 brute-force greedy."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 12, generator=g)  # > one 4096 block, so the two-stage argmax is used
    sel = greedy_coreset(x, 60, proj_dim=None, seed=7)
    ref = brute_force_greedy(x.double().numpy(), 60, int(sel[0]))
    assert sel.tolist() == ref


def test_matches_brute_force_in_projected_space() -> None:
    """With projection, the selection is the brute-force greedy on the projected features."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 40, generator=g)
    sel = greedy_coreset(x, 40, proj_dim=8, seed=3)
    z = project(x, 8, 3).double().numpy()
    assert sel.tolist() == brute_force_greedy(z, 40, int(sel[0]))


def test_lockstep_runs_equal_separate_runs_and_respect_eligibility() -> None:
    """Several runs in one pass give the same selections as separate runs on the subsets."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2000, 10, generator=g)
    elig = torch.rand(2000, generator=g) < 0.6
    full, part = greedy_coresets(x, [CoresetRun(50), CoresetRun(30, elig)], proj_dim=None, seed=5)
    assert len(full) == 50 and len(part) == 30
    assert bool(elig[part].all())
    sub_idx = torch.nonzero(elig)[:, 0]
    ref = brute_force_greedy(
        x[sub_idx].double().numpy(), 30, int((sub_idx == part[0]).nonzero()[0])
    )
    assert part.tolist() == sub_idx[ref].tolist()
    assert full.tolist() == brute_force_greedy(x.double().numpy(), 50, int(full[0]))


def test_greedy_covers_better_than_random() -> None:
    """The greedy coverage radius is smaller than that of a random subset of the same size."""
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(3000, 6, generator=g), 8 + torch.randn(30, 6, generator=g)])
    sel = greedy_coreset(x, 40, proj_dim=None, seed=0)
    rnd = torch.randperm(x.shape[0], generator=g)[:40]
    assert coverage_radius(x, sel) < coverage_radius(x, rnd)


def test_size_larger_than_eligible_is_capped() -> None:
    """Asking for more points than eligible returns each eligible point once."""
    x = torch.randn(20, 3)
    elig = torch.zeros(20, dtype=torch.bool)
    elig[:5] = True
    (sel,) = greedy_coresets(x, [CoresetRun(10, elig)], proj_dim=None)
    assert sorted(sel.tolist()) == [0, 1, 2, 3, 4]
