"""GAS, global anomaly synthesis in feature space (GLASS, Chen et al., ECCV 2024, Sec. 3.2).

Re-derived for PatchCore's locally aware patch features (not GLASS's projected space).

Algorithm, for normal patch features ``x`` [n, D] and a discriminator ``d`` (logit, high =
synthetic):

1. Gaussian noise: ``g = x + eps``, ``eps ~ N(0, sigma^2 I)``.
2. ``steps`` gradient *ascent* steps on the discriminator's loss for labelling ``g`` as
   synthetic, ``L = BCE(d(g), 1)``, with the gradient normalised per feature:
   ``g <- g + eta * grad_g L / ||grad_g L||``. Ascent moves ``g`` towards the side ``d``
   calls normal: the hardest, near-boundary anomalies.
3. Every ``project_every`` steps, and always after the last one, truncated projection into
   a band: the offset ``h = g - a`` from an anchor ``a`` is rescaled so that
   ``||h|| in [lo, hi]`` (its direction kept).
   - manifold variant: ``a = x`` (the source feature), band ``[s r0, 2 s r0]``;
   - hypersphere variant: ``a = c`` (the class centre, per patch position as in GLASS),
     band ``[R + s r0, R + 2 s r0]`` with ``R`` the 0.75 quantile of normal distances to
     ``c`` (GLASS's ``r_t``): a shell just outside the normal ball.

Severity and units (ngcal's re-derivation). GLASS uses [r, 2r] with r = 0.5 in its own
projected space. Here ``r0`` is PatchCore's median leave-one-out patch nearest-neighbour
distance (``manifest.patchcore.stats["loo_patch_nn_p50"]``): how far a normal patch
typically lies from the memory bank built without its image. A synthetic feature of
severity ``s`` sits ``s`` to ``2 s`` such distances away from its source (or outside the
normal ball), so ``s = 1`` means "as far again from normal as normal patches are from each
other", on every product. The noise is scaled to land mid-band (``sigma = 1.5 s r0 /
sqrt(D)``, whose norm is about ``1.5 s r0``, like GLASS's 0.015 x sqrt(1536) ~ 0.6 for
r = 0.5), and the ascent step is ``eta = step_frac * s r0`` (GLASS: 0.001 / 0.5 = 0.002 of
r; our default 0.01 of ``s r0`` moves at most 0.2 band radii in 20 steps, enough for the
ascent to matter at our few training epochs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ngcal.core.errors import ConfigError

Variant = Literal["manifold", "hypersphere"]
VARIANTS: tuple[Variant, ...] = ("manifold", "hypersphere")


class Discriminator(nn.Module):
    """GLASS's discriminator: Linear -> BatchNorm1d -> LeakyReLU(0.2) -> Linear (no bias).

    ``forward`` returns logits [n] (sigmoid = probability of synthetic). Inputs are
    standardised with the normal pool's per-channel ``mean`` and ``std`` (buffers), so the
    same hyper-parameters work whatever the scale of the feature space.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, dim: int, *, hidden: int = 1024, layers: int = 2) -> None:
        super().__init__()
        if layers < 1:
            raise ConfigError(f"discriminator layers must be >= 1, got {layers}")
        blocks: list[nn.Module] = []
        width = dim
        for _ in range(layers - 1):
            blocks += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2)]
            width = hidden
        self.body = nn.Sequential(*blocks)
        self.tail = nn.Linear(width, 1, bias=False)
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)

    def set_standardisation(self, normal: torch.Tensor) -> None:
        """Per-channel mean/std of normal features [n, D]."""
        self.mean.copy_(normal.mean(0))
        self.std.copy_(normal.std(0).clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [n] for features [n, D]."""
        z = (x - self.mean) / self.std
        logits: torch.Tensor = self.tail(self.body(z)).squeeze(-1)
        return logits


@dataclass(frozen=True)
class Band:
    """Truncation band: every synthetic feature ends with ``lo <= ||g - anchor|| <= hi``."""

    variant: Variant
    lo: float
    hi: float

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"GAS variant {self.variant!r} is not one of {VARIANTS}")
        if not (0.0 < self.lo <= self.hi) or not math.isfinite(self.hi):
            raise ConfigError(f"GAS band [{self.lo}, {self.hi}] is not 0 < lo <= hi < inf")


def severity_band(
    severity: float, r0: float, *, variant: Variant = "manifold", centre_radius: float = 0.0
) -> Band:
    """The band of severity ``s``: [s r0, 2 s r0] (manifold) or R + that (hypersphere)."""
    if not (severity > 0 and math.isfinite(severity)):
        raise ConfigError(f"severity must be a positive number, got {severity}")
    if not (r0 > 0 and math.isfinite(r0)):
        raise ConfigError(f"radius unit r0 must be positive, got {r0}")
    base = centre_radius if variant == "hypersphere" else 0.0
    return Band(variant, base + severity * r0, base + 2.0 * severity * r0)


def truncated_projection(
    feats: torch.Tensor, anchors: torch.Tensor, lo: float, hi: float
) -> torch.Tensor:
    """Rescale ``feats - anchors`` ([n, D]) to a norm within [lo, hi], keeping its direction.

    A zero offset (undefined direction) is left on the anchor's side of the first axis.
    """
    h = feats - anchors
    n = h.norm(dim=1, keepdim=True)
    zero = n <= 1e-12
    if bool(zero.any()):
        e = torch.zeros_like(h)
        e[:, 0] = 1.0
        h = torch.where(zero, e, h)
        n = h.norm(dim=1, keepdim=True)
    target = n.clamp(lo, hi)
    out: torch.Tensor = anchors + h * (target / n)
    return out


@dataclass(frozen=True)
class GasConfig:
    """GAS hyper-parameters (GLASS defaults: 20 steps, projection every 5)."""

    steps: int = 20
    project_every: int = 5
    step_frac: float = 0.01
    noise_frac: float = 1.5

    def __post_init__(self) -> None:
        if self.steps < 0 or self.project_every < 1:
            raise ConfigError(f"GAS steps {self.steps} / project_every {self.project_every}")


def gas(
    normal: torch.Tensor,
    disc: Discriminator,
    band: Band,
    *,
    centre: torch.Tensor | None = None,
    config: GasConfig = GasConfig(),
    generator: torch.Generator | None = None,
    severity_unit: float | None = None,
) -> torch.Tensor:
    """Synthesise one anomalous feature per normal feature [n, D] -> [n, D] (detached).

    ``band`` is the truncation band (see ``severity_band``); ``centre`` [n, D] the class
    centre for each row (hypersphere variant); ``severity_unit`` is ``s r0`` (default: the
    band's width ``hi - lo``, which is ``s r0`` for both variants).
    The discriminator keeps its current train/eval mode; in train mode it sees normal and
    synthetic rows in one batch, as in GLASS.
    """
    if normal.ndim != 2:
        raise ConfigError(f"GAS expects features [n, D], got {tuple(normal.shape)}")
    x = normal.detach()
    if band.variant == "hypersphere":
        if centre is None or centre.shape != x.shape:
            raise ConfigError("hypersphere GAS needs a centre of the same shape as the features")
        anchors = centre.detach()
    else:
        anchors = x
    unit = float(severity_unit if severity_unit is not None else band.hi - band.lo)
    dim = x.shape[1]
    sigma = config.noise_frac * unit / math.sqrt(dim)
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
    g = x + sigma * noise
    eta = config.step_frac * unit
    training = disc.training
    for step in range(config.steps):
        g = g.detach().requires_grad_(True)
        # train mode: batch statistics over normal and synthetic rows together, as GLASS
        logits = disc(torch.cat([x, g]))[x.shape[0] :] if training else disc(g)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
        (grad,) = torch.autograd.grad(loss, [g])
        with torch.no_grad():
            g = g + eta * grad / (grad.norm(dim=1, keepdim=True) + 1e-10)
            if (step + 1) % config.project_every == 0:
                g = truncated_projection(g, anchors, band.lo, band.hi)
    with torch.no_grad():
        g = truncated_projection(g.detach(), anchors, band.lo, band.hi)
    return g


def implant(
    feats: torch.Tensor,
    cells: torch.Tensor,
    disc: Discriminator,
    band: Band,
    centre_map: torch.Tensor,
    *,
    config: GasConfig = GasConfig(),
    generator: torch.Generator,
) -> torch.Tensor:
    """Replace the features under ``cells`` by GAS features; the others stay as they are.

    feats [G, h, w, D]; cells bool [G, h, w]; centre_map [h, w, D] (hypersphere anchor).
    Returns a new tensor [G, h, w, D].
    """
    out = feats.clone()
    rows = out[cells]
    centre = centre_map.expand_as(out)[cells]
    out[cells] = gas(rows, disc, band, centre=centre, config=config, generator=generator)
    return out


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, *, gamma: float = 2.0) -> torch.Tensor:
    """Binary focal loss (Lin et al., ICCV 2017), mean over rows; labels in {0, 1}."""
    p = torch.sigmoid(logits)
    pt = torch.where(labels > 0.5, p, 1.0 - p)
    ce = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return ((1.0 - pt) ** gamma * ce).mean()


def discriminator_loss(
    disc: Discriminator,
    normal: torch.Tensor,
    synthetic: torch.Tensor,
    *,
    las_feats: torch.Tensor | None = None,
    las_labels: torch.Tensor | None = None,
    hard_fraction: float = 0.5,
) -> torch.Tensor:
    """GLASS's training loss: BCE(normal -> 0) + BCE(GAS -> 1) + focal loss on LAS patches.

    The focal term keeps the hardest ``hard_fraction`` of LAS rows (by squared error), as
    GLASS's ``p = 0.5`` mining does.
    """
    logits = disc(torch.cat([normal, synthetic]))
    n = normal.shape[0]
    bce = nn.functional.binary_cross_entropy_with_logits
    loss = bce(logits[:n], torch.zeros_like(logits[:n])) + bce(
        logits[n:], torch.ones_like(logits[n:])
    )
    if las_feats is not None and las_labels is not None and las_feats.shape[0] > 0:
        fl = disc(las_feats)
        err = (torch.sigmoid(fl) - las_labels) ** 2
        if 0.0 < hard_fraction < 1.0:
            keep = err >= torch.quantile(err.detach(), 1.0 - hard_fraction)
            fl, lab = fl[keep], las_labels[keep]
        else:
            lab = las_labels
        loss = loss + focal_loss(fl, lab)
    return loss


@dataclass(frozen=True)
class TrainConfig:
    """Discriminator training: epochs over the normal pool in batches of ``batch_rows``.

    GLASS trains 640 epochs with AdamW at lr 2e-4; ngcal's CPU default is far fewer epochs at
    a higher lr (1e-3), because the discriminator here only steers the ascent (PatchCore does
    the scoring).
    """

    epochs: int = 10
    batch_rows: int = 1024
    lr: float = 1e-3
    hidden: int = 1024
    layers: int = 2
    hard_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_rows < 2 or self.lr <= 0:
            raise ConfigError(
                f"training config epochs={self.epochs} batch_rows={self.batch_rows} lr={self.lr}"
            )


def train_discriminator(
    normal: torch.Tensor,
    bands: list[Band],
    *,
    centre: torch.Tensor | None = None,
    las_feats: torch.Tensor | None = None,
    las_labels: torch.Tensor | None = None,
    train: TrainConfig = TrainConfig(),
    gas_config: GasConfig = GasConfig(),
    generator: torch.Generator,
    progress: bool = False,
) -> Discriminator:
    """Train GLASS's discriminator on normal rows [P, D] against GAS rows of random ``bands``.

    ``centre`` [P, D] is each row's class centre (hypersphere bands); ``las_feats`` [Q, D]
    with ``las_labels`` [Q] (1 = inside a LAS mask) add GLASS's focal term. Each batch draws
    one band at random, so the discriminator learns every severity of the grid. Returns the
    discriminator in eval mode. Deterministic for a given ``generator`` state.
    """
    if not bands:
        raise ConfigError("train_discriminator: no severity band given")
    disc = Discriminator(normal.shape[1], hidden=train.hidden, layers=train.layers)
    disc.to(normal.device)
    disc.set_standardisation(normal)
    opt = torch.optim.AdamW(disc.parameters(), lr=train.lr)
    n = normal.shape[0]
    per_epoch = max(1, n // train.batch_rows)
    q = 0 if las_feats is None else las_feats.shape[0]
    from tqdm import tqdm

    bar = tqdm(
        total=train.epochs * per_epoch,
        desc="GLASS discriminator",
        disable=not progress,
        mininterval=1.0,
    )
    for _ in range(train.epochs):
        order = torch.randperm(n, generator=generator).to(normal.device)
        for b in range(per_epoch):
            idx = order[b * train.batch_rows : (b + 1) * train.batch_rows]
            x = normal[idx]
            band = bands[int(torch.randint(len(bands), (1,), generator=generator))]
            disc.train()
            c = centre[idx] if centre is not None else None
            g = gas(x, disc, band, centre=c, config=gas_config, generator=generator)
            lf = ll = None
            if q and las_feats is not None and las_labels is not None:
                j = torch.randint(q, (min(q, train.batch_rows),), generator=generator)
                j = j.to(normal.device)
                lf, ll = las_feats[j], las_labels[j]
            opt.zero_grad()
            loss = discriminator_loss(
                disc, x, g, las_feats=lf, las_labels=ll, hard_fraction=train.hard_fraction
            )
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    bar.close()
    disc.eval()
    return disc
