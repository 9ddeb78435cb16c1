"""Exact nearest-neighbour search of patch features in a memory bank by chunked matmul.

Squared Euclidean distances are expanded as ``||a||^2 - 2 a.b + ||b||^2`` (one GEMM per
bank chunk), clamped at 0, reduced to the minimum over the bank, and only the minima get a
square root. This is the export-safe formulation anomalib also uses: no ``cdist``, no
data-dependent control flow (the chunk loop depends only on the bank size, a constant of
the exported graph), so it traces into ONNX opset 17 as MatMul/ReduceMin/ArgMin.
"""

from __future__ import annotations

import torch

#: Bank rows per GEMM: keeps the [P, chunk] distance block in cache-friendly sizes.
DEFAULT_CHUNK = 1024


def squared_norms(x: torch.Tensor) -> torch.Tensor:
    """Row-wise squared L2 norms: [..., D] -> [...]."""
    return (x * x).sum(dim=-1)


def nearest(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_sq: torch.Tensor | None = None,
    *,
    chunk: int = DEFAULT_CHUNK,
    exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance to, and index of, the nearest bank row for each query.

    queries [P, D], bank [M, D], bank_sq [M] (precomputed ``squared_norms(bank)``);
    ``exclude`` optional bool [M]: rows never returned (leave-one-out).
    Returns (distance float [P] in feature units, index int64 [P]).
    """
    if bank_sq is None:
        bank_sq = squared_norms(bank)
    if exclude is not None:
        bank_sq = bank_sq.masked_fill(exclude, float("inf"))  # excluded rows: infinitely far
    m = bank.shape[0]
    mins: list[torch.Tensor] = []
    args: list[torch.Tensor] = []
    for start in range(0, m, chunk):
        stop = min(start + chunk, m)
        # ||b||^2 - 2 a.b per block; ||a||^2 is constant per query, added after the min.
        d2 = torch.addmm(bank_sq[None, start:stop], queries, bank[start:stop].t(), alpha=-2.0)
        v, i = d2.min(dim=1)
        mins.append(v)
        args.append(i + start)
    if len(mins) == 1:
        best, idx = mins[0], args[0]
    else:
        stacked = torch.stack(mins, dim=0)
        best, which = stacked.min(dim=0)
        idx = torch.gather(torch.stack(args, dim=0), 0, which[None, :])[0]
    return (best + squared_norms(queries)).clamp_min(0.0).sqrt(), idx


def knn_bank(bank: torch.Tensor, k: int, *, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Indices of the ``k`` nearest rows of each bank row (itself first): int64 [M, k]."""
    m = bank.shape[0]
    k = min(k, m)
    sq = squared_norms(bank)
    out = torch.empty(m, k, dtype=torch.long)
    for start in range(0, m, chunk):
        stop = min(start + chunk, m)
        d2 = torch.addmm(sq[None, :], bank[start:stop], bank.t(), alpha=-2.0) + sq[start:stop, None]
        rows = torch.arange(start, stop)
        d2[rows - start, rows] = -1.0  # itself first, regardless of rounding
        out[start:stop] = d2.topk(k, dim=1, largest=False).indices
    return out


def nearest_cdist(queries: torch.Tensor, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference search with ``torch.cdist`` over the whole bank (benchmarks and tests only)."""
    d = torch.cdist(queries[None], bank[None])[0]
    v, i = d.min(dim=1)
    return v, i
