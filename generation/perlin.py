"""Perlin noise and the anomaly-region masks GLASS draws from it.

The masks follow GLASS (Chen et al., ECCV 2024, "A Unified Anomaly Synthesis Strategy with
Gradient Ascent for Industrial Anomaly Detection and Localization", Sec. 3.3 LAS), which
takes them from DRAEM (Zavrtanik et al., ICCV 2021): two Perlin noise maps with random
lattice scales 2^[0, 6), each rotated by a random angle in [-90, 90] degrees and thresholded
at 0.5, combined as their union, their intersection or the first alone (one third each),
multiplied by an optional foreground mask and redrawn until not empty. The feature-level
mask is the image-level mask max-pooled to the patch grid, so a patch is anomalous when any
pixel of its cell is.

Everything here is numpy and seeded through a ``numpy.random.Generator``: the same
generator state gives the same noise and masks on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from ngcal.core.errors import ConfigError

MaskMode = Literal["union", "intersection", "single"]
MASK_MODES: tuple[MaskMode, ...] = ("union", "intersection", "single")

#: Perlin lattice scales are 2**k with k drawn from [MIN_SCALE_EXP, MAX_SCALE_EXP).
MIN_SCALE_EXP = 0
MAX_SCALE_EXP = 6
#: Threshold on the (rotated) noise; GLASS and DRAEM use 0.5.
NOISE_THRESHOLD = 0.5
#: Perlin regions drawn at most this many times to find one that the part mask keeps.
PART_TRIES = 20


def _fade(t: np.ndarray) -> np.ndarray:
    """Perlin's quintic fade curve 6t^5 - 15t^4 + 10t^3."""
    out: np.ndarray = t * t * t * (t * (t * 6.0 - 15.0) + 10.0)
    return out


