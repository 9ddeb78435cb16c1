"""The quality gate every diffusion NG candidate goes through; each check recorded per candidate.

Checks (names as recorded in ``index.json``):

- ``background``: no pixel outside the target mask changed (exact: backends composite).
- ``drawn``: the mean grey-level change inside the mask is at least ``min_change``; of the
  candidates of one target the passing one *least* like the good image is kept (DefectFill's
  low-fidelity selection, Song et al. CVPR 2025).
- ``label_iou``: the label mask is re-derived from the actual change (smoothed absolute grey
  difference above ``change_tau``) and its IoU with the target must reach ``min_iou``.
- ``seam``: the mean grey step across the mask boundary over the larger of the mean steps
  inside the mask and in a ring outside it; at most the product's own limit (the real NG's
  own ratio of that group times ``seam_margin``, never below ``max_seam``).
- ``near_copy``: the painted crop's mean grey distance inside the mask to every training
  crop under its 8 flips/rotations is at least ``min_copy_distance``.
- ``feature``: in the product's own backbone features (PatchCore's embedder), the defect
  cells are nearer to the real NG's defect cells than the same cells of the good image were,
  or as near to them as the real NG of that type are to each other (leave-one-out over the
  given real NG; with one real NG only the first test). Not applicable without a model or
  real NG. The first test alone rejected 10 of 24 held-out real NG of the demo product (a
  real NG against its own mask re-filled with good texture): with two references, a type's
  real defects often lie farther from the references than the good surface does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GateConfig:
    """Limits of the gate's checks (grey levels are 0-255)."""

    min_change: float = 6.0
    change_tau: float = 6.0
    min_iou: float = 0.3
    max_seam: float = 2.5
    seam_margin: float = 1.25
    min_copy_distance: float = 3.0


@dataclass(frozen=True)
class Check:
    """One check's figure, its limit and whether it passed (``passed`` None: not applicable)."""

    name: str
    value: float | None
    limit: float | None
    passed: bool | None

    def as_dict(self) -> dict[str, object]:
        return {"value": self.value, "limit": self.limit, "passed": self.passed}


