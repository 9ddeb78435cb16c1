"""A real defect re-placed: the mask transform and the defect's pixels carried along with it.

A ``Placement`` maps a real NG's mask bounding box onto a box of the target image: a flip, a
rotation by a multiple of 90 degrees, a resize to ``height`` x ``width`` and a position. The
same placement moves the mask (``place_mask``, nearest neighbour) and the defect's
appearance (``reference_composite``), so a re-placed real mask gets the very defect that
was drawn along it.

The appearance travels as a *relative* layer: the real NG divided by its own background
(estimated under the mask by normalised convolution of the pixels around it), multiplied
into the good image's background at the target. A dark blowhole stays as many times darker
than its surroundings on a bright part as on a dark one, and keeps its own texture.
Pixels of the target that the placed real mask does not cover (a synthetic stroke or blob
target mapped onto a real defect's box) get the defect's median relative level.

This is the starting point of reference-guided sampling (SDEdit, Meng et al. ICLR 2022;
training-free one-shot defect synthesis as in TF-IDG): the diffusion model starts from the
noised composite instead of pure noise, and blends it into the context.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ngcal.core.errors import ConfigError

from .backend import Reference, Request


@dataclass(frozen=True)
class Placement:
    """Flip (left-right, first), rotate by ``rot`` x 90 degrees, resize to ``height`` x
    ``width`` pixels, put the top-left corner at (``y``, ``x``)."""

    flip: bool
    rot: int
    height: int
    width: int
    y: int
    x: int

    def as_dict(self) -> dict[str, object]:
        return {
            "flip": self.flip,
            "rot": self.rot,
            "height": self.height,
            "width": self.width,
            "y": self.y,
            "x": self.x,
        }


@dataclass(frozen=True)
class GuidedRequest(Request):
    """A ``Request`` that also names the real defect its target came from and how it was
    placed (backends that do not use references read it as a plain ``Request``)."""

    reference: Reference | None = None
    placement: Placement | None = None


def bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of a non-empty bool mask, end-exclusive."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ConfigError("bbox: empty mask")
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def _orient(a: np.ndarray, flip: bool, rot: int) -> np.ndarray:
    if flip:
        a = a[:, ::-1]
    return np.ascontiguousarray(np.rot90(a, rot % 4))


def _resize(a: np.ndarray, height: int, width: int, *, nearest: bool) -> np.ndarray:
    """float or bool [h, w] (or [h, w, c]) resized to [height, width] (nearest or bilinear)."""
    if a.shape[:2] == (height, width):
        same: np.ndarray = a.copy()
        return same
    if nearest:
        im = Image.fromarray(a.astype(np.uint8) * 255, mode="L")
        return np.asarray(im.resize((width, height), Image.Resampling.NEAREST)) > 127
    chans = a[..., None] if a.ndim == 2 else a
    out = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(chans[..., c], dtype=np.float32), mode="F").resize(
                (width, height), Image.Resampling.BILINEAR
            )
        )
        for c in range(chans.shape[-1])
    ]
    res = np.stack(out, axis=-1).astype(np.float64)
    return res[..., 0] if a.ndim == 2 else res


def random_placement(
    mask: np.ndarray,
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    foreground: np.ndarray | None = None,
    scale: tuple[float, float] = (0.7, 1.3),
    tries: int = 20,
    quarter_turns: bool = False,
) -> Placement:
    """A random placement of ``mask``'s box in an image of ``shape``: flip with p = 0.5, a
    half turn with p = 0.5 (any quarter turn with ``quarter_turns``), scale uniform in
    ``scale``, a position whose centre is on the ``foreground`` when one is given (up to
    ``tries`` draws).

    A mask touching the image's border keeps touching the same (moved) border.
    Without quarter turns the product's axes are kept: a real defect carries the surface
    texture around and inside it, and turning it by 90 degrees turns that texture too
    (horizontal tool marks inside a vertical-marked part)."""
    y0, y1, x0, x1 = bbox(mask)
    flip = bool(rng.random() < 0.5)
    rot = int(rng.integers(0, 4)) if quarter_turns else 2 * int(rng.integers(0, 2))
    bh, bw = (x1 - x0, y1 - y0) if rot % 2 else (y1 - y0, x1 - x0)
    s = float(rng.uniform(*scale))
    h, w = shape
    ph = int(np.clip(round(bh * s), 1, h))
    pw = int(np.clip(round(bw * s), 1, w))
    # a defect on the image's edge (a break, a region cut by the frame) stays on the edge
    # it touched, as moved by the flip and turn: top, bottom, left, right
    mh, mw = mask.shape
    sides = [y0 == 0, y1 == mh, x0 == 0, x1 == mw]
    if flip:
        sides = [sides[0], sides[1], sides[3], sides[2]]
    for _ in range(rot % 4):  # counter-clockwise quarter turns: top <- right <- bottom <- left
        sides = [sides[3], sides[2], sides[0], sides[1]]
    top, bottom, left, right = sides
    if top and bottom:
        ph = h
    if left and right:
        pw = w
    y = x = 0
    for _ in range(tries):
        y = 0 if top else h - ph if bottom else int(rng.integers(0, h - ph + 1))
        x = 0 if left else w - pw if right else int(rng.integers(0, w - pw + 1))
        if foreground is None or foreground[y + ph // 2, x + pw // 2]:
            break
    return Placement(flip, rot, ph, pw, y, x)


def fit_placement(
    mask: np.ndarray, target: np.ndarray, rng: np.random.Generator, *, quarter_turns: bool = False
) -> Placement:
    """The placement of ``mask``'s box onto ``target``'s box (a synthetic target): a random
    flip and half turn, and with ``quarter_turns`` a quarter turn that keeps the long sides
    parallel (see ``random_placement``)."""
    y0, y1, x0, x1 = bbox(mask)
    t0, t1, u0, u1 = bbox(target)
    src_tall = (y1 - y0) >= (x1 - x0)
    dst_tall = (t1 - t0) >= (u1 - u0)
    turn = 1 if quarter_turns and src_tall != dst_tall else 0
    rot = turn + 2 * int(rng.integers(0, 2))
    return Placement(bool(rng.random() < 0.5), rot, t1 - t0, u1 - u0, t0, u0)


def place_mask(mask: np.ndarray, p: Placement, shape: tuple[int, int]) -> np.ndarray:
    """``mask``'s box moved by ``p`` into an empty bool image of ``shape`` (never empty)."""
    y0, y1, x0, x1 = bbox(mask)
    small = _resize(_orient(mask[y0:y1, x0:x1], p.flip, p.rot), p.height, p.width, nearest=True)
    if not small.any():
        small = np.ones((p.height, p.width), dtype=bool)
    out = np.zeros(shape, dtype=bool)
    out[p.y : p.y + p.height, p.x : p.x + p.width] = small
    return out


