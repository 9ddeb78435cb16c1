"""Small synthetic defects pasted into good model inputs: the NG side of fit-time choices.

``fit`` chooses the image-score rule (and ``fit --auto`` the input geometry) by how well
held-out good images separate from the same images with a small defect pasted in, never
from test labels. The defects are deliberately small (``area`` of the image, by default
0.1-1.5%, the scale of the smallest real defects such as blowholes and cracks) and of three
kinds, one drawn per image:

* ``shift``: the region's brightness moves by +-(0.15-0.45) of the [0, 1] range (stains,
  holes, bright spots);
* ``copy``: the region shows the image content from another, random place (misplaced
  texture, the cut-paste idea of Li et al., "CutPaste", CVPR 2021);
* ``noise``: the region's texture is replaced by smoothed noise around its local mean
  (scratches, rough patches).

Masks are unions of one to three random ellipses (elongated up to 8:1 so thin cracks
occur), with edges softened over ~1.5 px. With a part mask (``allowed``), each defect's
centre is drawn on the part (defects happen on parts, not on the table). Torch only,
seeded: the same seed gives the same defects. (``ngcal.generation`` holds GLASS
synthesis; it imports this package, so the small maker the fit needs lives here.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

KINDS = ("shift", "copy", "noise")


@dataclass(frozen=True)
class ProbeDefects:
    """Options of the defect maker: ``area`` (min, max) fraction of the image per defect,
    drawn log-uniformly; ``seed``."""

    area: tuple[float, float] = (0.001, 0.015)
    seed: int = 0


def ellipse_mask(
    h: int,
    w: int,
    area: float,
    g: torch.Generator,
    *,
    max_aspect: float = 8.0,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Soft mask float32 [h, w] in [0, 1]: one to three ellipses of ``area`` * h * w pixels
    in total, random centres (the first anywhere, or on a True pixel of ``allowed`` bool
    [h, w] when given; the others near it), axes and angles."""
    parts = int(torch.randint(1, 4, (1,), generator=g))
    yy, xx = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    mask = torch.zeros(h, w)
    if allowed is None:
        cy = float(torch.rand(1, generator=g)) * (h - 1)
        cx = float(torch.rand(1, generator=g)) * (w - 1)
    else:
        where = torch.nonzero(allowed)
        at = where[int(torch.randint(0, len(where), (1,), generator=g))]
        cy, cx = float(at[0]), float(at[1])
    for j in range(parts):
        a_pix = max(area * h * w / parts, 2.0)
        aspect = math.exp(float(torch.rand(1, generator=g)) * math.log(max_aspect))
        ry = math.sqrt(a_pix / math.pi * aspect)
        rx = a_pix / math.pi / ry
        th = float(torch.rand(1, generator=g)) * math.pi
        if j:
            cy += float(torch.randn(1, generator=g)) * ry
            cx += float(torch.randn(1, generator=g)) * rx
        dy, dx = yy - cy, xx - cx
        u = (dx * math.cos(th) + dy * math.sin(th)) / max(rx, 0.5)
        v = (-dx * math.sin(th) + dy * math.cos(th)) / max(ry, 0.5)
        r = torch.sqrt(u * u + v * v)
        edge = 1.5 / max(min(rx, ry), 1.0)  # ~1.5 px of soft edge
        mask = torch.maximum(mask, ((1.0 + edge - r) / (2 * edge)).clamp(0.0, 1.0))
    return mask


def paste_defects(
    x: torch.Tensor,
    cfg: ProbeDefects,
    *,
    std: float = 0.5,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Model inputs float32 [N, 3, H, W] (normalised by ``std`` per channel, as
    ``Preprocessing`` does) -> a copy with one small synthetic defect in each image,
    centred on the part where ``allowed`` (bool [H, W], at least one True) is given."""
    g = torch.Generator().manual_seed(cfg.seed)
    n, _, h, w = x.shape
    out = x.clone()
    lo, hi = math.log(cfg.area[0]), math.log(cfg.area[1])
    for i in range(n):
        area = math.exp(lo + float(torch.rand(1, generator=g)) * (hi - lo))
        m = ellipse_mask(h, w, area, g, allowed=allowed)[None]
        kind = KINDS[int(torch.randint(0, len(KINDS), (1,), generator=g))]
        img = x[i]
        if kind == "shift":
            sign = 1.0 if float(torch.rand(1, generator=g)) < 0.5 else -1.0
            amount = (0.15 + 0.3 * float(torch.rand(1, generator=g))) / std
            new = img + sign * amount
        elif kind == "copy":
            dy = int(torch.randint(-h // 2, h // 2 + 1, (1,), generator=g))
            dx = int(torch.randint(-w // 2, w // 2 + 1, (1,), generator=g))
            new = torch.roll(img, shifts=(dy, dx), dims=(1, 2))
        else:
            noise = torch.randn(1, 1, h, w, generator=g)
            noise = F.avg_pool2d(noise, 3, stride=1, padding=1)[0] * (0.6 / std)
            local = (img * m).sum(dim=(1, 2), keepdim=True) / m.sum().clamp_min(1e-6)
            new = local + noise
        out[i] = img * (1.0 - m) + new * m
    return out
