"""Image-score rules: how a patch-distance map becomes one image score.

The one implementation shared by ``PatchCore.forward``/``head`` (and thus the exported
graph), leave-one-out and cross-fitted scoring at fit time, and the rule selection of
``fit --auto``. Each rule maps patch distances [N, P] (optionally weighted by a
foreground mask) to image scores [N]:

* ``max``: the largest patch distance.
* ``topk_mean``: mean of the k largest patch distances (k = ``ImageRule.k``).
* ``reweighted_max``: Roth et al., "Towards Total Recall in Industrial Anomaly
  Detection" (CVPR 2022), eq. 7: the largest patch distance s*, scaled by
  ``1 - softmax(||m_test - n||)_0`` over the b bank neighbours n of its nearest bank row
  m* (m* first), i.e. less weight where the bank is dense around m*. It needs each
  patch's nearest bank row and the neighbours of that row (``Neighbours``).

Everything is static given the rule: no data-dependent Python branches (traceable).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ngcal.core.errors import ConfigError

IMAGE_SCORE_RULES = ("reweighted_max", "topk_mean", "max")

#: m_star [N] (nearest bank row of each image's most anomalous patch) -> the rows of its
#: b nearest bank rows, m* first: [N, b, D]
Neighbours = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ImageRule:
    """One image-score rule: ``name`` (one of ``IMAGE_SCORE_RULES``) and its ``k``
    (``topk_mean`` only; 1 for the others)."""

    name: str = "topk_mean"
    k: int = 10

    def __post_init__(self) -> None:
        if self.name not in IMAGE_SCORE_RULES:
            raise ConfigError(f"image score {self.name!r}: one of {IMAGE_SCORE_RULES}")
        if self.k < 1:
            raise ConfigError(f"image score k {self.k}: must be >= 1")

    @property
    def needs_index(self) -> bool:
        """True when the rule reads each patch's nearest bank row."""
        return self.name == "reweighted_max"

    @property
    def label(self) -> str:
        """Short name for tables: ``max``, ``topk_mean_10``, ``reweighted_max``."""
        return f"topk_mean_{self.k}" if self.name == "topk_mean" else self.name

    @property
    def manifest_k(self) -> int:
        """The k recorded in a manifest (``image_score_k``): 1 unless ``topk_mean``."""
        return self.k if self.name == "topk_mean" else 1


def pooled(dist: torch.Tensor, rule: ImageRule) -> torch.Tensor:
    """``max`` or ``topk_mean`` of patch distances [N, P] -> [N]."""
    if rule.name == "topk_mean":
        k = min(rule.k, dist.shape[1])
        return dist.topk(k, dim=1).values.mean(dim=1)
    if rule.name == "max":
        return dist.max(dim=1).values
    raise ConfigError(f"image score {rule.name!r} is not a pooling rule")


def reweight(s_star: torch.Tensor, m_test: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """Paper eq. 7: ``s = (1 - softmax(||m_test - n_j||)_0) * s*``.

    s_star [N]; m_test [N, D] the most anomalous patch; neighbours [N, b, D], its nearest
    bank row m* first, then m*'s other b - 1 nearest bank rows.
    """
    d = torch.sqrt(((neighbours - m_test[:, None, :]) ** 2).sum(-1).clamp_min(0.0))
    w = 1.0 - torch.softmax(d, dim=1)[:, 0]
    return w * s_star


def reweighted_max(
    feats: torch.Tensor, dist: torch.Tensor, idx: torch.Tensor, neighbours: Neighbours
) -> torch.Tensor:
    """Eq. 7 image scores [N] from features [N, P, D] (or [N, h, w, D]), distances [N, P],
    nearest bank rows [N, P] and the bank-neighbour lookup."""
    n, d = feats.shape[0], feats.shape[-1]  # not int(): the batch stays dynamic when traced
    flat = feats.reshape(n, -1, d)
    s_star, p_star = dist.max(dim=1)
    m_test = torch.gather(flat, 1, p_star[:, None, None].expand(n, 1, d))[:, 0]
    m_star = torch.gather(idx, 1, p_star[:, None])[:, 0]
    return reweight(s_star, m_test, neighbours(m_star))


def image_scores(
    rule: ImageRule,
    feats: torch.Tensor,
    dist: torch.Tensor,
    idx: torch.Tensor | None,
    neighbours: Neighbours | None,
) -> torch.Tensor:
    """Image scores [N] by ``rule`` from patch distances [N, P]; ``feats``, ``idx`` and
    ``neighbours`` are only read by ``reweighted_max`` (ConfigError when it lacks them)."""
    if not rule.needs_index:
        return pooled(dist, rule)
    if idx is None or neighbours is None:
        raise ConfigError("reweighted_max needs the nearest bank rows (idx) and their neighbours")
    return reweighted_max(feats, dist, idx, neighbours)
