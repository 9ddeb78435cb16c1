"""Approximate greedy k-center coreset selection, several runs in lockstep.

The greedy k-center (Sener & Savarese, ICLR 2018; Sinha et al., 2020) picks each next
point as the one farthest from everything picked so far; PatchCore (Roth et al., CVPR 2022,
sec. 3.2) runs it on features randomly projected to a low dimension (Johnson-Lindenstrauss)
to subsample the memory bank while keeping its coverage.

Speed on CPU comes from three choices (figures in docs/decisions/0007):
* squared distances to the new centre come from one GEMM against an augmented matrix
  ``[z; ||z||^2; 1]`` (no separate norm passes), stored [d + 2, N] so the GEMM streams it;
* the running minimum is updated in place, and the argmax is two-stage (``amax`` per block
  of 4096, then ``argmax`` inside the winning block);
* several independent runs (the full bank and the cross-fitting fold banks) share each
  pass over the matrix: a run only sees its eligible points (others start at -inf).
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

_BLOCK = 4096


@dataclass(frozen=True)
class CoresetRun:
    """One selection: ``size`` points among rows where ``eligible`` (bool [N]) is True."""

    size: int
    eligible: torch.Tensor | None = None


def random_projection(dim_in: int, dim_out: int, seed: int) -> torch.Tensor:
    """Gaussian Johnson-Lindenstrauss matrix [dim_in, dim_out], scaled by 1/sqrt(dim_out)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(dim_in, dim_out, generator=g) / math.sqrt(dim_out)


def project(features: torch.Tensor, proj_dim: int | None, seed: int) -> torch.Tensor:
    """Features [N, D] -> [N, d] float32 (unchanged when ``proj_dim`` is None or >= D)."""
    x = features.float()
    if proj_dim is None or proj_dim >= x.shape[1]:
        return x
    r = random_projection(x.shape[1], proj_dim, seed)
    out = torch.empty(x.shape[0], proj_dim)
    step = 65536
    for s in range(0, x.shape[0], step):
        torch.mm(x[s : s + step], r, out=out[s : s + step])
    return out


def greedy_coresets(
    features: torch.Tensor,
    runs: Sequence[CoresetRun],
    *,
    proj_dim: int | None = 32,
    seed: int = 0,
    progress: bool = False,
) -> list[torch.Tensor]:
    """Greedy k-center selections for every run; returns int64 index tensors into ``features``.

    features [N, D]. Each run starts from a random eligible point (seeded) and then adds the
    eligible point with the largest distance to its nearest selected point (ties: lowest
    index), in the (optionally) projected space.
    """
    n = features.shape[0]
    if n == 0 or not runs:
        return [torch.zeros(0, dtype=torch.long) for _ in runs]
    z = project(features, proj_dim, seed)
    d = z.shape[1]
    npad = -(-n // _BLOCK) * _BLOCK
    xa = torch.zeros(d + 2, npad)
    xa[:d, :n] = z.t()
    xa[d, :n] = (z * z).sum(1)
    xa[d + 1, :n] = 1.0
    zsq = xa[d, :n]

    k = len(runs)
    sizes = []
    mind = torch.full((k, npad), float("-inf"))
    g = torch.Generator().manual_seed(seed)
    first = torch.empty(k, dtype=torch.long)
    for r, run in enumerate(runs):
        elig = torch.ones(n, dtype=torch.bool) if run.eligible is None else run.eligible.bool()
        if elig.shape != (n,):
            raise ValueError(f"run {r}: eligible mask has shape {tuple(elig.shape)}, want ({n},)")
        count = int(elig.sum())
        sizes.append(min(int(run.size), count))
        mind[r, :n].masked_fill_(elig, float("inf"))
        cand = torch.nonzero(elig)[:, 0]
        first[r] = cand[torch.randint(len(cand), (1,), generator=g)] if count else 0

    selected: list[list[int]] = [[] for _ in runs]
    active = [r for r in range(k) if sizes[r] > 0]
    mind = mind[active].contiguous()
    cur = first[active]
    total = max(sizes)
    bar = _progress(total, progress)
    coeff = torch.empty(len(active), d + 2)
    for step in range(total):
        for j, r in enumerate(active):
            selected[r].append(int(cur[j]))
        done = [j for j, r in enumerate(active) if len(selected[r]) >= sizes[r]]
        if done:
            keep = [j for j in range(len(active)) if j not in done]
            active = [active[j] for j in keep]
            if not active:
                bar.update(1)
                break
            mind = mind[keep].contiguous()
            cur = cur[keep]
            coeff = torch.empty(len(active), d + 2)
        # distance^2 = ||x||^2 - 2 x.c + ||c||^2 = [x, ||x||^2, 1] . [-2c, 1, ||c||^2]
        torch.mul(z[cur], -2.0, out=coeff[:, :d])
        coeff[:, d] = 1.0
        coeff[:, d + 1] = zsq[cur]
        dist = torch.mm(coeff, xa)
        torch.minimum(mind, dist, out=mind)
        blocks = mind.view(len(active), -1, _BLOCK)
        best_block = blocks.amax(dim=2).argmax(dim=1)
        rows = torch.arange(len(active))
        inner = blocks[rows, best_block].argmax(dim=1)
        cur = best_block * _BLOCK + inner
        if step % 64 == 0:
            bar.update(min(64, total - step))
    bar.close()
    return [torch.tensor(s, dtype=torch.long) for s in selected]


def greedy_coreset(
    features: torch.Tensor,
    size: int,
    *,
    proj_dim: int | None = 32,
    seed: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """One greedy k-center selection of ``size`` rows of ``features`` [N, D]: int64 [size]."""
    return greedy_coresets(
        features, [CoresetRun(size)], proj_dim=proj_dim, seed=seed, progress=progress
    )[0]


def coverage_radius(features: torch.Tensor, selected: torch.Tensor) -> float:
    """Largest distance from any row of ``features`` to its nearest selected row."""
    from .nn_search import nearest_distance

    bank = features[selected].float()
    worst = 0.0
    for s in range(0, features.shape[0], 16384):
        dist = nearest_distance(features[s : s + 16384].float(), bank)
        worst = max(worst, float(dist.max()))
    return worst


class _NullBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool) -> _NullBar:
    if not enabled:
        return _NullBar()
    from tqdm import tqdm

    bar: _NullBar = tqdm(total=total, desc="coreset", unit="pt", file=sys.stderr, mininterval=1.0)
    return bar
