"""Exact nearest-neighbour search of patch features in a memory bank by chunked matmul.

Squared Euclidean distances are expanded as ``||a||^2 - 2 a.b + ||b||^2`` (one GEMM per
bank chunk), clamped at 0, reduced to the minimum over the bank, and only the minima get a
square root. This is the export-safe formulation anomalib also uses: no ``cdist``, no
data-dependent control flow (the chunk loop depends only on the bank size, a constant of
the exported graph), so it traces into ONNX opset 17 as MatMul/ReduceMin/ArgMin.

Exact search cannot beat one fp32 GEMM over the bank by much on CPU; what was measured
(1024 patches x 6831 x 152 bank of the magnetic-tile model, 1 thread) and left out:

* pruning by a PCA lower bound (top 48 of 152 components plus the residual norm): 26
  candidates per patch on average, 157 at p99; the two bound passes cost more than saved;
* triangle-inequality pruning with bank-to-bank distances: useless at 152 dimensions
  (after the nearest row, 3800 of 6831 rows survive on median);
* an int8 candidate pass (``torch._int_mm``, AVX512-VNNI: 7.4 ms against 18.5 ms for the
  fp32 GEMM) with a Cauchy-Schwarz error bound and an exact fp32 re-check of the
  candidates (28 per patch; exact to 2e-6): the full-size passes over the [P, M] block
  (max, compare, nonzero) and the gather brought it to 52 ms in torch eager;
* bf16: 3.9x faster GEMM on CPUs with AVX512-BF16, 3.3x slower on those without.
What did pay: no argmin when the image score rule needs none (``nearest_distance``), and
the bank's squared norms inside the GEMM operand (``gemm_operand``): about 2x together.

The ceiling, measured (``benchmarks/detection.py``: ``cdist_over_gemm_only``): default
``torch.cdist`` itself costs only ~2.0x the search's one GEMM alone (1024 x 6831 x 153,
no reduction), so no exact fp32 matmul search can be 3x faster than it on such a CPU;
that takes fewer FLOPs (a fused int8 pass with exact re-check) or lower-precision
hardware. Bounds for an exact top-k-only image score were measured too: PCA bounds at 48
of 152 dimensions leave 90% of patches as top-10 candidates (the patch distances within
an image spread less than the bounds' gap).
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
    Returns (distance float [P] in feature units, index int64 [P]). When the index is not
    needed, ``nearest_distance`` is the same minimum at about half the cost: torch's
    ``min(dim)`` with indices is a much slower reduction than ``amin`` on CPU.
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


def nearest_distance(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_sq: torch.Tensor | None = None,
    *,
    chunk: int = DEFAULT_CHUNK,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """Distance [P] from each query to its nearest bank row (the values of ``nearest``)."""
    if bank_sq is None:
        bank_sq = squared_norms(bank)
    if exclude is not None:
        bank_sq = bank_sq.masked_fill(exclude, float("inf"))
    m = bank.shape[0]
    mins = [
        torch.addmm(
            bank_sq[None, start : min(start + chunk, m)],
            queries,
            bank[start : min(start + chunk, m)].t(),
            alpha=-2.0,
        ).amin(dim=1)
        for start in range(0, m, chunk)
    ]
    best = mins[0] if len(mins) == 1 else torch.stack(mins, dim=1).amin(dim=1)
    return (best + squared_norms(queries)).clamp_min(0.0).sqrt()


def gemm_operand(bank: torch.Tensor, bank_sq: torch.Tensor | None = None) -> torch.Tensor:
    """The bank as one GEMM operand [D + 1, M]: ``-2 bank^T`` with ``||bank||^2`` as a last row.

    ``[q, 1] @ operand`` is ``||b||^2 - 2 q.b`` for every bank row b in ONE matmul: the
    squared norms ride in the product instead of a separate broadcast-add pass over the
    [P, M] block (measured ~20% faster than ``addmm`` with a bias, in torch and
    onnxruntime on this project's 2-core CPU; ``benchmarks/detection.py``).
    """
    if bank_sq is None:
        bank_sq = squared_norms(bank)
    return torch.cat([-2.0 * bank, bank_sq[:, None]], dim=1).t().contiguous()


def nearest_distance_gemm(
    queries: torch.Tensor, operand: torch.Tensor, *, chunk: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """``nearest_distance`` over a precomputed ``gemm_operand``: distance [P] to the nearest row."""
    qa = torch.cat([queries, torch.ones_like(queries[:, :1])], dim=1)
    m = operand.shape[1]
    mins = [
        torch.matmul(qa, operand[:, start : min(start + chunk, m)]).amin(dim=1)
        for start in range(0, m, chunk)
    ]
    best = mins[0] if len(mins) == 1 else torch.stack(mins, dim=1).amin(dim=1)
    return (best + squared_norms(queries)).clamp_min(0.0).sqrt()


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