def grey(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB [..., 3] -> float64 luminance [...] (ITU-R 601)."""
    x = rgb.astype(np.float64)
    out: np.ndarray = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
    return out


def _box3(a: np.ndarray) -> np.ndarray:
    p = np.pad(a, 1, mode="edge")
    h, w = a.shape
    out = np.zeros((h, w), dtype=np.float64)
    for dy in range(3):
        for dx in range(3):
            out += p[dy : dy + h, dx : dx + w]
    return out / 9.0


def _dilate(m: np.ndarray, n: int) -> np.ndarray:
    out: np.ndarray = m.copy()
    for _ in range(n):
        p = np.pad(out, 1, constant_values=False)
        out = out | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    return out


def check_background(good: np.ndarray, ng: np.ndarray, target: np.ndarray) -> Check:
    """Largest absolute change of any channel outside ``target``; passes only at 0."""
    outside = ~target
    diff = np.abs(good.astype(np.int16) - ng.astype(np.int16))[outside]
    worst = float(diff.max()) if diff.size else 0.0
    return Check("background", worst, 0.0, worst == 0.0)


def check_drawn(good: np.ndarray, ng: np.ndarray, target: np.ndarray, cfg: GateConfig) -> Check:
    """Mean absolute grey change inside ``target``."""
    change = float(np.abs(grey(ng) - grey(good))[target].mean()) if target.any() else 0.0
    return Check("drawn", change, cfg.min_change, change >= cfg.min_change)


def derived_mask(good: np.ndarray, ng: np.ndarray, target: np.ndarray, tau: float) -> np.ndarray:
    """The label from the actual change: 3x3-smoothed |grey difference| > ``tau``, in ``target``."""
    out: np.ndarray = (_box3(np.abs(grey(ng) - grey(good))) > tau) & target
    return out


def check_label(derived: np.ndarray, target: np.ndarray, cfg: GateConfig) -> Check:
    """IoU of the derived label with the target."""
    union = int((derived | target).sum())
    iou = float((derived & target).sum() / union) if union else 0.0
    return Check("label_iou", iou, cfg.min_iou, iou >= cfg.min_iou)


def seam_ratio(image: np.ndarray, mask: np.ndarray, ring: int = 3) -> float:
    """Mean grey step across the boundary of ``mask`` over the larger of the mean steps inside
    it and in a ``ring``-pixel band outside it (1 = no visible boundary; +1 grey level in the
    denominator keeps flat images finite)."""
    g = grey(image)
    near = _dilate(mask, ring)
    cross, inner, outer = [], [], []
    whole, head, tail = slice(None), slice(1, None), slice(None, -1)
    for sa, sb in (((whole, head), (whole, tail)), ((head, whole), (tail, whole))):
        a, b = mask[sa], mask[sb]
        d = np.abs(g[sa] - g[sb])
        cross.append(d[a != b])
        inner.append(d[a & b])
        outer.append(d[~a & ~b & near[sa] & near[sb]])
    c, i, o = (np.concatenate(x) for x in (cross, inner, outer))
    if c.size == 0:
        return 0.0
    ref = max(float(i.mean()) if i.size else 0.0, float(o.mean()) if o.size else 0.0)
    return float(c.mean()) / (ref + 1.0)


def seam_limit(references: Sequence[tuple[np.ndarray, np.ndarray]], cfg: GateConfig) -> float:
    """The seam limit of a group: its real NG's own boundary ratio x margin, at least the floor."""
    ratios = [seam_ratio(img, m) for img, m in references]
    return max([cfg.max_seam] + [r * cfg.seam_margin for r in ratios])


def check_seam(ng: np.ndarray, target: np.ndarray, limit: float) -> Check:
    """The candidate's boundary ratio against the group's limit."""
    r = seam_ratio(ng, target)
    return Check("seam", r, limit, r <= limit)


def copy_distance(crop: np.ndarray, mask: np.ndarray, training: Sequence[np.ndarray]) -> float:
    """Smallest mean grey distance inside ``mask`` between ``crop`` and any training crop
    under any of its 8 flips/rotations (all uint8 RGB [C, C, 3])."""
    g = grey(crop)[mask]
    best = np.inf
    for t in training:
        tg = grey(t)
        for k in range(8):
            v = np.rot90(tg[:, ::-1] if k >= 4 else tg, k % 4)
            if v.shape == mask.shape:
                best = min(best, float(np.abs(v[mask] - g).mean()))
    return float(best)


def check_copy(
    crop: np.ndarray, mask: np.ndarray, training: Sequence[np.ndarray], cfg: GateConfig
) -> Check:
    """Near-copy check (not applicable without training crops, e.g. the zero-NG mode)."""
    if not training or not mask.any():
        return Check("near_copy", None, cfg.min_copy_distance, None)
    d = copy_distance(crop, mask, training)
    return Check("near_copy", d, cfg.min_copy_distance, d >= cfg.min_copy_distance)


def nn_median(query: np.ndarray, bank: np.ndarray) -> float:
    """Median over ``query`` rows [n, D] of the Euclidean distance to the nearest ``bank`` row."""
    q = query.astype(np.float64)
    b = bank.astype(np.float64)
    d2 = (q * q).sum(1)[:, None] - 2 * q @ b.T + (b * b).sum(1)[None, :]
    return float(np.median(np.sqrt(np.maximum(d2.min(axis=1), 0.0))))


def loo_spread(per_ref: Sequence[np.ndarray]) -> float | None:
    """How far a real NG's defect cells lie from the other real NG of its type: the largest,
    over the references, leave-one-out ``nn_median`` of one reference's cells [n_i, D] to the
    others' (None with fewer than two references)."""
    if len(per_ref) < 2:
        return None
    out = []
    for i, q in enumerate(per_ref):
        others = np.concatenate([b for j, b in enumerate(per_ref) if j != i])
        out.append(nn_median(q, others))
    return float(max(out))


def check_feature(d_ng: float | None, d_good: float | None, spread: float | None = None) -> Check:
    """Defect cells nearer to the real NG's than the good image's same cells were, or within
    the real NG's own leave-one-out ``spread`` (as near to them as they are to each other)."""
    if d_ng is None or d_good is None:
        return Check("feature", d_ng, d_good, None)
    limit = d_good if spread is None else max(d_good, spread)
    ok = d_ng < d_good or (spread is not None and d_ng <= spread)
    return Check("feature", d_ng, limit, ok)


def verdict(checks: Sequence[Check]) -> tuple[bool, list[str]]:
    """Accepted when no applicable check failed; the names of the failed ones."""
    failed = [c.name for c in checks if c.passed is False]
    return not failed, failed
