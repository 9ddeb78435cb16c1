"""Working at the defect's scale: square windows around a mask, cropped, resized and pasted back.

A window is a square around the mask's bounding box with a margin, at least ``min_side``
pixels and at most the image, clamped inside the image. Backends paint at a fixed working
size (the window resized) and the painted window is resized back and composited *only inside
the mask*, so every pixel outside the mask keeps the good image's exact value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ngcal.core.errors import ConfigError


@dataclass(frozen=True)
class Window:
    """A square ``side`` x ``side`` window whose top-left pixel is (``y``, ``x``)."""

    y: int
    x: int
    side: int

    def as_list(self) -> list[int]:
        return [self.y, self.x, self.side]


def mask_window(
    mask: np.ndarray,
    *,
    min_side: int,
    margin: float = 1.4,
    scale: float = 1.0,
    shift: tuple[float, float] = (0.0, 0.0),
) -> Window:
    """The window around ``mask`` (bool [H, W], not empty): side ``margin * scale`` x bbox.

    ``shift`` moves the centre by that fraction of the side (augmentation); the window is
    clamped inside the image and always contains the mask's bounding box when it fits.
    """
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ConfigError("mask_window: empty mask")
    h, w = mask.shape
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    side = int(np.ceil(max(y1 - y0, x1 - x0) * margin * scale))
    side = int(min(max(side, min_side, 4), h, w))
    cy = (y0 + y1) / 2 + shift[0] * side
    cx = (x0 + x1) / 2 + shift[1] * side
    y = int(np.clip(round(cy - side / 2), 0, h - side))
    x = int(np.clip(round(cx - side / 2), 0, w - side))
    return Window(y, x, side)


def take(image: np.ndarray, win: Window, size: int) -> np.ndarray:
    """The window of a uint8 RGB image resized to [size, size, 3] (bicubic)."""
    patch = image[win.y : win.y + win.side, win.x : win.x + win.side]
    im = Image.fromarray(np.ascontiguousarray(patch), mode="RGB")
    if win.side != size:
        im = im.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.uint8)


def take_mask(mask: np.ndarray, win: Window, size: int) -> np.ndarray:
    """The window of a bool mask resized to [size, size] (area average > 0.5, never empty
    when the window's mask is not)."""
    patch = mask[win.y : win.y + win.side, win.x : win.x + win.side].astype(np.float32)
    if win.side == size:
        return patch > 0.5
    im = Image.fromarray(patch, mode="F").resize((size, size), Image.Resampling.BOX)
    arr = np.asarray(im)
    out = arr > 0.5
    if not out.any() and arr.max() > 0:
        out = arr >= arr.max()
    return out


def _up(small: np.ndarray, side: int) -> np.ndarray:
    """uint8 RGB [C, C, 3] -> float64 [side, side, 3] (bicubic)."""
    im = Image.fromarray(np.ascontiguousarray(small), mode="RGB")
    if im.size != (side, side):
        im = im.resize((side, side), Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.float64)


def paste(
    good: np.ndarray, painted: np.ndarray, win: Window, mask: np.ndarray, *, detail: bool = True
) -> np.ndarray:
    """``good`` with ``painted`` (uint8 RGB [C, C, 3], the window at working size) resized
    back to the window and copied into the pixels of ``mask`` only (bool [H, W]).

    With ``detail``, the good window's own fine detail, the part lost by the round trip to
    working size (``good - up(down(good))``), is added back: a window painted at 32 px and
    enlarged keeps the product's full-resolution grain, and a painting that reproduces the
    background reproduces it exactly.
    """
    sl = (slice(win.y, win.y + win.side), slice(win.x, win.x + win.side))
    c = painted.shape[0]
    back = _up(painted, win.side)
    if detail and win.side != c:
        back = back + good[sl].astype(np.float64) - _up(take(good, win, c), win.side)
    out: np.ndarray = good.copy()
    m = mask[sl]
    out[sl][m] = np.clip(np.rint(back), 0, 255).astype(np.uint8)[m]
    return out


def blend_inside(
    good: np.ndarray, painted: np.ndarray, win: Window, alpha: np.ndarray
) -> np.ndarray:
    """Like ``paste`` with a soft ``alpha`` float [H, W] in [0, 1] that is 0 outside the mask
    (a feather that fades in from the mask's edge); pixels with alpha 0 are exact."""
    im = Image.fromarray(np.ascontiguousarray(painted), mode="RGB")
    if im.size != (win.side, win.side):
        im = im.resize((win.side, win.side), Image.Resampling.BICUBIC)
    back = np.asarray(im, dtype=np.float64)
    out: np.ndarray = good.copy()
    sl = (slice(win.y, win.y + win.side), slice(win.x, win.x + win.side))
    a = alpha[sl][..., None]
    mixed = np.clip(np.rint(a * back + (1.0 - a) * good[sl].astype(np.float64)), 0, 255)
    inside = alpha[sl] > 0
    out[sl][inside] = mixed.astype(np.uint8)[inside]
    return out


def feather(mask: np.ndarray, width: int) -> np.ndarray:
    """float [H, W]: 0 outside ``mask``, rising to 1 over ``width`` pixels inside its edge."""
    m = mask.astype(bool)
    if width <= 0:
        return m.astype(np.float64)
    depth = np.zeros(m.shape, dtype=np.float64)
    cur = m.copy()
    for _ in range(width):
        depth += cur
        p = np.pad(cur, 1, constant_values=False)
        cur = cur & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    out: np.ndarray = np.clip(depth / width, 0.0, 1.0)
    return out
