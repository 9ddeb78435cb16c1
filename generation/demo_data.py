"""A procedural demo category in MVTec-AD layout, so the product runs with no third-party data.

Good parts are a grey machined surface: low-frequency shading, fine isotropic grain and
horizontal tool marks, with a little per-part variation in brightness and phase. Defects
are drawn on top with their masks: ``scratch`` (a thin dark curved line), ``spot`` (a dark
soft blob) and ``dent`` (a bright-rimmed crater). Sizes and contrasts are random, so some
defects are subtle. Everything is numpy + Pillow and deterministic for a seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

DEFECTS = ("scratch", "spot", "dent")


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Bicubically upsampled uniform noise in [0, 1], shape [size, size]."""
    coarse = rng.random((cells + 1, cells + 1)).astype(np.float32)
    im = Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BICUBIC)
    out: np.ndarray = np.asarray(im, dtype=np.float32)
    return out


def good_surface(rng: np.random.Generator, size: int) -> np.ndarray:
    """One defect-free surface, float32 [size, size] in [0, 255]."""
    yy = np.arange(size, dtype=np.float32)[:, None]
    shade = 110 + 25 * (_smooth_noise(rng, size, 3) - 0.5) + rng.normal(0, 4)
    period = rng.uniform(5.0, 6.0)
    marks = 6 * np.sin(2 * np.pi * yy / period + rng.uniform(0, 2 * np.pi))
    grain = rng.normal(0, 5, (size, size)).astype(np.float32)
    surface: np.ndarray = np.clip(shade + marks + grain, 0, 255).astype(np.float32)
    return surface


def _draw_defect(
    rng: np.random.Generator, img: np.ndarray, kind: str
) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = rng.uniform(0.2, 0.8, 2) * size
    contrast = rng.uniform(25, 60)
    if kind == "scratch":
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(0.2, 0.5) * size
        curve = rng.uniform(-0.004, 0.004)
        u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle) - curve * u**2
        width = rng.uniform(1.0, 2.5)
        inside = (np.abs(u) < length / 2) & (np.abs(v) < width * 2.5)
        profile = np.exp(-(v**2) / (2 * width**2)) * (np.abs(u) < length / 2)
        out = img - contrast * profile
        mask = inside & (profile > 0.2)
    elif kind == "spot":
        r = rng.uniform(0.03, 0.08) * size
        d2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r**2)
        profile = np.exp(-d2)
        out = img - contrast * profile
        mask = profile > 0.3
    else:  # dent
        r = rng.uniform(0.03, 0.07) * size
        d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / r
        profile = -np.exp(-(d**2)) + 0.8 * np.exp(-((d - 1.2) ** 2) / 0.08)
        out = img + contrast * profile
        mask = d < 1.4
    return np.clip(out, 0, 255), mask


def defective_part(
    rng: np.random.Generator, size: int, kind: str, *, strength: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """One defective part (uint8 image, bool mask) with the defect at ``strength`` of its
    drawn contrast (1: as in the test split; small: a faint defect a line tends to miss)."""
    surface = good_surface(rng, size)
    img, mask = _draw_defect(rng, surface, kind)
    blended = surface + strength * (img - surface)
    return np.clip(blended, 0, 255).astype(np.uint8), mask


def make_demo_category(
    root: str | Path,
    *,
    n_train: int = 80,
    n_test_good: int = 30,
    n_test_per_defect: int = 10,
    size: int = 256,
    seed: int = 0,
) -> Path:
    """Write a demo category under ``root`` (MVTec-AD layout, grayscale PNG); returns root."""
    root = Path(root)
    rng = np.random.default_rng(seed)

    def save(arr: np.ndarray, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr.astype(np.uint8), mode="L").save(path)

    for i in range(n_train):
        save(good_surface(rng, size), root / "train" / "good" / f"{i:03d}.png")
    for i in range(n_test_good):
        save(good_surface(rng, size), root / "test" / "good" / f"{i:03d}.png")
    for kind in DEFECTS:
        for i in range(n_test_per_defect):
            img, mask = _draw_defect(rng, good_surface(rng, size), kind)
            save(img, root / "test" / kind / f"{i:03d}.png")
            save(mask.astype(np.uint8) * 255, root / "ground_truth" / kind / f"{i:03d}_mask.png")
    return root
