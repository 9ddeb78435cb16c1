"""Image-score rules (``patchcore.rules``) and the fit-time choice among them
(``patchcore.selection``): values against direct computations, ties keep the default."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ngcal.core.errors import ConfigError
from ngcal.patchcore.rules import ImageRule, image_scores, pooled, reweight
from ngcal.patchcore.selection import CANDIDATE_RULES, choose, evidence

pytestmark = pytest.mark.torch


def test_pooled_rules_match_direct_reductions() -> None:
    """max is the row maximum, topk_mean the mean of the k largest (k capped at P)."""
    d = torch.rand(3, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pooled(d, ImageRule("max", 1)), d.max(dim=1).values)
    top = d.sort(dim=1, descending=True).values
    assert torch.allclose(pooled(d, ImageRule("topk_mean", 7)), top[:, :7].mean(1))
    assert torch.allclose(pooled(d, ImageRule("topk_mean", 500)), d.mean(1))


def test_reweighted_max_uses_the_most_anomalous_patch_and_its_neighbours() -> None:
    """reweighted_max = eq. 7 on the argmax patch, its nearest row and that row's neighbours."""
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 4, 4, 5, generator=g)
    dist = torch.rand(2, 16, generator=g)
    idx = torch.randint(0, 10, (2, 16), generator=g)
    bank = torch.randn(10, 5, generator=g)
    seen: list[int] = []

    def neighbours(m_star: torch.Tensor) -> torch.Tensor:
        seen.extend(m_star.tolist())
        return torch.stack([bank[[m, (m + 1) % 10, (m + 2) % 10]] for m in m_star.tolist()])

    got = image_scores(ImageRule("reweighted_max", 1), feats, dist, idx, neighbours)
    p = dist.argmax(dim=1)
    assert seen == [int(idx[0, p[0]]), int(idx[1, p[1]])]
    flat = feats.reshape(2, 16, 5)
    want = reweight(dist.max(dim=1).values, flat[[0, 1], p], neighbours(idx[[0, 1], p]))
    assert torch.allclose(got, want)
    with pytest.raises(ConfigError, match="nearest bank rows"):
        image_scores(ImageRule("reweighted_max", 1), feats, dist, None, None)


def test_rule_labels_and_manifest_k() -> None:
    """Labels name k only for topk_mean; the manifest's k is 1 for the other rules."""
    assert ImageRule("topk_mean", 3).label == "topk_mean_3"
    assert ImageRule("max", 5).label == "max" and ImageRule("max", 5).manifest_k == 1
    with pytest.raises(ConfigError, match="k 0"):
        ImageRule("topk_mean", 0)


def test_choice_leaves_the_default_only_on_clear_evidence() -> None:
    """A candidate that separates clearly better replaces the default; one whose advantage
    is within the noise of the sample does not (the default comes first in the table)."""
    rng = np.random.default_rng(0)
    normal = rng.normal(0.0, 1.0, 300)
    ng = rng.normal(1.0, 1.0, 80)
    noisy = ng + rng.normal(0.0, 0.05, 80)  # the same evidence, jittered
    table, chosen = choose(
        {"default": normal, "clear": normal, "noise": normal},
        {"default": ng, "clear": ng + 2.0, "noise": noisy},
    )
    assert chosen == "clear" and [e.candidate for e in table] == ["default", "clear", "noise"]
    assert table[0].beats_default is None and table[1].beats_default == 1.0
    _, chosen = choose({"default": normal, "noise": normal}, {"default": ng, "noise": noisy})
    assert chosen == "default"
    assert CANDIDATE_RULES[0] == ImageRule()  # the default rule comes first


def test_evidence_is_auroc_and_tpr_above_normal_p99() -> None:
    """Perfectly separated sets give AUROC 1 and tpr 1; identical sets AUROC 0.5."""
    normal = np.linspace(0.0, 1.0, 101)
    e = evidence("x", normal, normal + 2.0)
    assert e.separation == 1.0 and e.tpr_at_p99 == 1.0
    assert evidence("y", normal, normal).separation == pytest.approx(0.5)
