"""Exact nearest-neighbour search of patch features in a memory bank by chunked matmul.

One rule: per bank chunk a block of ``||b||^2 - 2 q.b`` from one GEMM, its minimum over
the bank, then ``||q||^2`` added (it is constant along the bank), clamped at 0, and a
square root of the minima only. The block comes from ``[1, q] @ gemm_operand(bank)`` (the
norms ride inside the GEMM: the model and the export) or, from a raw bank, a GEMM with
the norms as bias (fitting's leave-one-out, which excludes other rows on every call). No
``cdist`` and no data-dependent control flow (the chunk loop depends only on the bank
size), so the same functions run in torch eager, in fitting and inside the ONNX trace.
``nearest_distance_levels`` computes the same search per feature level (fewer
multiply-adds where coarse levels are upsampled maps). Why exact search in a dense GEMM
and not pruning, int8 or an index: ``docs/decisions/0001`` and ``0002``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

#: The kernel ``F.interpolate(mode="bilinear")`` runs, with an output argument.
_upsample_bilinear_out = torch.ops.aten.upsample_bilinear2d.out

#: Bank rows per GEMM: keeps the [P, chunk] distance block in cache-friendly sizes.
DEFAULT_CHUNK = 1024
#: Bank rows per step of ``nearest_distance_levels`` (``docs/decisions/0002``).
LEVELS_CHUNK = 256


def squared_norms(x: torch.Tensor) -> torch.Tensor:
    """Row-wise squared L2 norms: [..., D] -> [...]."""
    return (x * x).sum(dim=-1)


def gemm_operand(bank: torch.Tensor, bank_sq: torch.Tensor | None = None) -> torch.Tensor:
    """The bank as one GEMM operand [1 + D, M]: ``||bank||^2`` as a first row over ``-2 bank^T``.

    ``[1, q] @ operand`` is ``||b||^2 - 2 q.b`` for every bank row b in ONE matmul, with no
    separate bias pass over the [P, M] block. A column whose norm is +inf is never the
    nearest (``exclude``, the padding of ``gemm_blocks``). Rows ``1 + a .. 1 + b`` are
    ``-2`` times the bank's feature columns ``a .. b``, which the per-level search uses.
    """
    if bank_sq is None:
        bank_sq = squared_norms(bank)
    return torch.cat([bank_sq[:, None], -2.0 * bank], dim=1).t().contiguous()


def gemm_blocks(operand: torch.Tensor, chunk: int = LEVELS_CHUNK) -> torch.Tensor:
    """``gemm_operand`` cut into contiguous bank blocks [ceil(M / chunk), 1 + D, chunk]; the
    last block is padded with columns whose norm row is +inf (and features 0), so they are
    never the nearest. Contiguous blocks beat strided chunk views (``docs/decisions/0002``)."""
    rows, m = operand.shape
    nb = -(-m // chunk)
    padded = torch.zeros(rows, nb * chunk, dtype=operand.dtype, device=operand.device)
    padded[0] = float("inf")
    padded[:, :m] = operand
    return padded.view(rows, nb, chunk).permute(1, 0, 2).contiguous()


def _augmented(queries: torch.Tensor) -> torch.Tensor:
    """[P, D] -> [P, 1 + D]: a column of ones before the features (``gemm_operand``'s row 0)."""
    return torch.cat([torch.ones_like(queries[:, :1]), queries], dim=1)


#: Per bank chunk: (first bank row, ``||b||^2 - 2 q.b`` block [P, <= chunk]).
Blocks = Iterator[tuple[int, torch.Tensor]]


def _operand_blocks(queries: torch.Tensor, operand: torch.Tensor, chunk: int) -> Blocks:
    """The blocks as ONE MatMul per chunk of ``[1, q]`` with ``gemm_operand`` columns."""
    qa = _augmented(queries)
    m = int(operand.shape[1])
    for start in range(0, m, chunk):
        yield start, torch.matmul(qa, operand[:, start : min(start + chunk, m)])


def _bank_blocks(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_sq: torch.Tensor | None,
    exclude: torch.Tensor | None,
    chunk: int,
) -> Blocks:
    """The blocks from a raw bank [M, D], the norms as the GEMM's bias: no operand to build
    per call (leave-one-out calls once per image, each with its own ``exclude``)."""
    if bank_sq is None:
        bank_sq = squared_norms(bank)
    if exclude is not None:
        bank_sq = bank_sq.masked_fill(exclude, float("inf"))  # excluded rows: infinitely far
    m = int(bank.shape[0])
    for start in range(0, m, chunk):
        stop = min(start + chunk, m)
        yield (
            start,
            torch.addmm(bank_sq[None, start:stop], queries, bank[start:stop].t(), alpha=-2.0),
        )


def _distance(partial_min: torch.Tensor, queries_sq: torch.Tensor) -> torch.Tensor:
    """Euclidean distance from ``min_b ||b||^2 - 2 q.b`` and ``||q||^2``, clamped at 0."""
    return (partial_min + queries_sq).clamp_min(0.0).sqrt()


def _min_over(mins: list[torch.Tensor]) -> torch.Tensor:
    """Element-wise minimum of per-chunk minima [P] (one chunk: itself, no extra op)."""
    return mins[0] if len(mins) == 1 else torch.stack(mins, dim=1).amin(dim=1)


def _nearest_distance(blocks: Blocks, queries: torch.Tensor) -> torch.Tensor:
    """Distance [P] to the nearest bank row: ``amin`` per block, minimum over blocks."""
    return _distance(_min_over([d2.amin(dim=1) for _, d2 in blocks]), squared_norms(queries))


def _nearest(blocks: Blocks, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance [P], index int64 [P]) of the nearest bank row over the blocks."""
    mins: list[torch.Tensor] = []
    args: list[torch.Tensor] = []
    for start, d2 in blocks:
        v, i = d2.min(dim=1)
        mins.append(v)
        args.append(i + start)
    if len(mins) == 1:
        best, idx = mins[0], args[0]
    else:
        best, which = torch.stack(mins, dim=1).min(dim=1)
        idx = torch.gather(torch.stack(args, dim=1), 1, which[:, None])[:, 0]
    return _distance(best, squared_norms(queries)), idx


def nearest_distance_gemm(
    queries: torch.Tensor, operand: torch.Tensor, *, chunk: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """Distance [P] from each query [P, D] to its nearest column of ``operand``
    (``gemm_operand(bank)``): about half the cost of ``nearest_gemm`` (torch's
    ``min(dim)`` with indices is a much slower reduction than ``amin`` on CPU)."""
    return _nearest_distance(_operand_blocks(queries, operand, chunk), queries)


def nearest_gemm(
    queries: torch.Tensor, operand: torch.Tensor, *, chunk: int = DEFAULT_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """``nearest_distance_gemm`` and the index of the nearest bank row: (distance float
    [P], index int64 [P]); for the score rules that read the nearest row."""
    return _nearest(_operand_blocks(queries, operand, chunk), queries)


def nearest(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_sq: torch.Tensor | None = None,
    *,
    chunk: int = DEFAULT_CHUNK,
    exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``nearest_gemm`` over a raw bank [M, D] (``bank_sq`` [M]: its precomputed squared
    norms); ``exclude`` optional bool [M]: rows never returned (leave-one-out)."""
    return _nearest(_bank_blocks(queries, bank, bank_sq, exclude, chunk), queries)


def nearest_distance(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_sq: torch.Tensor | None = None,
    *,
    chunk: int = DEFAULT_CHUNK,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """``nearest_distance_gemm`` over a raw bank [M, D], with ``nearest``'s ``exclude``."""
    return _nearest_distance(_bank_blocks(queries, bank, bank_sq, exclude, chunk), queries)


def factored_flops(grids: Sequence[tuple[int, int]], dims: Sequence[int]) -> tuple[int, int]:
    """Multiply-adds per bank row and image of the direct and the factored search:
    (P * (1 + D), P * (1 + D_0) + sum_l P_l * D_l), P_l = h_l * w_l of level l."""
    p = grids[0][0] * grids[0][1]
    direct = p * (1 + sum(dims))
    coarse = zip(grids[1:], dims[1:], strict=True)
    factored = p * (1 + dims[0]) + sum(h * w * d for (h, w), d in coarse)
    return direct, factored


def nearest_distance_levels(
    levels: Sequence[torch.Tensor],
    blocks: torch.Tensor,
    queries_sq: torch.Tensor,
    *,
    rows: int | None = None,
    traceable: bool = False,
) -> torch.Tensor:
    """``nearest_distance`` for patch features built from feature levels, without building
    the products at the upsampled positions: distance [N * h * w] to the nearest bank row.

    levels[0] [N, h, w, D_0] is the patch grid; levels[l > 0] [N, h_l, w_l, D_l] are
    coarser maps that enter each patch feature bilinearly upsampled to (h, w)
    (``align_corners=False``), concatenated in this order (``PatchEmbedder``). Upsampling
    is linear, so ``up(c) . b = up(c . b)``: the coarse products are computed at the
    coarse positions, the [h_l, w_l] product maps upsampled (bank rows as the last,
    channels-last axis) and the fine GEMM accumulates onto them. ``blocks`` is
    ``gemm_blocks(gemm_operand(bank))``; ``queries_sq`` [N * h * w] the squared norms of
    the concatenated features. Exact up to fp32 rounding (tests: float64 ``cdist``).

    ``traceable=False`` (torch eager) reuses one accumulator across blocks and upsamples
    into it (``out=``). ``traceable=True`` is the same arithmetic for the ONNX trace:
    functional ops, a dynamic batch, integer Resize scales (every h_l must divide h, w_l
    w) and, with ``rows`` (the bank size M), the last block cut to its real columns.
    """
    h, w, d0 = (int(s) for s in levels[0].shape[1:])
    fine = _augmented(levels[0].reshape(-1, d0))
    bounds = [1 + d0]
    for lv in levels[1:]:
        bounds.append(bounds[-1] + int(lv.shape[-1]))
    # per coarse level: features [N * h_l * w_l, D_l], h_l, w_l, its operand rows a:b
    coarse = [
        _Coarse(lv.reshape(-1, int(lv.shape[-1])), int(lv.shape[1]), int(lv.shape[2]), a, b)
        for lv, a, b in zip(levels[1:], bounds[:-1], bounds[1:], strict=True)
    ]
    if traceable:
        best = _levels_traceable(fine, coarse, blocks, (h, w), rows)
    else:
        best = _levels_eager(fine, coarse, blocks, (int(levels[0].shape[0]), h, w))
    return _distance(best, queries_sq)


class _Coarse(NamedTuple):
    """One coarse level of ``nearest_distance_levels``."""

    feats: torch.Tensor
    h: int
    w: int
    a: int
    b: int


def _levels_traceable(
    fine: torch.Tensor,
    coarse: list[_Coarse],
    blocks: torch.Tensor,
    grid: tuple[int, int],
    rows: int | None,
) -> torch.Tensor:
    """Minima [P] of the per-level blocks with functional ops only (the ONNX trace)."""
    (h, w), d0 = grid, int(fine.shape[1]) - 1
    nb, chunk = int(blocks.shape[0]), int(blocks.shape[2])
    mins: list[torch.Tensor] = []
    for i in range(nb):
        cols = chunk if rows is None else min(chunk, rows - i * chunk)
        block = blocks[i, :, :cols]
        up_sum: torch.Tensor | None = None
        for c in coarse:
            maps = torch.matmul(c.feats, block[c.a : c.b]).reshape(-1, c.h, c.w, cols)
            up = F.interpolate(
                maps.permute(0, 3, 1, 2),
                scale_factor=(float(h // c.h), float(w // c.w)),
                mode="bilinear",
                align_corners=False,
                recompute_scale_factor=False,
            )
            up = up.permute(0, 2, 3, 1).reshape(-1, cols)
            up_sum = up if up_sum is None else up_sum + up
        fine_op = block[: 1 + d0]
        # the upsampled products as the Gemm's C: no separate Add pass
        prod = torch.matmul(fine, fine_op) if up_sum is None else torch.addmm(up_sum, fine, fine_op)
        mins.append(prod.amin(dim=1))
    return _min_over(mins)


def _levels_eager(
    fine: torch.Tensor, coarse: list[_Coarse], blocks: torch.Tensor, shape: tuple[int, int, int]
) -> torch.Tensor:
    """Minima [P] of the per-level blocks in torch eager: one accumulator reused across
    blocks (fresh multi-MB tensors per block cost page faults), upsampled into (``out=``)."""
    (n, h, w), d0 = shape, int(fine.shape[1]) - 1
    nb, chunk = int(blocks.shape[0]), int(blocks.shape[2])
    p = n * h * w
    acc = torch.empty(p, chunk, dtype=fine.dtype, device=fine.device)
    acc_nchw = acc.view(n, h, w, chunk).permute(0, 3, 1, 2)  # channels last
    block_mins = torch.empty(nb, p, dtype=fine.dtype, device=fine.device)
    for i in range(nb):
        if not coarse:
            acc.zero_()
        for li, c in enumerate(coarse):
            maps = torch.mm(c.feats, blocks[i, c.a : c.b]).view(n, c.h, c.w, chunk)
            maps = maps.permute(0, 3, 1, 2)  # channels last
            if li == 0:  # straight into the accumulator (F.interpolate's kernel, out=)
                _upsample_bilinear_out(maps, [h, w], False, None, None, out=acc_nchw)
            else:
                up = F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False)
                acc.add_(up.permute(0, 2, 3, 1).reshape(p, chunk))
        acc.addmm_(fine, blocks[i, : 1 + d0])
        torch.amin(acc, dim=1, out=block_mins[i])
    return block_mins.amin(dim=0)


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
