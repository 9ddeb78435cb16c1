"""Texture sources for LAS: what gets blended into the anomaly region.

GLASS blends a random DTD texture (Cimpoi et al., CVPR 2014), passed through three of nine
random augmentations, into the Perlin region. DTD is a hub download, which ngcal never
does, so textures come from three local sources instead, drawn at random per sample:

- ``self``: a crop of one of the product's own good images, shifted, rotated, rescaled and
  recoloured (brightness, contrast, gamma, inversion, channel gains), so that the anomaly is
  made of plausible material in the wrong place or state;
- ``procedural``: fractal Perlin noise, sinusoidal gratings or cellular blobs with random
  colours;
- ``folder``: images of a user-given folder (e.g. a local DTD copy), when present.

Every texture then gets GLASS's random augmentation (three distinct of: contrast,
brightness, saturation/hue, horizontal flip, vertical flip, grayscale, autocontrast,
equalise, rotation within +-45 degrees). When every image of the product is grey (R = G =
B), textures are turned grey too: a coloured patch on a grey product is an anomaly no
camera of that line can produce. All textures are uint8 RGB [S, S, 3].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from ngcal.core.errors import ConfigError
from ngcal.core.images import load_rgb, resize_rgb

from .perlin import fractal_perlin

TextureKind = Literal["self", "procedural", "folder"]


def _pil(rgb: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")


def _np(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def recolour(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random brightness/contrast/gamma, channel gains and (p=0.3) inversion of uint8 RGB."""
    x = rgb.astype(np.float64) / 255.0
    gamma = float(np.exp(rng.uniform(-0.7, 0.7)))
    x = x**gamma
    mean = x.mean()
    x = (x - mean) * rng.uniform(0.5, 2.0) + mean + rng.uniform(-0.3, 0.3)
    x = x * rng.uniform(0.7, 1.3, size=3)
    if rng.random() < 0.3:
        x = 1.0 - x
    return np.asarray(np.clip(np.rint(x * 255.0), 0, 255), dtype=np.uint8)


def self_crop(images: Sequence[np.ndarray], size: int, rng: np.random.Generator) -> np.ndarray:
    """A shifted, rotated, rescaled, recoloured crop of one of ``images`` (uint8 RGB)."""
    src = images[int(rng.integers(len(images)))]
    h, w = src.shape[:2]
    frac = rng.uniform(0.25, 1.0)
    ch, cw = max(int(h * frac), 8), max(int(w * frac), 8)
    y0 = int(rng.integers(0, h - ch + 1))
    x0 = int(rng.integers(0, w - cw + 1))
    crop = _pil(src[y0 : y0 + ch, x0 : x0 + cw])
    crop = crop.rotate(float(rng.uniform(0, 360)), resample=Image.Resampling.BILINEAR, expand=False)
    crop = crop.resize((size, size), Image.Resampling.BILINEAR)
    arr = _np(crop)
    shift = rng.integers(0, size, size=2)
    arr = np.roll(arr, shift=(int(shift[0]), int(shift[1])), axis=(0, 1))
    return recolour(arr, rng)


def procedural(size: int, rng: np.random.Generator) -> np.ndarray:
    """A procedural texture: fractal noise, a grating or cells, in two random colours."""
    kind = int(rng.integers(3))
    shape = (size, size)
    if kind == 0:
        field = fractal_perlin(shape, int(rng.integers(2, 9)), int(rng.integers(2, 5)), rng)
    elif kind == 1:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
        theta = rng.uniform(0, np.pi)
        freq = rng.uniform(3, 30)
        warp = 0.3 * fractal_perlin(shape, 4, 2, rng)
        field = np.sin(2 * np.pi * freq * (np.cos(theta) * xx + np.sin(theta) * yy) + 4 * warp)
    else:
        n = int(rng.integers(8, 60))
        pts = rng.uniform(0, size, size=(n, 2))
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
        d = np.full(shape, np.inf)
        for py, px in pts:
            d = np.minimum(d, np.hypot(yy - py, xx - px))
        field = d
    lo, hi = float(field.min()), float(field.max())
    t = (field - lo) / (hi - lo + 1e-12)
    c0 = rng.uniform(0, 255, size=3)
    c1 = rng.uniform(0, 255, size=3)
    out = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _colour_jitter(im: Image.Image, rng: np.random.Generator, what: str) -> Image.Image:
    f = float(rng.uniform(0.8, 1.2))
    if what == "contrast":
        return ImageEnhance.Contrast(im).enhance(f)
    if what == "brightness":
        return ImageEnhance.Brightness(im).enhance(f)
    im = ImageEnhance.Color(im).enhance(f)
    hsv = np.asarray(im.convert("HSV"), dtype=np.int16).copy()
    hsv[..., 0] = (hsv[..., 0] + int(rng.uniform(-0.2, 0.2) * 255)) % 256
    return Image.fromarray(hsv.astype(np.uint8), mode="HSV").convert("RGB")


