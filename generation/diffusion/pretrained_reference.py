"""Reference-guided init (``pretrained`` backend): a real NG's defect re-placed under a target.

Training-free and one-shot (the idea behind TF-IDG, ICCV 2025: carry a single reference
defect's appearance into a new image without training): the reference's defect pixels
are moved under the target mask by the dihedral transform (flip, rotation by k x 90
degrees) and scale that best maps the reference mask onto the target mask, shifted by the
difference of the two surroundings' mean colours, and pasted onto the good image. The
backend then noises that init and denoises it inside the mask with strength < 1 (SDEdit,
Meng et al. ICLR 2022), so the defect keeps the reference's look while the model blends it
into the good image's texture and light. Images are uint8 RGB [S, S, 3], masks bool [S, S].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ngcal.core.errors import ConfigError

from .backend import Reference

#: the 8 dihedral transforms as (flip left-right first, then k x 90 degrees counter-clockwise)
DIHEDRAL: tuple[tuple[bool, int], ...] = tuple((f, k) for f in (False, True) for k in range(4))


@dataclass(frozen=True)
class Placement:
    """How a reference is re-placed under a target: which reference, the transform, where
    (``box`` = (y0, y1, x0, x1) the reference's mask box lands on; None: the target's box),
    how well the moved mask fits the target (IoU) and where the placement came from
    (``drawn``: the transform the target was drawn with; ``matched``: ``match_reference``)."""

    reference: Reference
    flip: bool
    rot90: int
    iou: float
    source: str = "matched"
    box: tuple[int, int, int, int] | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "reference": self.reference.item_id,
            "flip": self.flip,
            "rot90": self.rot90,
            "iou": self.iou,
            "source": self.source,
            "box": list(self.box) if self.box else None,
        }


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of a non-empty bool mask."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ConfigError("reference placement: empty mask")
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def dihedral(a: np.ndarray, flip: bool, rot90: int) -> np.ndarray:
    """``a`` ([H, W] or [H, W, C]) flipped left-right if ``flip``, then rotated ``rot90`` x 90."""
    if flip:
        a = a[:, ::-1]
    return np.ascontiguousarray(np.rot90(a, rot90))


def _resize_mask(m: np.ndarray, h: int, w: int) -> np.ndarray:
    im = Image.fromarray(m.astype(np.uint8) * 255, mode="L")
    return np.asarray(im.resize((w, h), Image.Resampling.NEAREST)) > 127


def _resize_rgb(a: np.ndarray, h: int, w: int) -> np.ndarray:
    im = Image.fromarray(np.ascontiguousarray(a), mode="RGB")
    return np.asarray(im.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float64)


def match_reference(target: np.ndarray, references: Sequence[Reference]) -> Placement:
    """The reference and dihedral transform whose mask, scaled to the target's bounding
    box, overlaps the target best (IoU); a target re-placed from a reference's mask by a
    flip and rotation finds that reference and transform back."""
    if not references:
        raise ConfigError("reference placement: no reference of this defect type")
    y0, y1, x0, x1 = _bbox(target)
    tp = target[y0:y1, x0:x1]
    best: Placement | None = None
    for ref in references:
        ry0, ry1, rx0, rx1 = _bbox(ref.mask)
        rp = ref.mask[ry0:ry1, rx0:rx1]
        for flip, k in DIHEDRAL:
            m = _resize_mask(dihedral(rp, flip, k), y1 - y0, x1 - x0)
            union = int((m | tp).sum())
            iou = float((m & tp).sum() / union) if union else 0.0
            if best is None or iou > best.iou + 1e-12:
                best = Placement(ref, flip, k, iou)
    assert best is not None
    return best


def drawn_placement(request: object) -> Placement | None:
    """The placement a request's target was drawn with, when the request carries one.

    A request that names its ``reference`` and a ``placement`` with ``flip``, ``rot``,
    ``height``, ``width``, ``y``, ``x`` (the reference's mask box flipped left-right, turned
    ``rot`` x 90 degrees, resized and put at (y, x): how the orchestration re-places real
    masks) gives back that very transform; any other request gives None.
    """
    ref = getattr(request, "reference", None)
    p = getattr(request, "placement", None)
    target = getattr(request, "target", None)
    if not isinstance(ref, Reference) or p is None or not isinstance(target, np.ndarray):
        return None
    try:
        flip, rot = bool(p.flip), int(p.rot) % 4
        y, x, h, w = int(p.y), int(p.x), int(p.height), int(p.width)
    except AttributeError:
        return None
    ry0, ry1, rx0, rx1 = _bbox(ref.mask)
    moved = np.zeros(target.shape, dtype=bool)
    moved[y : y + h, x : x + w] = _resize_mask(
        dihedral(ref.mask[ry0:ry1, rx0:rx1], flip, rot), h, w
    )
    union = int((moved | target).sum())
    iou = float((moved & target).sum() / union) if union else 0.0
    return Placement(ref, flip, rot, iou, source="drawn", box=(y, y + h, x, x + w))


def _surround_mean(
    image: np.ndarray, mask: np.ndarray, box: tuple[int, int, int, int]
) -> np.ndarray:
    """Mean colour float64 [3] of the pixels outside ``mask`` in ``box`` grown by half its size."""
    h, w = mask.shape
    y0, y1, x0, x1 = box
    gy, gx = max((y1 - y0) // 2, 2), max((x1 - x0) // 2, 2)
    sl = (slice(max(y0 - gy, 0), min(y1 + gy, h)), slice(max(x0 - gx, 0), min(x1 + gx, w)))
    outside = ~mask[sl]
    if not outside.any():
        return np.asarray(image[sl].reshape(-1, 3).mean(axis=0), dtype=np.float64)
    return np.asarray(image[sl][outside].mean(axis=0), dtype=np.float64)


def paste_reference(good: np.ndarray, target: np.ndarray, placement: Placement) -> np.ndarray:
    """``good`` with the placed reference's defect pixels inside ``target`` (uint8 RGB).

    The reference's bounding-box crop is transformed, resized to the placement's box (the
    target's bounding box by default) and shifted by (good's surrounding mean - reference's
    surrounding mean); target pixels outside that box keep ``good``; pixels outside
    ``target`` are ``good``'s exactly.
    """
    ref = placement.reference
    if ref.image.shape != good.shape:
        raise ConfigError(
            f"reference {ref.item_id}: image {ref.image.shape} is not the good image's {good.shape}"
        )
    y0, y1, x0, x1 = placement.box or _bbox(target)
    h, w = target.shape
    if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
        raise ConfigError(f"reference placement box {(y0, y1, x0, x1)} is outside the image")
    rbox = _bbox(ref.mask)
    crop = ref.image[rbox[0] : rbox[1], rbox[2] : rbox[3]]
    moved = _resize_rgb(dihedral(crop, placement.flip, placement.rot90), y1 - y0, x1 - x0)
    shift = _surround_mean(good, target, _bbox(target)) - _surround_mean(ref.image, ref.mask, rbox)
    full = np.broadcast_to(good.astype(np.float64), good.shape).copy()
    full[y0:y1, x0:x1] = moved + shift
    out: np.ndarray = good.copy()
    out[target] = np.clip(np.rint(full[target]), 0, 255).astype(np.uint8)
    return out
