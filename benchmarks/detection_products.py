"""Procedural products for the detection benchmark: a part on a cluttered table, and a
long, narrow part.

``make_long_part`` writes a 1:2.5 frame filled by a machined bar (shading, tool marks
across its length, grain) with small, faint defects (radius 3-6 px, scratches 15-35 px
long, contrast 12-30 grey levels, in a 256 x 640 frame): squashed to a square the long
axis shrinks 2.5x and the defects with it.

``make_part_on_table`` writes an MVTec-layout category whose parts do not fill the frame:
a round machined part (the demo product's surface, ``ngcal.generation.demo_data``) lies
on a dark, grainy conveyor belt, its centre jittered by up to 3% of the frame. The belt
carries debris that changes from image to image (bright specks and fibres of random size,
brightness and angle, on most images): normal variation that a whole-frame model scores
as anomalous, the case a part mask is for. Defects are small and on the part only:
``spot`` (dark blob, radius 1.5-3% of the frame), ``scratch`` (thin dark line, 8-18%
long) and ``dent`` (bright-rimmed crater, radius 1.5-3%), at contrasts 20-45 grey levels.
numpy + Pillow, deterministic for a seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ngcal.generation.demo_data import good_surface

DEFECTS = ("spot", "scratch", "dent")
#: part radius as a share of the frame side
RADIUS = 0.3


def _belt(rng: np.random.Generator, size: int) -> np.ndarray:
    """The dark belt with debris: float32 [size, size]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    belt = 35 + rng.normal(0, 10, (size, size)) + 6 * np.sin(2 * np.pi * xx / rng.uniform(9, 13))
    for _ in range(int(rng.integers(0, 5))):
        cy, cx = rng.uniform(0, size, 2)
        level = rng.uniform(90, 230)
        if rng.random() < 0.5:  # a speck
            r = rng.uniform(0.01, 0.035) * size
            belt[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = level
        else:  # a fibre
            a = rng.uniform(0, np.pi)
            length = rng.uniform(0.05, 0.2) * size
            u = (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)
            v = -(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)
            belt[(np.abs(u) < length / 2) & (np.abs(v) < rng.uniform(0.8, 2.0))] = level
    return belt.astype(np.float32)


def _part(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """A good part on the belt: (image float32, part mask bool, centre y, centre x)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = size / 2 + rng.uniform(-0.03, 0.03, 2) * size
    part = (yy - cy) ** 2 + (xx - cx) ** 2 < (RADIUS * size) ** 2
    img = _belt(rng, size)
    img[part] = good_surface(rng, size)[part]
    return img, part, float(cy), float(cx)


def _defect(
    rng: np.random.Generator, img: np.ndarray, part: np.ndarray, cy: float, cx: float, kind: str
) -> tuple[np.ndarray, np.ndarray]:
    """``img`` with one small defect of ``kind`` on the part, and its mask."""
    size = img.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    rr = np.sqrt(rng.uniform(0, 1)) * (RADIUS - 0.06) * size
    a = rng.uniform(0, 2 * np.pi)
    dy, dx = cy + rr * np.sin(a), cx + rr * np.cos(a)
    contrast = rng.uniform(20, 45)
    if kind == "spot":
        r = rng.uniform(0.015, 0.03) * size
        profile = np.exp(-((xx - dx) ** 2 + (yy - dy) ** 2) / (2 * r * r))
        out, mask = img - contrast * profile, profile > 0.3
    elif kind == "scratch":
        t = rng.uniform(0, np.pi)
        length = rng.uniform(0.08, 0.18) * size
        u = (xx - dx) * np.cos(t) + (yy - dy) * np.sin(t)
        v = -(xx - dx) * np.sin(t) + (yy - dy) * np.cos(t)
        w = rng.uniform(1.0, 2.0)
        profile = np.exp(-(v**2) / (2 * w * w)) * (np.abs(u) < length / 2)
        out, mask = img - contrast * profile, profile > 0.2
    else:
        r = rng.uniform(0.015, 0.03) * size
        d = np.sqrt((xx - dx) ** 2 + (yy - dy) ** 2) / r
        profile = -np.exp(-(d**2)) + 0.8 * np.exp(-((d - 1.2) ** 2) / 0.08)
        out, mask = img + contrast * profile, d < 1.4
    return np.where(part, out, img), mask & part


def _save(arr: np.ndarray, path: Path) -> None:
    """One grayscale PNG (clipped to 0-255), its folder made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L").save(path)


def make_part_on_table(
    root: str | Path,
    *,
    n_train: int = 80,
    n_test_good: int = 40,
    n_test_per_defect: int = 15,
    size: int = 256,
    seed: int = 0,
) -> Path:
    """Write the category under ``root`` (MVTec-AD layout, grayscale PNG); returns root."""
    root = Path(root)
    rng = np.random.default_rng(seed)

    for i in range(n_train):
        _save(_part(rng, size)[0], root / "train" / "good" / f"{i:03d}.png")
    for i in range(n_test_good):
        _save(_part(rng, size)[0], root / "test" / "good" / f"{i:03d}.png")
    for kind in DEFECTS:
        for i in range(n_test_per_defect):
            img, part, cy, cx = _part(rng, size)
            bad, mask = _defect(rng, img, part, cy, cx, kind)
            _save(bad, root / "test" / kind / f"{i:03d}.png")
            _save(mask.astype(np.uint8) * 255, root / "ground_truth" / kind / f"{i:03d}_mask.png")
    return root


def _bar(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A defect-free long bar filling the frame: float32 [h, w] in [0, 255]."""
    coarse = rng.random((4, 8)).astype(np.float32)
    shade = np.asarray(
        Image.fromarray(coarse, mode="F").resize((w, h), Image.Resampling.BICUBIC), np.float32
    )
    xx = np.arange(w, dtype=np.float32)[None, :]
    marks = 6 * np.sin(2 * np.pi * xx / rng.uniform(5.0, 6.0) + rng.uniform(0, 2 * np.pi))
    grain = rng.normal(0, 5, (h, w))
    return (110 + 25 * (shade - 0.5) + rng.normal(0, 4) + marks + grain).astype(np.float32)


def _small_defect(
    rng: np.random.Generator, img: np.ndarray, kind: str
) -> tuple[np.ndarray, np.ndarray]:
    """``img`` with one small defect of ``kind`` (pixel sizes), and its mask."""
    h, w = img.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.05, 0.95) * w
    contrast = rng.uniform(12, 30)
    if kind == "spot":
        r = rng.uniform(3, 6)
        profile = np.exp(-((xx - dx) ** 2 + (yy - dy) ** 2) / (2 * r * r))
        return img - contrast * profile, profile > 0.3
    if kind == "scratch":
        t = rng.uniform(0, np.pi)
        length = rng.uniform(15, 35)
        u = (xx - dx) * np.cos(t) + (yy - dy) * np.sin(t)
        v = -(xx - dx) * np.sin(t) + (yy - dy) * np.cos(t)
        width = rng.uniform(0.8, 1.5)
        profile = np.exp(-(v**2) / (2 * width * width)) * (np.abs(u) < length / 2)
        return img - contrast * profile, profile > 0.2
    r = rng.uniform(3, 6)
    d = np.sqrt((xx - dx) ** 2 + (yy - dy) ** 2) / r
    profile = -np.exp(-(d**2)) + 0.8 * np.exp(-((d - 1.2) ** 2) / 0.08)
    return img + contrast * profile, d < 1.4


def make_long_part(
    root: str | Path,
    *,
    n_train: int = 80,
    n_test_good: int = 40,
    n_test_per_defect: int = 15,
    hw: tuple[int, int] = (256, 640),
    seed: int = 0,
) -> Path:
    """Write the long-part category under ``root`` (MVTec-AD layout, grayscale PNG)."""
    root = Path(root)
    rng = np.random.default_rng(seed)

    for i in range(n_train):
        _save(_bar(rng, *hw), root / "train" / "good" / f"{i:03d}.png")
    for i in range(n_test_good):
        _save(_bar(rng, *hw), root / "test" / "good" / f"{i:03d}.png")
    for kind in DEFECTS:
        for i in range(n_test_per_defect):
            bad, mask = _small_defect(rng, _bar(rng, *hw), kind)
            _save(bad, root / "test" / kind / f"{i:03d}.png")
            _save(mask.astype(np.uint8) * 255, root / "ground_truth" / kind / f"{i:03d}_mask.png")
    return root
