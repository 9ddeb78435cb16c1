"""Real NG references and the target masks a defect is painted into.

References (``load_references``): each ``--ng`` folder is an MVTec ``test/<type>`` folder
(masks in ``../../ground_truth/<type>/<stem>_mask.png``), a folder of ``x.png`` +
``x_mask.png``, or a folder of such folders (one defect type each). The defect type
(``group``) is the folder's name. Images and masks are brought to the model's input size.

Target masks (``draw_target``), so defects appear where the line's could: a real mask of
the group re-placed (random flip and half turn, which keep the product's axes, scale
0.7-1.3, at a random position, optionally on the part's foreground), or a synthetic stroke
or blob about as large as the group's real masks (or a Perlin region in the zero-NG mode).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ngcal.core.dataset import list_images
from ngcal.core.errors import DataError
from ngcal.core.images import load_mask, load_rgb, resize_rgb

from ..perlin import perlin_mask
from .backend import Reference
from .placement import Placement, fit_placement, place_mask, random_placement

MASK_SUFFIX = "_mask"


def _pairs(folder: Path) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of an MVTec test/<type> folder or of an x.png + x_mask.png folder."""
    gt = folder.parent.parent / "ground_truth" / folder.name
    out = []
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.stem.endswith(MASK_SUFFIX):
            continue
        for cand in (
            folder / f"{p.stem}{MASK_SUFFIX}{p.suffix}",
            gt / f"{p.stem}{MASK_SUFFIX}.png",
        ):
            if cand.is_file():
                out.append((p, cand))
                break
    return out


def mask_groups(folder: Path) -> list[tuple[Path, list[tuple[Path, Path]]]]:
    """The (defect-type folder, (image, mask) pairs) of one ``--ng`` folder: the folder
    itself, or else each of its sub-folders, where it holds any image with a mask."""
    pairs = _pairs(folder)
    groups = (
        [(folder, pairs)]
        if pairs
        else [(d, _pairs(d)) for d in sorted(folder.iterdir()) if d.is_dir()]
    )
    return [(d, p) for d, p in groups if p]


def has_masks(folder: Path) -> bool:
    """Whether ``folder`` holds real NG the diffusion generator can learn from (images
    with masks, as :func:`load_references` finds them); False for a missing folder."""
    return folder.is_dir() and bool(mask_groups(folder))


def load_references(folders: Sequence[str | Path], size: int) -> list[Reference]:
    """Real NG images with masks from ``folders`` (see the module docstring), at ``size``."""
    refs: list[Reference] = []
    for f in map(Path, folders):
        if not f.is_dir():
            raise DataError(f"--ng {f}: not a directory")
        groups = mask_groups(f)
        if not groups:
            list_images(f)  # raises when there is no image at all
            raise DataError(f"--ng {f}: no image has a mask (x.png + x_mask.png or ground_truth/)")
        for d, ps in groups:
            for img, msk in ps:
                mask = load_mask(msk, size)
                if not mask.any():
                    raise DataError(f"{msk}: empty mask")
                rgb = resize_rgb(load_rgb(img), size)
                refs.append(Reference(rgb, mask, d.name, f"{d.name}/{img.name}"))
    return refs


def replace_mask(
    mask: np.ndarray,
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    foreground: np.ndarray | None = None,
    tries: int = 20,
) -> np.ndarray:
    """A real mask re-placed: flipped, turned by 180 degrees, scaled 0.7-1.3, moved
    (``random_placement``)."""
    p = random_placement(mask, shape, rng, foreground=foreground, tries=tries)
    return place_mask(mask, p, shape)


