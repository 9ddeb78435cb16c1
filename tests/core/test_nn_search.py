"""Chunked-matmul nearest-neighbour search against torch.cdist."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from ngcal.core.patchcore.nn_search import (  # noqa: E402
    gemm_operand,
    knn_bank,
    nearest,
    nearest_cdist,
    nearest_distance,
    nearest_distance_gemm,
)

pytestmark = pytest.mark.torch


@pytest.mark.parametrize("chunk", [7, 64, 1024])
def test_nearest_matches_cdist(chunk: int) -> None:
    """Distances agree with cdist to 1e-4 and the argmin is the same row, for any chunking."""
    g = torch.Generator().manual_seed(1)
    bank = torch.randn(300, 24, generator=g) * 3
    q = torch.randn(100, 24, generator=g) * 3
    d, i = nearest(q, bank, chunk=chunk)
    dr, ir = nearest_cdist(q, bank)
    assert torch.allclose(d, dr, atol=1e-4)
    assert torch.equal(i, ir)


@pytest.mark.parametrize("chunk", [7, 64, 1024])
def test_nearest_distance_equals_nearest(chunk: int) -> None:
    """The index-free searches (addmm, and one GEMM over ``gemm_operand``) return the same
    minima as ``nearest`` and cdist (1e-4), and ~0 (never NaN) for a query in the bank."""
    g = torch.Generator().manual_seed(5)
    bank = torch.randn(300, 24, generator=g) * 3
    q = torch.randn(100, 24, generator=g) * 3
    d = nearest_distance(q, bank, chunk=chunk)
    assert torch.allclose(d, nearest(q, bank, chunk=chunk)[0], atol=1e-5)
    assert torch.allclose(d, nearest_cdist(q, bank)[0], atol=1e-4)
    dg = nearest_distance_gemm(q, gemm_operand(bank), chunk=chunk)
    assert torch.allclose(dg, d, atol=1e-4)
    for hits in (
        nearest_distance(bank[[3, 17]], bank, chunk=chunk),
        nearest_distance_gemm(bank[[3, 17]], gemm_operand(bank), chunk=chunk),
    ):
        assert torch.all(hits < 1e-2) and not torch.isnan(hits).any()


def test_nearest_exact_hit_is_zero() -> None:
    """A query equal to a bank row has distance ~0 (clamped, never NaN) and finds that row."""
    g = torch.Generator().manual_seed(2)
    bank = torch.randn(50, 8, generator=g) * 10
    d, i = nearest(bank[[3, 17]], bank, chunk=16)
    assert torch.all(d < 1e-2) and not torch.isnan(d).any()
    assert i.tolist() == [3, 17]


def test_exclude_never_returns_excluded_rows() -> None:
    """With rows excluded, both searches equal cdist over the remaining rows."""
    g = torch.Generator().manual_seed(3)
    bank = torch.randn(200, 16, generator=g)
    q = bank[:20] + 0.01 * torch.randn(20, 16, generator=g)
    excl = torch.zeros(200, dtype=torch.bool)
    excl[:20] = True
    d, i = nearest(q, bank, exclude=excl, chunk=50)
    dr, ir = nearest_cdist(q, bank[20:])
    assert torch.equal(i, ir + 20)
    assert torch.allclose(d, dr, atol=1e-4)
    assert torch.allclose(nearest_distance(q, bank, exclude=excl, chunk=50), dr, atol=1e-4)
    assert float(dr.min()) > 0.1  # its own (excluded) rows are ~0.01 away


def test_knn_bank_itself_first_then_sorted() -> None:
    """Each row's neighbour list starts with itself and then follows cdist order."""
    g = torch.Generator().manual_seed(4)
    bank = torch.randn(120, 10, generator=g)
    nb = knn_bank(bank, 5, chunk=32)
    assert nb[:, 0].tolist() == list(range(120))
    ref = torch.cdist(bank, bank).topk(5, dim=1, largest=False).indices
    assert torch.equal(nb[:, 1:], ref[:, 1:])
