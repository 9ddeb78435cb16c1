"""Image decoding and preprocessing in numpy: the one definition used offline and on the edge.

Torch-free. ``load_rgb`` turns any readable image (grayscale, palette, 16-bit, RGBA) into
uint8 RGB and raises ImageError naming the file and a short reason code otherwise;
``preprocess`` applies a ``Preprocessing`` spec and returns CHW float32.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageError
from .manifest import Preprocessing

#: Refuse images above this many pixels before decoding them (decompression bombs).
MAX_PIXELS_DEFAULT = 64_000_000

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def load_rgb(path: str | os.PathLike[str], *, max_pixels: int = MAX_PIXELS_DEFAULT) -> np.ndarray:
    """Decode ``path`` to uint8 RGB [H, W, 3].

    Reasons raised: ``not_found``, ``empty``, ``unreadable``, ``not_an_image``,
    ``too_large``, ``truncated``, ``corrupt``.
    """
    p = str(path)
    try:
        size = os.path.getsize(p)
    except FileNotFoundError as e:
        raise ImageError(p, "not_found") from e
    except OSError as e:
        raise ImageError(p, "unreadable", e.strerror or str(e)) from e
    if size == 0:
        raise ImageError(p, "empty", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageError(p, "too_large", f"{w}x{h} exceeds {max_pixels} pixels")
                im.load()
                rgb = _to_rgb(im)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(p, "too_large", str(e)) from e
    except UnidentifiedImageError as e:
        raise ImageError(p, "not_an_image", "unknown or unsupported format") from e
    except OSError as e:
        msg = str(e)
        reason = "truncated" if "truncated" in msg.lower() else "corrupt"
        raise ImageError(p, reason, msg) from e
    except (ValueError, SyntaxError, EOFError) as e:
        raise ImageError(p, "corrupt", str(e)) from e
    return rgb


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        hi = float(arr.max()) or 1.0
        arr8 = np.clip(arr * (255.0 / max(hi, 255.0)), 0, 255).astype(np.uint8)
        return np.repeat(arr8[..., None], 3, axis=2)
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        arr8 = np.clip(arr, 0, 255).astype(np.uint8)
        return np.repeat(arr8[..., None], 3, axis=2)
    if im.mode in ("L", "1", "LA"):
        g = np.asarray(im.convert("L"), dtype=np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def resize_rgb(
    rgb: np.ndarray, size: int | tuple[int, int], resample: str = "bicubic"
) -> np.ndarray:
    """Resize uint8 RGB [H, W, 3] to [size, size, 3] (or [h, w, 3] for ``size`` = (h, w))
    with PIL (the reference resampler)."""
    h, w = (size, size) if isinstance(size, int) else size
    im = Image.fromarray(rgb, mode="RGB")
    if im.size != (w, h):
        im = im.resize((w, h), _RESAMPLE[resample])
    return np.asarray(im, dtype=np.uint8)


def normalize(rgb: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> float32 CHW, scaled to [0, 1], mean/std normalised."""
    x = rgb.astype(np.float32) * np.float32(1.0 / 255.0)
    x -= np.asarray(spec.mean, dtype=np.float32)
    x /= np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess(rgb: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """uint8 RGB of any size -> float32 [3, H, W] model input as ``spec`` defines it
    ((H, W) = ``spec.hw``)."""
    return normalize(resize_rgb(rgb, spec.hw, spec.resample), spec)


def load_and_preprocess(
    path: str | os.PathLike[str], spec: Preprocessing, *, max_pixels: int = MAX_PIXELS_DEFAULT
) -> np.ndarray:
    """``preprocess(load_rgb(path))``."""
    return preprocess(load_rgb(path, max_pixels=max_pixels), spec)


def load_mask(path: str | os.PathLike[str], size: int) -> np.ndarray:
    """Binary ground-truth mask resized (nearest) to [size, size], bool."""
    p = Path(path)
    try:
        with Image.open(p) as im:
            m = im.convert("L").resize((size, size), Image.Resampling.NEAREST)
            return np.asarray(m) > 127
    except (OSError, UnidentifiedImageError) as e:
        raise ImageError(str(p), "unreadable_mask", str(e)) from e


IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