_AUGMENTS: tuple[Callable[[Image.Image, np.random.Generator], Image.Image], ...] = (
    lambda im, r: _colour_jitter(im, r, "contrast"),
    lambda im, r: _colour_jitter(im, r, "brightness"),
    lambda im, r: _colour_jitter(im, r, "saturation_hue"),
    lambda im, r: ImageOps.mirror(im),
    lambda im, r: ImageOps.flip(im),
    lambda im, r: ImageOps.grayscale(im).convert("RGB"),
    lambda im, r: ImageOps.autocontrast(im),
    lambda im, r: ImageOps.equalize(im),
    lambda im, r: im.rotate(float(r.uniform(-45, 45)), resample=Image.Resampling.BILINEAR),
)


def glass_augment(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """GLASS's texture augmentation: three distinct random ops of nine, in random order."""
    im = _pil(rgb)
    for i in rng.choice(len(_AUGMENTS), size=3, replace=False):
        im = _AUGMENTS[int(i)](im, rng)
    return _np(im)


def _is_grey(rgb: np.ndarray) -> bool:
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


class TextureBank:
    """Draws augmented textures of side ``size`` from the product's images, procedural
    generators and an optional folder.

    ``own_images`` are uint8 RGB good images of the product (any size); ``folder`` is a
    directory of texture images (read once, resized to ``size``); ``kinds`` the sources to
    draw from with equal probability (sources without images are dropped).
    """

    def __init__(
        self,
        *,
        size: int,
        own_images: Sequence[np.ndarray] = (),
        folder: str | Path | None = None,
        kinds: Sequence[TextureKind] = ("self", "procedural", "folder"),
    ) -> None:
        self.size = int(size)
        self.own_images = [np.asarray(x, dtype=np.uint8) for x in own_images]
        self.grey = bool(self.own_images) and all(_is_grey(x) for x in self.own_images)
        self.folder_images: list[np.ndarray] = []
        if folder is not None:
            root = Path(folder)
            if not root.is_dir():
                raise ConfigError(f"--textures {root}: not a directory")
            from ngcal.core.dataset import list_images

            self.folder_images = [
                resize_rgb(load_rgb(p), self.size, "bilinear") for p in list_images(root)
            ]
        available = {
            "self": bool(self.own_images),
            "procedural": True,
            "folder": bool(self.folder_images),
        }
        self.kinds: tuple[TextureKind, ...] = tuple(k for k in kinds if available[k])
        if not self.kinds:
            raise ConfigError(f"no texture source available among {list(kinds)}")

    def draw(self, rng: np.random.Generator) -> tuple[np.ndarray, TextureKind]:
        """One augmented texture uint8 [size, size, 3] and the source it came from."""
        kind = self.kinds[int(rng.integers(len(self.kinds)))]
        if kind == "self":
            tex = self_crop(self.own_images, self.size, rng)
        elif kind == "folder":
            tex = self.folder_images[int(rng.integers(len(self.folder_images)))]
        else:
            tex = procedural(self.size, rng)
        tex = glass_augment(tex, rng)
        if self.grey:
            tex = _np(_pil(tex).convert("L"))
        return tex, kind
