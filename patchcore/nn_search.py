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

Default ``torch.cdist`` itself costs only ~2.0x one GEMM over the whole feature width
(``benchmarks/detection.py``: ``cdist_over_gemm_only``), so beating it by 3x takes fewer
FLOPs, exactly: ``nearest_distance_levels`` uses the structure of the patch features.
Their coarse levels are bilinear upsamplings of maps with 4x fewer positions, and
upsampling is linear, so the coarse products are computed at the coarse positions and the
product maps upsampled (45% of the multiply-adds for Lite0; ~1.5x faster than the direct
GEMM here, exact to fp32 rounding). ``PatchCore.forward`` uses it; features without that
structure (a projection mixes the levels) use the direct search.
Bounds for an exact top-k-only image score were measured too: PCA bounds at 48 of 152
dimensions leave 90% of patches as top-10 candidates (the patch distances within an
image spread less than the bounds' gap). Also measured for the per-level search and left
out: bank rows as the GEMM's row axis with a hand-written separable upsampling (15 ms
against 10.7 ms: torch's NCHW bilinear kernel is ~10x slower over 256 maps, and the
strided element-wise ops cost more than they save) and ``torch.compile`` fusing the
upsampling, the add and the minimum (12.8 ms, after a 20 s compile). Its time is the two
GEMMs (~75%, at ~120-150 GFLOP/s), the upsampling (~20%) and the row minima (~7%).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: The kernel ``F.interpolate(mode="bilinear")`` runs, with an output argument.
_upsample_bilinear_out = torch.ops.aten.upsample_bilinear2d.out

#: Bank rows per GEMM: keeps the [P, chunk] distance block in cache-friendly sizes.
DEFAULT_CHUNK = 1024
#: Bank rows per step of ``nearest_distance_levels`` (measured best of 256..1024, 1 thread).
LEVELS_CHUNK = 256


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
    """The bank as one GEMM operand [1 + D, M]: ``||bank||^2`` as a first row over ``-2 bank^T``.

    ``[1, q] @ operand`` is ``||b||^2 - 2 q.b`` for every bank row b in ONE matmul: the
    squared norms ride in the product instead of a separate broadcast-add pass over the
    [P, M] block (measured ~20% faster than ``addmm`` with a bias, in torch and
    onnxruntime on this project's 2-core CPU; ``benchmarks/detection.py``). Rows
    ``1 + a .. 1 + b`` are ``-2`` times the bank's feature columns ``a .. b``, which the
    factored search (``nearest_distance_levels``) uses per feature level.
    """
    if bank_sq is None:
        bank_sq = squared_norms(bank)
    return torch.cat([bank_sq[:, None], -2.0 * bank], dim=1).t().contiguous()


def nearest_distance_gemm(
    queries: torch.Tensor, operand: torch.Tensor, *, chunk: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """``nearest_distance`` over a precomputed ``gemm_operand``: distance [P] to the nearest row."""
    qa = torch.cat([torch.ones_like(queries[:, :1]), queries], dim=1)
    m = operand.shape[1]
    mins = [
        torch.matmul(qa, operand[:, start : min(start + chunk, m)]).amin(dim=1)
        for start in range(0, m, chunk)
    ]
    best = mins[0] if len(mins) == 1 else torch.stack(mins, dim=1).amin(dim=1)
    return (best + squared_norms(queries)).clamp_min(0.0).sqrt()


def factored_flops(grids: Sequence[tuple[int, int]], dims: Sequence[int]) -> tuple[int, int]:
    """Multiply-adds per bank row and image of the direct and the factored search:
    (P * (1 + D), P * (1 + D_0) + sum_l P_l * D_l), P_l = h_l * w_l of level l."""
    p = grids[0][0] * grids[0][1]
    direct = p * (1 + sum(dims))
    coarse = zip(grids[1:], dims[1:], strict=True)
    factored = p * (1 + dims[0]) + sum(h * w * d for (h, w), d in coarse)
    return direct, factored


def gemm_blocks(operand: torch.Tensor, chunk: int = LEVELS_CHUNK) -> torch.Tensor:
    """``gemm_operand`` cut into contiguous bank blocks [ceil(M / chunk), 1 + D, chunk]; the
    last block is padded with columns whose norm row is +inf (and features 0), so they are
    never the nearest. Contiguous blocks measured ~9% faster than strided chunk views."""
    rows, m = operand.shape
    nb = -(-m // chunk)
    padded = torch.zeros(rows, nb * chunk, dtype=operand.dtype, device=operand.device)
    padded[0] = float("inf")
    padded[:, :m] = operand
    return padded.view(rows, nb, chunk).permute(1, 0, 2).contiguous()


def nearest_distance_levels(
    levels: Sequence[torch.Tensor], blocks: torch.Tensor, queries_sq: torch.Tensor
) -> torch.Tensor:
    """``nearest_distance`` for patch features built from feature levels, without building
    the products at the upsampled positions: distance [N * h * w] to the nearest bank row.

    levels[0] [N, h, w, D_0] is the patch grid; levels[l > 0] [N, h_l, w_l, D_l] are
    coarser maps that enter each patch feature bilinearly upsampled to (h, w)
    (``align_corners=False``), concatenated in this order (``PatchEmbedder``). Upsampling
    is linear, so ``up(c) . b = up(c . b)``: the coarse products are computed at the
    h_l * w_l coarse positions and the [h_l, w_l] product maps upsampled (channels
    last, the fast layout for torch's CPU kernel), then the fine GEMM accumulates into them
    (``addmm_``). For Lite0 (40 channels at stride 8, 112 at 16) that is 45% of the direct
    GEMM's multiply-adds. ``blocks`` is ``gemm_blocks(gemm_operand(bank))``; ``queries_sq``
    [N * h * w] the squared norms of the concatenated features. Exact up to fp32 rounding
    (tests: against float64 ``torch.cdist``).
    """
    n, h, w, d0 = levels[0].shape
    p = n * h * w
    chunk = blocks.shape[2]
    fine = levels[0].reshape(p, d0)
    qa = torch.cat([torch.ones_like(fine[:, :1]), fine], dim=1)
    offsets = [1 + d0]
    for lv in levels[1:]:
        offsets.append(offsets[-1] + lv.shape[-1])
    coarse = [lv.reshape(-1, lv.shape[-1]) for lv in levels[1:]]
    # buffers reused across blocks: fresh multi-MB tensors per block cost page faults that
    # measured as much as the upsampling itself
    acc = torch.empty(p, chunk, dtype=fine.dtype, device=fine.device)
    acc_nchw = acc.view(n, h, w, chunk).permute(0, 3, 1, 2)  # channels last
    mins = torch.empty(blocks.shape[0], p, dtype=fine.dtype, device=fine.device)
    for i in range(blocks.shape[0]):
        if not coarse:
            acc.zero_()
        for li, c in enumerate(coarse):
            hl, wl = levels[li + 1].shape[1:3]
            prod = torch.mm(c, blocks[i, offsets[li] : offsets[li + 1]])
            maps = prod.view(n, hl, wl, chunk).permute(0, 3, 1, 2)  # channels last
            if li == 0:  # straight into the accumulator (F.interpolate's kernel, out=)
                _upsample_bilinear_out(maps, [h, w], False, None, None, out=acc_nchw)
            else:
                up = F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False)
                acc.add_(up.permute(0, 2, 3, 1).reshape(p, chunk))
        acc.addmm_(qa, blocks[i, : 1 + d0])
        torch.amin(acc, dim=1, out=mins[i])
    best = mins.amin(dim=0)
    return (best + queries_sq).clamp_min(0.0).sqrt()


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
