"""Chunked-matmul nearest-neighbour search against torch.cdist."""

from __future__ import annotations

import pytest
import torch

from ngcal.patchcore.nn_search import (  # noqa: E402
    factored_flops,
    gemm_blocks,
    gemm_operand,
    knn_bank,
    nearest,
    nearest_cdist,
    nearest_distance,
    nearest_distance_gemm,
    nearest_distance_levels,
    nearest_gemm,
    squared_norms,
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


@pytest.mark.parametrize("chunk", [7, 64, 1024])
def test_operand_search_finds_the_same_rows_as_the_bank_search(chunk: int) -> None:
    """The model's form (``gemm_operand``, norms inside the GEMM) and fitting's (raw bank,
    norms as bias) give the same nearest rows and distances (1e-4), as cdist does."""
    g = torch.Generator().manual_seed(6)
    bank = torch.randn(300, 24, generator=g) * 3
    q = torch.randn(100, 24, generator=g) * 3
    d, i = nearest_gemm(q, gemm_operand(bank), chunk=chunk)
    db, ib = nearest(q, bank, chunk=chunk)
    assert torch.equal(i, ib) and torch.equal(i, nearest_cdist(q, bank)[1])
    assert torch.allclose(d, db, atol=1e-4)


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


def _levels(n: int, sizes: list[tuple[int, int, int]], seed: int) -> list[torch.Tensor]:
    """Random feature levels [n, D_l, h_l, w_l] (NCHW, channels-last memory like the backbone's)."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, d, h, w, generator=g) * 2).contiguous(memory_format=torch.channels_last)
        for d, h, w in sizes
    ]


def _concat(levels: list[torch.Tensor]) -> torch.Tensor:
    """PatchEmbedder's concatenation: coarser levels upsampled bilinearly to the finest grid."""
    size = levels[0].shape[-2:]
    ups = [levels[0]] + [
        torch.nn.functional.interpolate(lv, size=size, mode="bilinear", align_corners=False)
        for lv in levels[1:]
    ]
    return torch.cat(ups, dim=1).permute(0, 2, 3, 1)


@pytest.mark.parametrize(
    ("sizes", "chunk"),
    [
        ([(5, 16, 16), (7, 8, 8)], 7),  # two levels, stride ratio 2, chunks not dividing M
        ([(5, 16, 16), (7, 8, 8)], 1000),  # one chunk
        ([(4, 12, 12), (3, 6, 6), (6, 3, 3)], 33),  # three levels (ratios 2 and 4)
        ([(6, 10, 10)], 64),  # a single level: the fine GEMM alone
    ],
)
def test_level_search_matches_cdist_on_the_concatenated_features(
    sizes: list[tuple[int, int, int]], chunk: int
) -> None:
    """Searching per level (coarse products upsampled) gives cdist's distances on the
    concatenated, upsampled features, for a batch of 3 images."""
    levels = _levels(3, sizes, seed=len(sizes) + chunk)
    feats = _concat(levels)
    q = feats.reshape(-1, feats.shape[-1])
    g = torch.Generator().manual_seed(9)
    bank = torch.cat([q[::7] + 0.3 * torch.randn(q[::7].shape, generator=g), q[1::11]])
    blocks = gemm_blocks(gemm_operand(bank), chunk)
    assert blocks.shape[0] == -(-bank.shape[0] // chunk)  # the last block padded
    got = nearest_distance_levels(
        [lv.permute(0, 2, 3, 1) for lv in levels], blocks, squared_norms(q)
    )
    ref = torch.cdist(q.double(), bank.double()).amin(dim=1).float()
    assert got.shape == (q.shape[0],)
    away = torch.ones(q.shape[0], dtype=torch.bool)
    away[1::11] = False  # queries that are bank rows: ~0, where fp32 rounding is sqrt-amplified
    assert torch.allclose(got[away], ref[away], atol=1e-4)
    assert torch.allclose(got[away], nearest_cdist(q, bank)[0][away], atol=1e-4)
    assert torch.all(got[~away] < 1e-2) and not torch.isnan(got).any()


@pytest.mark.parametrize(("rows", "chunk"), [(61, 16), (64, 16), (61, 100)])
def test_traceable_level_search_equals_the_eager_one(rows: int, chunk: int) -> None:
    """The export's form (functional ops, integer Resize scales, last block cut to the bank's
    real rows) returns the eager form's distances, padded last block or not."""
    levels = [lv.permute(0, 2, 3, 1) for lv in _levels(2, [(5, 8, 8), (7, 4, 4)], seed=rows)]
    feats = _concat([lv.permute(0, 3, 1, 2) for lv in levels])
    q = feats.reshape(-1, feats.shape[-1])
    g = torch.Generator().manual_seed(chunk)
    bank = q[torch.randperm(q.shape[0], generator=g)[:rows]] + 0.5
    blocks = gemm_blocks(gemm_operand(bank), chunk)
    eager = nearest_distance_levels(levels, blocks, squared_norms(q))
    traced = nearest_distance_levels(levels, blocks, squared_norms(q), rows=rows, traceable=True)
    assert torch.allclose(traced, eager, atol=1e-5)
    assert torch.allclose(traced, nearest_cdist(q, bank)[0], atol=1e-4)


def test_factored_flops_counts_multiply_adds() -> None:
    """Lite0's two levels (40 ch at 32x32, 112 at 16x16): the factored search needs 45%."""
    direct, factored = factored_flops([(32, 32), (16, 16)], [40, 112])
    assert direct == 1024 * 153
    assert factored == 1024 * 41 + 256 * 112
    assert 0.44 < factored / direct < 0.46
