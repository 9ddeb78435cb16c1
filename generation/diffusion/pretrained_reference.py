"""Reference-guided init (``pretrained`` backend): a real NG's defect re-placed under a target.

Training-free and one-shot (the principle the issue names for TF-IDG, ICCV 2025: carry a
single reference defect's appearance into a new image without training): the real NG's
defect is moved under the target mask by the transform that placed the target (a
``GuidedRequest`` names its reference and ``Placement``), or, for a plain request, by the
dihedral transform (flip, k x 90 degrees) of the best-fitting reference of the type scaled
onto the target's box; ``placement.reference_composite`` paints it (its relative layer over
its own background, multiplied into the good image's background; the same init as the
``fewshot`` backend's). The backend then noises that init and denoises it inside the mask
with strength < 1 (SDEdit, Meng et al. ICLR 2022), so the defect keeps the reference's look
while the model blends it into the good image. Images are uint8 RGB [S, S, 3], masks bool.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ngcal.core.errors import ConfigError

from .backend import Reference, Request
from .placement import GuidedRequest, Placement, bbox, place_mask, reference_composite

#: the 8 dihedral transforms as (flip left-right first, then k x 90 degrees counter-clockwise)
DIHEDRAL: tuple[tuple[bool, int], ...] = tuple((f, k) for f in (False, True) for k in range(4))


@dataclass(frozen=True)
class Guide:
    """Which real NG goes under a target, how it is placed, how well its moved mask fits the
    target (IoU) and where the placement came from (``drawn``: the transform the target was
    drawn with; ``matched``: ``match_reference``)."""

    reference: Reference
    placement: Placement
    iou: float
    source: str

    def as_dict(self) -> dict[str, object]:
        return {
            "reference": self.reference.item_id,
            "iou": self.iou,
            "source": self.source,
            **self.placement.as_dict(),
        }


def dihedral(a: np.ndarray, flip: bool, rot90: int) -> np.ndarray:
    """``a`` ([H, W] or [H, W, C]) flipped left-right if ``flip``, then rotated ``rot90`` x 90."""
    if flip:
        a = a[:, ::-1]
    return np.ascontiguousarray(np.rot90(a, rot90))


def _resize_mask(m: np.ndarray, h: int, w: int) -> np.ndarray:
    im = Image.fromarray(m.astype(np.uint8) * 255, mode="L")
    return np.asarray(im.resize((w, h), Image.Resampling.NEAREST)) > 127


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int((a | b).sum())
    return float((a & b).sum() / union) if union else 0.0


def match_reference(target: np.ndarray, references: Sequence[Reference]) -> Guide:
    """The reference and dihedral transform whose mask, scaled to the target's bounding
    box, overlaps the target best (IoU); a target re-placed from a reference's mask by a
    flip, rotation and resize finds that reference and transform back."""
    if not references:
        raise ConfigError("reference placement: no reference of this defect type")
    y0, y1, x0, x1 = bbox(target)
    tp = target[y0:y1, x0:x1]
    best: Guide | None = None
    for ref in references:
        ry0, ry1, rx0, rx1 = bbox(ref.mask)
        rp = ref.mask[ry0:ry1, rx0:rx1]
        for flip, k in DIHEDRAL:
            iou = _iou(_resize_mask(dihedral(rp, flip, k), y1 - y0, x1 - x0), tp)
            if best is None or iou > best.iou + 1e-12:
                p = Placement(flip, k, y1 - y0, x1 - x0, y0, x0)
                best = Guide(ref, p, iou, "matched")
    if best is None:  # unreachable: references is not empty
        raise ConfigError("reference placement: no reference of this defect type")
    return best


def guide_for(request: Request, references: Sequence[Reference]) -> Guide:
    """The placement the request's target was drawn with when it carries one (a
    ``GuidedRequest`` with a reference and placement), else ``match_reference``."""
    if isinstance(request, GuidedRequest) and request.reference and request.placement:
        moved = place_mask(request.reference.mask, request.placement, request.target.shape)
        return Guide(request.reference, request.placement, _iou(moved, request.target), "drawn")
    return match_reference(request.target, references)


def reference_init(request: Request, guide: Guide) -> np.ndarray:
    """The good image with the guide's real defect painted inside the target (uint8 RGB;
    outside the target exactly the good image)."""
    ref = guide.reference
    if ref.image.shape != request.good.shape:
        raise ConfigError(
            f"reference {ref.item_id}: image {ref.image.shape} is not the good image's "
            f"{request.good.shape}"
        )
    return reference_composite(request.good, request.target, ref, guide.placement)
