"""LAS, local anomaly synthesis in image space (GLASS, Chen et al., ECCV 2024, Sec. 3.3).

An anomalous image is a good image whose Perlin region ``m`` is replaced by a blend of a
texture ``t`` and the image itself::

    x' = x * (1 - m) + (1 - beta) * t * m + beta * x * m,   beta ~ clip(N(0.5, 0.1), 0.2, 0.8)

Pixels outside ``m`` are bit-identical to the input; the returned binary mask is ``m``, at the
image's resolution, and ``cells`` is ``m`` max-pooled to the patch grid (the label GLASS gives
each patch feature).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ngcal.core.errors import ConfigError

from .perlin import MaskMode, perlin_mask, perlin_mask_on_part
from .textures import TextureBank, TextureKind

#: GLASS's blend factor distribution: beta ~ N(BETA_MEAN, BETA_STD) clipped to BETA_RANGE.
BETA_MEAN = 0.5
BETA_STD = 0.1
BETA_RANGE = (0.2, 0.8)


@dataclass(frozen=True)
class LasSample:
    """One synthetic anomalous image.

    ``image`` uint8 RGB [H, W, 3]; ``mask`` bool [H, W] (True = synthetic anomaly);
    ``cells`` bool [h, w] on the patch grid; ``beta`` the share of the original image kept
    inside the mask; ``mode`` the Perlin combination; ``texture`` the texture source;
    ``redraws`` the Perlin regions drawn again because the part mask cut them too small,
    ``short`` when every try did (0/False without a part mask).
    """

    image: np.ndarray
    mask: np.ndarray
    cells: np.ndarray
    beta: float
    mode: MaskMode
    texture: TextureKind
    redraws: int = 0
    short: bool = False


def blend(image: np.ndarray, texture: np.ndarray, mask: np.ndarray, beta: float) -> np.ndarray:
    """GLASS's blend of ``texture`` into ``image`` under ``mask`` (uint8 in, uint8 out).

    Outside ``mask`` the result equals ``image`` exactly.
    """
    if image.shape != texture.shape or image.shape[:2] != mask.shape:
        raise ConfigError(
            f"blend: image {image.shape}, texture {texture.shape} and mask {mask.shape} differ"
        )
    if not 0.0 <= beta <= 1.0:
        raise ConfigError(f"blend: beta {beta} is outside [0, 1]")
    x = image.astype(np.float64)
    inside = (1.0 - beta) * texture.astype(np.float64) + beta * x
    out: np.ndarray = image.copy()
    m = mask.astype(bool)
    out[m] = np.clip(np.rint(inside[m]), 0, 255).astype(np.uint8)
    return out


def draw_beta(rng: np.random.Generator) -> float:
    """beta ~ clip(N(0.5, 0.1), 0.2, 0.8), GLASS's default."""
    return float(np.clip(rng.normal(BETA_MEAN, BETA_STD), *BETA_RANGE))


def synthesize(
    image: np.ndarray,
    textures: TextureBank,
    grid: tuple[int, int],
    rng: np.random.Generator,
    *,
    foreground: np.ndarray | None = None,
    beta: float | None = None,
    part: np.ndarray | None = None,
) -> LasSample:
    """One LAS sample from a good uint8 RGB ``image`` [S, S, 3] (already at model size).

    ``grid`` is the patch grid (h, w); ``beta`` fixes the blend (default: drawn as GLASS);
    ``foreground`` optional bool [S, S]; ``part`` optional bool [S, S], the model's part
    mask at image size: the Perlin region is cut to it (``perlin_mask_on_part``, redrawn
    when cut too small; with ``foreground`` too, to both).
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ConfigError(f"LAS needs uint8 RGB [H, W, 3], got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    if textures.size != h or h != w:
        raise ConfigError(f"LAS image {image.shape} does not match texture size {textures.size}")
    redraws, short = 0, False
    if part is None:
        am = perlin_mask((h, w), grid, rng, foreground=foreground)
    else:
        allowed = part.astype(bool) if foreground is None else part.astype(bool) & foreground
        region = perlin_mask_on_part((h, w), grid, rng, allowed)
        am, redraws, short = region.mask, region.redraws, region.short
    tex, kind = textures.draw(rng)
    b = draw_beta(rng) if beta is None else float(beta)
    out = blend(image, tex, am.pixels, b)
    return LasSample(
        image=out,
        mask=am.pixels,
        cells=am.cells,
        beta=b,
        mode=am.mode,
        texture=kind,
        redraws=redraws,
        short=short,
    )


def save_png(path: str, rgb_or_mask: np.ndarray) -> None:
    """Write uint8 RGB [H, W, 3] or a bool mask [H, W] (as 0/255 L) to a PNG file."""
    arr = rgb_or_mask
    if arr.dtype == bool:
        Image.fromarray(arr.astype(np.uint8) * 255, mode="L").save(path, format="PNG")
    else:
        Image.fromarray(np.ascontiguousarray(arr), mode="RGB").save(path, format="PNG")


def contact_sheet(
    samples: list[tuple[np.ndarray, np.ndarray, str]],
    *,
    columns: int = 6,
    tile: int = 192,
    part: np.ndarray | None = None,
) -> np.ndarray:
    """A grid of images with their mask outlines in red and a caption strip.

    ``samples`` are (uint8 RGB [H, W, 3], bool mask [H, W], caption); ``part`` optional
    bool [H, W], the part mask anomalies were placed on, outlined in green on every tile.
    Returns uint8 RGB.
    """
    from PIL import ImageDraw

    if not samples:
        raise ConfigError("contact sheet: no samples")
    cols = max(1, min(columns, len(samples)))
    rows = (len(samples) + cols - 1) // cols
    cap = 14
    sheet = Image.new("RGB", (cols * tile, rows * (tile + cap)), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    part_edge = None
    if part is not None:
        p = _to_tile(part, tile)
        part_edge = p & ~_erode(p)  # just inside the part: anomalies touching it stay red
    for i, (img, mask, caption) in enumerate(samples):
        im = Image.fromarray(img, mode="RGB").resize((tile, tile), Image.Resampling.BILINEAR)
        m = _to_tile(mask, tile)
        edge = _dilate(m) & ~m  # outline just outside, the anomaly itself stays visible
        arr = np.asarray(im).copy()
        if part_edge is not None:
            arr[part_edge] = (0, 200, 0)
        arr[edge] = (255, 0, 0)
        r, c = divmod(i, cols)
        sheet.paste(Image.fromarray(arr, mode="RGB"), (c * tile, r * (tile + cap)))
        draw.text((c * tile + 2, r * (tile + cap) + tile), caption[:40], fill=(230, 230, 230))
    return np.asarray(sheet, dtype=np.uint8)


def _to_tile(mask: np.ndarray, tile: int) -> np.ndarray:
    """A bool mask resized (nearest) to a square tile."""
    small = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
    return np.asarray(small.resize((tile, tile), Image.Resampling.NEAREST)) > 127


def _erode(m: np.ndarray) -> np.ndarray:
    """3x3 binary erosion (outside the frame counts as set)."""
    return ~_dilate(~m)


def _dilate(m: np.ndarray) -> np.ndarray:
    """3x3 binary dilation."""
    p = np.pad(m, 1, constant_values=False)
    out = np.zeros_like(m)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out |= p[dy : dy + m.shape[0], dx : dx + m.shape[1]]
    return out