def _box_sum(a: np.ndarray, r: int) -> np.ndarray:
    """Sum of ``a`` [H, W] over the (2r+1)^2 box around each pixel (zero outside)."""
    p = np.pad(a, ((r + 1, r), (r + 1, r)))
    c = p.cumsum(0).cumsum(1)
    k = 2 * r + 1
    out: np.ndarray = c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]
    return out


def background(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """float64 [H, W, C]: ``image`` (uint8 [H, W, C]) with the pixels of ``mask`` (grown by
    one pixel) replaced by the mean of the unmasked pixels around them (normalised box
    convolution, the box as wide as the mask's box is thin, so it reaches past the mask)."""
    y0, y1, x0, x1 = bbox(mask)
    r = int(np.ceil(min(y1 - y0, x1 - x0) / 2)) + 3
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    keep = (~grown).astype(np.float64)
    x = image.astype(np.float64)
    n = _box_sum(keep, r)
    out: np.ndarray = x.copy()
    fallback = x[~grown].mean(axis=0) if (~grown).any() else x.mean(axis=(0, 1))
    for c in range(x.shape[-1]):
        s = _box_sum(x[..., c] * keep, r)
        est = np.where(n > 0, s / np.maximum(n, 1e-9), fallback[c])
        out[..., c] = np.where(grown, est, x[..., c])
    return out


def relative_layer(ref: Reference) -> tuple[np.ndarray, np.ndarray]:
    """The real defect as (ratio float64 [h, w, C] over its box, its bool mask [h, w]):
    image / background, 1 = no change."""
    y0, y1, x0, x1 = bbox(ref.mask)
    bg = background(ref.image, ref.mask)[y0:y1, x0:x1]
    img = ref.image[y0:y1, x0:x1].astype(np.float64)
    return (img + 1.0) / (bg + 1.0), ref.mask[y0:y1, x0:x1].copy()


def _poisson(dest: np.ndarray, guide: np.ndarray, omega: np.ndarray) -> np.ndarray:
    """Seamless cloning (Perez, Gangnet & Blake, SIGGRAPH 2003): float64 [H, W, C] equal to
    ``dest`` outside ``omega`` (bool [H, W]) and, inside, the field whose 4-neighbour
    differences best match ``guide``'s, with ``dest``'s values on the boundary."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import splu

    h, w = omega.shape
    ys, xs = np.nonzero(omega)
    n = ys.size
    idx = np.full((h, w), -1, dtype=np.int64)
    idx[ys, xs] = np.arange(n)
    diag = np.zeros(n)
    rows, cols = [], []
    b = np.zeros((n, dest.shape[-1]))
    for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        qy, qx = ys + dy, xs + dx
        ok = (qy >= 0) & (qy < h) & (qx >= 0) & (qx < w)
        p, qy, qx = np.arange(n)[ok], qy[ok], qx[ok]
        diag[p] += 1
        b[p] += guide[ys[ok], xs[ok]] - guide[qy, qx]
        inner = omega[qy, qx]
        rows.append(p[inner])
        cols.append(idx[qy[inner], qx[inner]])
        b[p[~inner]] += dest[qy[~inner], qx[~inner]]
    r, c = np.concatenate(rows + [np.arange(n)]), np.concatenate(cols + [np.arange(n)])
    v = np.concatenate([-np.ones(r.size - n), diag])
    lu = splu(coo_matrix((v, (r, c)), shape=(n, n)).tocsc())
    out: np.ndarray = dest.copy()
    out[ys, xs] = np.stack([lu.solve(b[:, k]) for k in range(b.shape[1])], axis=-1)
    return out


def clone(dest: np.ndarray, source: np.ndarray, omega: np.ndarray) -> np.ndarray:
    """``dest`` (uint8 [H, W, C]) with ``source``'s pixels under ``omega`` seamlessly cloned in
    the log domain (``_poisson``); the rest exact."""
    cloned = np.exp(
        _poisson(
            np.log(dest.astype(np.float64) + 1.0), np.log(source.astype(np.float64) + 1.0), omega
        )
    )
    out: np.ndarray = dest.copy()
    out[omega] = np.clip(np.rint(cloned[omega] - 1.0), 0, 255).astype(np.uint8)
    return out


def reference_composite(
    good: np.ndarray, target: np.ndarray, ref: Reference, p: Placement
) -> np.ndarray:
    """``good`` (uint8 [H, W, C]) with ``ref``'s defect moved by ``p`` painted into the pixels
    of ``target`` only (the rest exact).

    The defect's ratio layer, moved by ``p``, times good's background under the target is
    cloned in the log domain (``_poisson``): the relative contrast and texture of the real
    defect inside, the good image's own values at the boundary, so neither the product's
    texture phase nor its brightness jumps at the target's edge. Target pixels the moved real
    mask does not cover get the defect's median ratio."""
    ratio, m = relative_layer(ref)
    ratio = _resize(_orient(ratio, p.flip, p.rot), p.height, p.width, nearest=False)
    m = _resize(_orient(m, p.flip, p.rot), p.height, p.width, nearest=True)
    med = np.median(ratio[m], axis=0) if m.any() else np.ones(ratio.shape[-1])
    sl = (slice(p.y, p.y + p.height), slice(p.x, p.x + p.width))
    full = np.ones(good.shape, dtype=np.float64)
    full[target] = med
    box = full[sl]
    full[sl] = np.where((m | ~target[sl])[..., None], ratio, box)
    guide = np.log(background(good, target) + 1.0) + np.log(np.maximum(full, 1e-3))
    dest = np.log(good.astype(np.float64) + 1.0)
    cloned = np.exp(_poisson(dest, guide, target)) - 1.0
    out: np.ndarray = good.copy()
    out[target] = np.clip(np.rint(cloned[target]), 0, 255).astype(np.uint8)
    return out
