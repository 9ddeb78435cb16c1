"""Input geometry of a model: (height, width) that keeps the product's aspect ratio.

A part that is long and narrow, squashed into a square, loses detail along its long side
and shows the backbone shapes it never saw in training. ``keep_aspect_hw`` chooses one
fixed input size per model from the training images' median height/width ratio: the long
side is the requested size, the short side follows the ratio (``keep_aspect_area``: the
pixel count of a square of the requested side, so about the square's compute), both
rounded to multiples of 32 (the backbone's largest stride, so every feature grid divides
evenly and the exported graph's per-level search stays exact). Images of another ratio are
resized to that size (as the square default resizes every image), so one fixed-size graph
serves all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ngcal.core.errors import DataError

#: sides are multiples of this (Lite0's and WRN50's largest stride)
SIDE_MULTIPLE = 32


def median_aspect(paths: Sequence[Path]) -> float:
    """Median height / width of the images (read from their headers only)."""
    ratios = []
    for p in paths:
        try:
            with Image.open(p) as im:
                w, h = im.size
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(f"{p}: unreadable training image ({e})") from e
        ratios.append(h / w)
    if not ratios:
        raise DataError("no training images to take the aspect ratio from")
    return float(np.median(ratios))


def keep_aspect_hw(long_side: int, aspect: float) -> tuple[int, int]:
    """(height, width) with the long side ``long_side`` (rounded to ``SIDE_MULTIPLE``) and
    height / width as close to ``aspect`` as whole multiples allow (at least one)."""
    m = SIDE_MULTIPLE
    long_ = max(m, round(long_side / m) * m)
    short = max(m, round(long_ * min(aspect, 1.0 / aspect) / m) * m)
    return (long_, short) if aspect >= 1.0 else (short, long_)


def keep_aspect_area(side: int, aspect: float, *, scale: float = 1.0) -> tuple[int, int]:
    """(height, width) with height / width near ``aspect`` and about ``scale`` times the
    pixels of a ``side`` x ``side`` square (``keep_aspect_hw`` at that long side)."""
    long_side = side * math.sqrt(scale * max(aspect, 1.0 / aspect))
    return keep_aspect_hw(round(long_side), aspect)