def stroke_mask(shape: tuple[int, int], length: float, rng: np.random.Generator) -> np.ndarray:
    """A crack-like stroke: a 3-5 segment polyline of about ``length`` pixels, 2-5 px wide."""
    h, w = shape
    im = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(im)
    n = int(rng.integers(3, 6))
    step = max(length / n, 2.0)
    y, x = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
    angle = rng.uniform(0, 2 * np.pi)
    pts = [(x, y)]
    for _ in range(n):
        angle += rng.normal(0, 0.5)
        x = float(np.clip(x + step * np.cos(angle), 0, w - 1))
        y = float(np.clip(y + step * np.sin(angle), 0, h - 1))
        pts.append((x, y))
    draw.line(pts, fill=255, width=int(rng.integers(2, 6)))
    return np.asarray(im) > 127


def blob_mask(shape: tuple[int, int], radius: float, rng: np.random.Generator) -> np.ndarray:
    """A blob: an ellipse of mean radius ``radius`` with a wobbly (harmonic) outline."""
    h, w = shape
    cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    ang = np.arctan2(yy - cy, xx - cx)
    k = rng.uniform(-0.25, 0.25, 3)
    r = radius * (1 + k[0] * np.cos(2 * ang + 1) + k[1] * np.sin(3 * ang) + k[2] * np.cos(5 * ang))
    e = rng.uniform(0.6, 1.0)
    out: np.ndarray = ((xx - cx) ** 2 + ((yy - cy) / e) ** 2) < np.maximum(r, 1.0) ** 2
    return out


@dataclass(frozen=True)
class Target:
    """A target mask, its kind, and (with references) the real defect it was drawn from and
    the placement that maps that defect's box onto the target's."""

    mask: np.ndarray
    kind: str
    reference: Reference | None = None
    placement: Placement | None = None


def draw_target(
    references: Sequence[Reference],
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    foreground: np.ndarray | None = None,
    real_share: float = 0.7,
) -> tuple[np.ndarray, str]:
    """One target mask and its kind (``real``, ``stroke``, ``blob``, ``perlin``)."""
    t = draw_placed_target(references, shape, rng, foreground=foreground, real_share=real_share)
    return t.mask, t.kind


def draw_placed_target(
    references: Sequence[Reference],
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    foreground: np.ndarray | None = None,
    real_share: float = 0.7,
) -> Target:
    """One target with its source (``Target``).

    With references of the group: a re-placed real mask with probability ``real_share``, else
    a stroke or blob sized like the references (its source: a random reference mapped onto
    the target's box). Without: a Perlin region (GLASS/DRAEM masks,
    ``ngcal.generation.perlin``) shrunk to a defect's scale, or a stroke/blob, no source.
    """
    h, w = shape
    if references:
        ref = references[int(rng.integers(0, len(references)))]
        if rng.random() < real_share:
            p = random_placement(ref.mask, shape, rng, foreground=foreground)
            return Target(place_mask(ref.mask, p, shape), "real", ref, p)
        area = float(np.median([r.mask.sum() for r in references]))
    else:
        ref = None
        area = float(rng.uniform(0.002, 0.02) * h * w)
        if rng.random() < 0.4:
            side = int(np.clip(np.sqrt(area) * 2.5, 8, min(h, w)))
            region = perlin_mask((side, side), (1, 1), rng).pixels
            out = np.zeros(shape, dtype=bool)
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            out[y : y + side, x : x + side] = region
            return Target(_on_foreground(out, foreground), "perlin")
    if rng.random() < 0.5:
        m = stroke_mask(shape, length=float(np.sqrt(area) * 2.0), rng=rng)
        kind = "stroke"
    else:
        m = blob_mask(shape, float(np.sqrt(area / np.pi)), rng)
        kind = "blob"
    m = _on_foreground(m, foreground)
    if ref is None:
        return Target(m, kind)
    return Target(m, kind, ref, fit_placement(ref.mask, m, rng))


def _on_foreground(mask: np.ndarray, foreground: np.ndarray | None) -> np.ndarray:
    """``mask`` restricted to the foreground unless that would empty it."""
    if foreground is None:
        return mask
    inter = mask & foreground
    return inter if inter.any() else mask