def perlin_2d(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Gradient (Perlin) noise of ``shape`` with ``res`` lattice cells per axis.

    Returns float64 [H, W], roughly in [-1, 1] (scaled by sqrt(2) so that the extremes of a
    unit-gradient lattice reach about 1). Any ``shape`` works: the noise is evaluated on a
    continuous grid, no divisibility between shape and res is needed.
    """
    h, w = int(shape[0]), int(shape[1])
    ry, rx = max(int(res[0]), 1), max(int(res[1]), 1)
    angles = rng.uniform(0.0, 2.0 * np.pi, size=(ry + 1, rx + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], axis=-1)  # [ry+1, rx+1, 2]
    ys = (np.arange(h) + 0.5) * (ry / h)
    xs = (np.arange(w) + 0.5) * (rx / w)
    yi = np.minimum(np.floor(ys).astype(np.int64), ry - 1)
    xi = np.minimum(np.floor(xs).astype(np.int64), rx - 1)
    fy = (ys - yi)[:, None]  # [H, 1]
    fx = (xs - xi)[None, :]  # [1, W]

    def corner(dy: int, dx: int) -> np.ndarray:
        g = grads[yi[:, None] + dy, xi[None, :] + dx]  # [H, W, 2]
        out: np.ndarray = g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)
        return out

    n00, n01, n10, n11 = corner(0, 0), corner(0, 1), corner(1, 0), corner(1, 1)
    u, v = _fade(fx), _fade(fy)
    top = n00 + u * (n01 - n00)
    bottom = n10 + u * (n11 - n10)
    return np.asarray(np.sqrt(2.0) * (top + v * (bottom - top)))


def fractal_perlin(
    shape: tuple[int, int], base_res: int, octaves: int, rng: np.random.Generator
) -> np.ndarray:
    """Sum of ``octaves`` Perlin layers, each at twice the lattice and half the amplitude."""
    out = np.zeros(shape, dtype=np.float64)
    amp, res = 1.0, max(base_res, 1)
    for _ in range(max(octaves, 1)):
        out += amp * perlin_2d(shape, (res, res), rng)
        amp *= 0.5
        res *= 2
    return out


def _rotate(noise: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate a float map about its centre (bilinear, zero fill), keeping its shape."""
    im = Image.fromarray(noise.astype(np.float32), mode="F")
    rot = im.rotate(degrees, resample=Image.Resampling.BILINEAR, expand=False, fillcolor=0.0)
    return np.asarray(rot, dtype=np.float64)


def thresholded_noise(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """One GLASS noise blob map: Perlin at scales 2^[0,6) per axis, rotated, > 0.5; bool [H, W]."""
    sy = 2 ** int(rng.integers(MIN_SCALE_EXP, MAX_SCALE_EXP))
    sx = 2 ** int(rng.integers(MIN_SCALE_EXP, MAX_SCALE_EXP))
    noise = perlin_2d(shape, (sy, sx), rng)
    noise = _rotate(noise, float(rng.uniform(-90.0, 90.0)))
    return noise > NOISE_THRESHOLD


def pool_to_grid(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Max-pool a bool [H, W] mask to the patch grid (h, w): a cell is set if any pixel is."""
    h, w = mask.shape
    gh, gw = grid
    ys = (np.arange(gh + 1) * h) // gh
    xs = (np.arange(gw + 1) * w) // gw
    out = np.zeros((gh, gw), dtype=bool)
    rows = np.logical_or.reduceat(mask, ys[:-1], axis=0)
    out[:] = np.logical_or.reduceat(rows, xs[:-1], axis=1)
    return out


@dataclass(frozen=True)
class AnomalyMask:
    """A LAS/GAS anomaly region: ``pixels`` bool [H, W], ``cells`` bool [h, w], and its mode."""

    pixels: np.ndarray
    cells: np.ndarray
    mode: MaskMode


def perlin_mask(
    image_shape: tuple[int, int],
    grid: tuple[int, int],
    rng: np.random.Generator,
    *,
    foreground: np.ndarray | None = None,
    mode: MaskMode | None = None,
    max_tries: int = 100,
) -> AnomalyMask:
    """Draw one non-empty anomaly region the GLASS way.

    ``image_shape`` (H, W) pixels; ``grid`` (h, w) patch cells; ``foreground`` optional bool
    [H, W] restricting the region; ``mode`` forces union/intersection/single (default: drawn
    with probability 1/3 each, as in GLASS). Raises ConfigError if ``max_tries`` draws are
    all empty (e.g. an empty foreground).
    """
    if foreground is not None and foreground.shape != tuple(image_shape):
        raise ConfigError(
            f"foreground mask shape {foreground.shape} does not match image {image_shape}"
        )
    for _ in range(max_tries):
        a = thresholded_noise(image_shape, rng)
        b = thresholded_noise(image_shape, rng)
        u = float(rng.random())
        drawn: MaskMode = "union" if u > 2 / 3 else "intersection" if u > 1 / 3 else "single"
        chosen: MaskMode = mode or drawn
        if chosen == "union":
            m = a | b
        elif chosen == "intersection":
            m = a & b
        else:
            m = a
        if foreground is not None:
            m = m & foreground.astype(bool)
        if m.any():
            return AnomalyMask(pixels=m, cells=pool_to_grid(m, grid), mode=chosen)
    raise ConfigError(f"no non-empty Perlin mask in {max_tries} draws (empty foreground?)")


def cells_to_pixels(cells: np.ndarray, image_shape: tuple[int, int]) -> np.ndarray:
    """Upsample a bool patch-grid mask [h, w] to pixels [H, W] on ``pool_to_grid``'s cell
    boundaries, so that ``pool_to_grid(cells_to_pixels(c, s), c.shape)`` is ``c`` again and a
    region inside the pixels never pools onto a cell outside ``cells``."""
    gh, gw = cells.shape
    h, w = int(image_shape[0]), int(image_shape[1])
    if h < gh or w < gw:
        raise ConfigError(f"image {image_shape} is smaller than the patch grid {cells.shape}")
    ys = np.diff((np.arange(gh + 1) * h) // gh)
    xs = np.diff((np.arange(gw + 1) * w) // gw)
    out: np.ndarray = np.repeat(np.repeat(cells.astype(bool), ys, axis=0), xs, axis=1)
    return out


@dataclass(frozen=True)
class PartRegion:
    """A Perlin region cut to a part: the ``mask``, how many regions were drawn after the
    first (``redraws``) and whether every try fell below the minimum (``short``: the largest
    cut is used)."""

    mask: AnomalyMask
    redraws: int
    short: bool


def perlin_mask_on_part(
    image_shape: tuple[int, int],
    grid: tuple[int, int],
    rng: np.random.Generator,
    part: np.ndarray,
    *,
    max_tries: int = PART_TRIES,
) -> PartRegion:
    """A GLASS Perlin region (``perlin_mask``, drawn anywhere) intersected with ``part``
    (bool [H, W]: where anomalies may lie).

    A region is redrawn when the part cut it to less than one patch cell of pixels (a region
    drawn smaller than a cell is kept when it lies wholly on the part), at most
    ``max_tries`` draws; then the largest cut seen is used (``short``). With ``part`` all
    True the first draw is kept: the same region and generator state as ``perlin_mask``.
    ConfigError when ``part`` is empty or no draw touches it.
    """
    if part.shape != tuple(image_shape):
        raise ConfigError(f"part mask shape {part.shape} does not match image {image_shape}")
    allowed = part.astype(bool)
    if not allowed.any():
        raise ConfigError("the part mask is empty: nowhere to place an anomaly")
    cell = image_shape[0] * image_shape[1] / (grid[0] * grid[1])
    best: AnomalyMask | None = None
    for tries in range(max(1, max_tries)):
        drawn = perlin_mask(image_shape, grid, rng)
        kept = drawn.pixels & allowed
        n_kept = int(kept.sum())
        cut = AnomalyMask(pixels=kept, cells=pool_to_grid(kept, grid), mode=drawn.mode)
        if n_kept >= min(int(drawn.pixels.sum()), cell):
            return PartRegion(cut, redraws=tries, short=False)
        if n_kept and (best is None or n_kept > int(best.pixels.sum())):
            best = cut
    if best is None:
        raise ConfigError(f"no Perlin region touched the part in {max_tries} draws")
    return PartRegion(best, redraws=max(1, max_tries) - 1, short=True)


def otsu_foreground(gray: np.ndarray) -> np.ndarray:
    """A foreground mask by Otsu's threshold on a uint8 [H, W] image; the larger class is kept
    as background only when it touches the border more. Returns bool [H, W]."""
    hist = np.bincount(gray.reshape(-1), minlength=256).astype(np.float64)
    p = hist / max(hist.sum(), 1.0)
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma_b = (mu[-1] * omega - mu) ** 2 / (omega * (1.0 - omega))
    t = int(np.nanargmax(np.nan_to_num(sigma_b, nan=-1.0)))
    bright = gray > t
    border = np.concatenate([bright[0], bright[-1], bright[:, 0], bright[:, -1]])
    return ~bright if border.mean() > 0.5 else bright
