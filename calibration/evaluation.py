"""Detection figures of a scored test split: image/pixel AUROC, oracle F1, threshold quality.

Torch-free (numpy only), so ``ngcal evaluate`` on an exported bundle runs on an edge box.
Pixel AUROC pools every pixel of every test image (good images contribute all-normal
pixels), computed on maps and masks area-downsampled to ``pixel_size`` for speed; AUPRO
follows Bergmann et al. (MVTec AD, IJCV 2021): mean per-region overlap integrated up to
FPR 0.3, normalised.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ngcal.core.metrics import auroc, expected_cost, f1_max, min_expected_cost, rates_at
from ngcal.core.thresholds import ThresholdFile


def downsample(maps: np.ndarray, size: int) -> np.ndarray:
    """Area-average float maps [N, H, W] to [N, size, size] (H = W a multiple of size, else
    PIL box)."""
    n, s, w = maps.shape
    if s == w == size:
        return maps
    if s == w and s % size == 0:
        f = s // size
        out: np.ndarray = maps.reshape(n, size, f, size, f).mean(axis=(2, 4))
        return out
    out = np.empty((n, size, size), np.float32)
    for i in range(n):  # sizes that do not divide: PIL box filter
        out[i] = np.asarray(Image.fromarray(maps[i]).resize((size, size), Image.Resampling.BOX))
    return out


def load_masks(mask_paths: Sequence[Path | None], size: int) -> np.ndarray:
    """Binary masks [N, size, size]; None (good image or missing mask) means all normal."""
    out = np.zeros((len(mask_paths), size, size), dtype=bool)
    for i, p in enumerate(mask_paths):
        if p is not None:
            with Image.open(p) as im:
                m = im.convert("L").resize((size, size), Image.Resampling.BOX)
            out[i] = np.asarray(m) > 127
    return out


def pixel_auroc(maps: np.ndarray, masks: np.ndarray) -> float | None:
    """AUROC over all pixels; None when there is no anomalous pixel."""
    if not masks.any():
        return None
    return float(auroc(masks.reshape(-1), maps.reshape(-1)))


def aupro(
    maps: np.ndarray, masks: np.ndarray, *, max_fpr: float = 0.3, steps: int = 200
) -> float | None:
    """Area under the per-region-overlap curve up to ``max_fpr``, divided by ``max_fpr``."""
    from scipy import ndimage

    if not masks.any():
        return None
    regions: list[tuple[int, np.ndarray]] = []
    for i in range(masks.shape[0]):
        lab, k = ndimage.label(masks[i])
        regions.extend((i, lab == r) for r in range(1, k + 1))
    normal = maps[~masks]
    thresholds = np.quantile(normal, np.linspace(1.0 - max_fpr, 1.0, steps))
    fpr = np.array([float((normal >= t).mean()) for t in thresholds])
    pro = np.array([np.mean([(maps[i][r] >= t).mean() for i, r in regions]) for t in thresholds])
    order = np.argsort(fpr)
    fpr, pro = fpr[order], pro[order]
    keep = fpr <= max_fpr
    fpr = np.r_[0.0, fpr[keep], max_fpr]
    pro = np.r_[0.0, pro[keep], pro[keep][-1] if keep.any() else 0.0]
    area = float(np.sum(np.diff(fpr) * (pro[1:] + pro[:-1]) / 2.0))
    return area / max_fpr


def image_figures(
    labels: np.ndarray, scores: np.ndarray, thresholds: ThresholdFile | None = None
) -> dict[str, Any]:
    """image_auroc, f1_oracle, threshold_oracle, and threshold quality when a file is given."""
    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    best = f1_max(y, s)
    out: dict[str, Any] = {
        "image_auroc": _num(auroc(y, s)),
        "f1_oracle": _num(best.f1),
        "threshold_oracle": _num(best.threshold),
        "n_test": int(y.size),
        "n_defective": int(y.sum()),
    }
    if thresholds is not None:
        r = rates_at(y, s, thresholds.value)
        out.update(
            threshold=thresholds.value,
            mode=thresholds.mode,
            target_fpr=thresholds.target_fpr,
            fpr=_num(r.fpr),
            fnr=_num(r.fnr),
            f1=_num(r.f1),
            f1_gap=_num(best.f1 - r.f1),
            cost_regret=None,
        )
        op = thresholds.operating_point
        if op is not None:
            cost = expected_cost(r.fpr, r.fnr, prevalence=op.prevalence, cost_ratio=op.cost_ratio)
            oracle, _ = min_expected_cost(y, s, prevalence=op.prevalence, cost_ratio=op.cost_ratio)
            out["cost_regret"] = _num(cost - oracle)
    return out


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)
