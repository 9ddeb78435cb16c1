"""A part mask over the patch grid, learnt from good images alone.

Where a part lies on a background (a dark table, a conveyor belt), the background's own
variation (dust, glare, texture of the belt) raises patch distances that no threshold
should count, and dilutes the part in top-k image scores. ``PartMaskLearner`` decides per
position of the model input whether it shows the part, from the training images'
own statistics, with no labels:

1. each model input is area-averaged to twice the patch grid and smoothed (3x3), so pixel
   noise of the background averages out;
2. the background's appearance is the median colour of the frame's outer ring (two cells
   wide: a part may touch the border, the median ignores it up to half the ring);
3. each position's distance to that colour is split in two by Otsu's threshold (Otsu,
   "A threshold selection method from gray-level histograms", IEEE SMC 1979); Otsu's
   effectiveness ``eta`` (between-class over total variance) measures how clearly the
   image splits: about 0.64 for a unimodal Gaussian, near 1 for a part on a plain
   background;
4. a position is part when it is part in at least ``min_share`` of the images (a part
   that moves a little keeps its whole range; rare clutter in the background does not);
5. on the patch grid a position is part when any of its cells is, then the mask grows by
   one patch in every direction (edges of the part stay in).

``PartMask.problem`` rejects a mask that is not a segmentation (mean ``eta`` below
``MIN_CONTRAST``) or is degenerate (part share outside ``COVERAGE``): a full-frame texture
such as a tile surface gives an unclear split, which is either near-everything or
near-nothing, and keeps the whole frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

#: a mask is kept only when its part covers this share of the patch grid (inclusive)
COVERAGE = (0.2, 0.99)
#: mean Otsu effectiveness below which the images do not split into part and background
MIN_CONTRAST = 0.8
#: a position is part when it is part in at least this share of the training images
MIN_SHARE = 0.25
#: width in cells (of the twice-the-grid map) of the frame ring taken as background
RING = 2
#: thresholds Otsu tries between each image's smallest and largest distance
OTSU_LEVELS = 63


@dataclass(frozen=True)
class PartMask:
    """A learnt part mask: ``grid`` float32 [h, w] (1 part, 0 background: the patch scores'
    mask), ``fine`` bool [2h, 2w] (the part before growing: where probe defects go),
    ``coverage`` (share of grid positions that are part) and ``contrast`` (mean Otsu
    effectiveness over the images)."""

    grid: np.ndarray
    fine: np.ndarray
    coverage: float
    contrast: float

    def problem(self) -> str | None:
        """Why this mask must not be used (a sentence), or None when it may be."""
        lo, hi = COVERAGE
        if self.contrast < MIN_CONTRAST:
            return (
                f"no clear part/background split (Otsu effectiveness {self.contrast:.2f} "
                f"< {MIN_CONTRAST})"
            )
        if not lo <= self.coverage <= hi:
            return (
                f"degenerate: part covers {self.coverage:.0%} of the frame (not {lo:.0%}-{hi:.0%})"
            )
        return None

    def allowed(self, hw: tuple[int, int]) -> torch.Tensor:
        """bool [H, W]: ``fine`` at the input size (nearest), where defects may be drawn."""
        f = torch.from_numpy(self.fine.astype(np.float32))[None, None]
        return F.interpolate(f, size=hw, mode="nearest")[0, 0] > 0.5


def otsu(d: torch.Tensor, levels: int = OTSU_LEVELS) -> tuple[torch.Tensor, torch.Tensor]:
    """Otsu's threshold of each row of ``d`` [n, K] and its effectiveness (between-class
    over total variance, 0 for a constant row): ([n], [n])."""
    lo, hi = d.min(dim=1, keepdim=True).values, d.max(dim=1, keepdim=True).values
    frac = torch.arange(1, levels + 1, dtype=d.dtype) / (levels + 1)
    t = lo + (hi - lo) * frac[None]  # [n, L]
    below = (d[:, None, :] <= t[:, :, None]).to(d.dtype)  # [n, L, K]
    k = d.shape[1]
    n0 = below.sum(-1)
    n1 = k - n0
    s0 = (below * d[:, None, :]).sum(-1)
    s1 = d.sum(dim=1, keepdim=True) - s0
    mu0 = s0 / n0.clamp_min(1)
    mu1 = s1 / n1.clamp_min(1)
    between = (n0 / k) * (n1 / k) * (mu0 - mu1) ** 2  # [n, L]
    best, at = between.max(dim=1)
    total = d.var(dim=1, unbiased=False)
    eta = torch.where(total > 0, best / total.clamp_min(1e-12), torch.zeros_like(total))
    return t.gather(1, at[:, None])[:, 0], eta


def part_maps(x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image part maps bool [n, 2h, 2w] and Otsu effectiveness [n] of model inputs
    ``x`` [n, 3, H, W] (steps 1-3 of the module docstring)."""
    h2, w2 = 2 * grid[0], 2 * grid[1]
    s = F.adaptive_avg_pool2d(x.float(), (h2, w2))
    s = F.avg_pool2d(s, 3, stride=1, padding=1, count_include_pad=False)
    ring = torch.ones(h2, w2, dtype=torch.bool)
    ring[RING:-RING, RING:-RING] = False
    ref = s[:, :, ring].median(dim=2).values  # [n, 3]
    d = torch.linalg.vector_norm(s - ref[:, :, None, None], dim=1)  # [n, h2, w2]
    flat = d.reshape(d.shape[0], -1)
    t, eta = otsu(flat)
    return (flat > t[:, None]).reshape(d.shape), eta


class PartMaskLearner:
    """Accumulates part maps over batches of model inputs (``add``), then ``mask()``."""

    def __init__(self, grid: tuple[int, int], *, min_share: float = MIN_SHARE) -> None:
        self.grid = (int(grid[0]), int(grid[1]))
        self.min_share = float(min_share)
        self._count = torch.zeros(2 * self.grid[0], 2 * self.grid[1])
        self._eta: list[float] = []

    def add(self, x: torch.Tensor) -> None:
        """Take the model inputs ``x`` [n, 3, H, W] of n training images into account."""
        maps, eta = part_maps(x, self.grid)
        self._count += maps.float().sum(dim=0)
        self._eta.extend(eta.tolist())

    def mask(self) -> PartMask:
        """The part mask of the images added so far (ValueError before any)."""
        if not self._eta:
            raise ValueError("no images added")
        fine = self._count / len(self._eta) >= self.min_share
        cells = F.max_pool2d(fine.float()[None, None], 2)  # any part cell -> part patch
        grown = F.max_pool2d(cells, 3, stride=1, padding=1)[0, 0]
        return PartMask(
            grid=grown.numpy().astype(np.float32),
            fine=fine.numpy(),
            coverage=float(grown.mean()),
            contrast=float(np.mean(self._eta)),
        )
